"""Keeping the chunk index of a store without local files in step with its ``packs/``.

Such a store (S3, memory) keeps its LMDB index in a local cache (``index_cache``) that
records which packs it has read. :func:`sync_index` lists ``packs/`` once, drops the rows
of packs that are gone (gc, repack), and reads the entries of each new pack from its index
object ``packs/<name>.idx`` (one GET per pack, in parallel), falling back to a walk of the
pack's entry headers where there is none (a store written before index objects existed)
or it is damaged (the pack's own headers are authoritative; fsck names the damaged index).
A damaged pack is left unindexed, to fsck and ``repair index``, as before. The processes
sharing one cache (the ranks of a host) sync one at a time, so each new index object is
read once per host even when they all open at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import _fs, layout
from .backends import Backend
from .errors import CorruptObjectError
from .index import ChunkIndex
from .pack import PackEntry, iter_backend_pack
from .pack_index import read_pack_index

__all__ = ["sync_index", "list_packs", "pack_entries"]

_PACK_NAME = re.compile(r"^[0-9a-f]{32}$")
_READERS = 16  # index objects read at once


def list_packs(backend: Backend) -> tuple[set[str], set[str]]:
    """``(sealed packs, packs with an index object)`` from one listing of ``packs/``."""
    packs: set[str] = set()
    indexed: set[str] = set()
    for key in backend.list(layout.PACKS):
        name = key[len(layout.PACKS) + 1:]
        if "/" in name:
            continue
        for suffix, found in ((layout.PACK_SUFFIX, packs), (layout.PACK_INDEX_SUFFIX, indexed)):
            stem = name.removesuffix(suffix)
            if stem != name and _PACK_NAME.match(stem):
                found.add(stem)
    return packs, indexed


def pack_entries(backend: Backend, name: str, has_index: bool) -> list[PackEntry] | None:
    """A pack's entries: from its index object when it has a sound one, else from its
    headers; None when the pack is gone or damaged."""
    if has_index:
        try:
            return read_pack_index(backend, name)
        except FileNotFoundError:
            pass  # deleted since the listing: the walk below says whether the pack is too
        except CorruptObjectError:
            pass  # a damaged index object: the pack's own headers decide
    try:
        return list(iter_backend_pack(backend, name))
    except (CorruptObjectError, FileNotFoundError):
        return None


def _read_all(backend: Backend, names: list[str], indexed: set[str]) -> Iterable[tuple[str, list[PackEntry] | None]]:
    if len(names) <= 1:
        return [(name, pack_entries(backend, name, name in indexed)) for name in names]
    with ThreadPoolExecutor(min(_READERS, len(names)), thread_name_prefix="ckptvcs-idx") as pool:
        return list(zip(names, pool.map(lambda n: pack_entries(backend, n, n in indexed), names)))


@contextlib.contextmanager
def _host_turn(lock: Path | None) -> Iterator[None]:
    """One sync at a time among the processes sharing a cached index (an flock on ``lock``):
    ranks of a host that open at once then read each new index object once, not each."""
    if lock is None:
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def sync_index(backend: Backend, index: ChunkIndex, lock: Path | None = None) -> int:
    """Bring ``index`` up to date with ``backend``'s packs; returns the chunks added.

    ``lock``: a file that serialises the syncs of the processes sharing ``index``.
    """
    with _fs.storage_errors("reading the pack indexes of the store"), _host_turn(lock):
        # Recorded packs first, then the listing: a pack another process seals and records
        # meanwhile is then either listed or not yet known, never dropped as deleted.
        known = index.indexed_packs()
        packs, indexed = list_packs(backend)
        lost = index.drop_packs(known - packs)
        added = 0
        for name, entries in _read_all(backend, sorted(packs - known), indexed):
            if entries is not None:
                added += index.add_pack(name, entries)
        orphans = index.missing(lost) if lost else set()
        if orphans:
            # A chunk also held by a pack read earlier (two writers stored it) lost its only
            # row with the deleted pack: find its other copy.
            for name, entries in _read_all(backend, sorted(known & packs), indexed):
                if entries is not None:
                    added += index.add_pack(name, [e for e in entries if e.chunk_id in orphans])
    return added

"""Lazy clones: history and manifests local, chunks fetched from the remote when a load needs them.

A lazy clone (``clone(url, path, lazy=True)``, ``ckptvcs clone --lazy``) records its remote
in config.json (``"lazy_remote": "origin"``). Every Repo opened on it gets a chunk source
(``Repo.chunk_source``) that, before a load reads, finds the chunks the load needs (and
their delta bases) that are not local, locates them through the remote's pack indexes,
reads just their entries by ranged reads (adjacent entries of one pack in one request),
writes them into a new local pack (sealed, indexed), and reads each back through the
verified read path (BLAKE3 against its id). So ``load(rev, keys=["model"])`` fetches only
the model's chunks, each once: they stay local (the cache is the repository itself).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ckptvcs import _fs
from ckptvcs.errors import CorruptObjectError, IntegrityError, StorageError
from ckptvcs.pack import ENTRY_HEADER_SIZE, PackEntry, PackWriter, entry_size
from ckptvcs.remotes.config import get_remote, open_backend
from ckptvcs.remotes.layout import RemoteStore, pack_key

if TYPE_CHECKING:
    from ckptvcs.repo import Repo

__all__ = ["LazyChunkSource", "fetch_chunks"]

_COALESCE_GAP = 1 << 20  # entries of one pack closer than this are read in one ranged request


class LazyChunkSource:
    """``Repo.chunk_source`` of a lazy clone: makes the given chunks local, verified."""

    def __init__(self, repo: Repo, remote: str) -> None:
        self._repo = repo
        self._remote = remote
        self._store: RemoteStore | None = None
        self._located: dict[bytes, PackEntry] | None = None

    def _connect(self) -> tuple[RemoteStore, dict[bytes, PackEntry]]:
        if self._store is None:
            cfg = get_remote(self._repo, self._remote)
            self._store = RemoteStore(open_backend(cfg.url, cfg.endpoint_url))
        if self._located is None:
            self._located = locate_chunks(self._store)
        return self._store, self._located

    def __call__(self, chunk_ids: list[bytes]) -> None:
        missing = self._repo.chunks.index.missing(chunk_ids)
        if not missing:
            return
        store, located = self._connect()
        if any(c not in located for c in missing):
            self._located = None  # the remote may have new packs since we looked
            store, located = self._connect()
        fetch_chunks(self._repo, store, missing, located)


def locate_chunks(store: RemoteStore) -> dict[bytes, PackEntry]:
    """Chunk id → its entry in some remote pack, from every pack index on the remote."""
    located: dict[bytes, PackEntry] = {}
    for name in sorted(store.pack_names()):
        for entry in store.pack_index(name)[1]:
            located.setdefault(entry.chunk_id, entry)
    return located


def _needed_entries(repo: Repo, missing: set[bytes], located: dict[bytes, PackEntry], where: str) -> list[PackEntry]:
    """The remote entries of ``missing`` and of their delta bases that are not local either."""
    wanted: dict[bytes, PackEntry] = {}
    frontier = list(missing)
    while frontier:
        chunk_id = frontier.pop()
        if chunk_id in wanted:
            continue
        entry = located.get(chunk_id)
        if entry is None:
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()} is neither local nor in any pack on the remote",
                                 chunk_id=chunk_id.hex())
        wanted[chunk_id] = entry
        if entry.base is not None and entry.base not in wanted and repo.chunks.index.get(entry.base) is None:
            frontier.append(entry.base)
    return sorted(wanted.values(), key=lambda e: (e.pack, e.offset))


def _ranges(entries: list[PackEntry]) -> list[list[PackEntry]]:
    """Entries grouped into runs that one ranged read of their pack covers."""
    runs: list[list[PackEntry]] = []
    for entry in entries:
        if runs and runs[-1][0].pack == entry.pack and _start(entry) - _end(runs[-1][-1]) <= _COALESCE_GAP:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _start(entry: PackEntry) -> int:
    return entry.offset + entry.stored_len - entry_size(entry)


def _end(entry: PackEntry) -> int:
    return entry.offset + entry.stored_len


def read_run(store: RemoteStore, run: list[PackEntry]) -> bytes:
    """The bytes of a run of neighbouring entries of one remote pack (from :func:`_ranges`), in one
    ranged read; a failed read is one StorageError line."""
    start, end = _start(run[0]), _end(run[-1])
    try:
        reader = store.backend.open_reader(pack_key(run[0].pack))
        try:
            return reader.read(start, end - start)
        finally:
            reader.close()
    except OSError as err:
        raise StorageError(f"{store.describe()}: reading pack {run[0].pack} failed: {err}") from None


def fetch_chunks(repo: Repo, store: RemoteStore, missing: set[bytes], located: dict[bytes, PackEntry],
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Make ``missing`` chunks local from the remote by ranged reads; returns bytes read."""
    entries = _needed_entries(repo, missing, located, store.describe())
    received = 0
    with repo._lock.hold(exclusive=False):
        repo.chunks.index.refresh()
        writer = PackWriter(repo.root / "tmp", repo.root / "packs")
        added: list[PackEntry] = []
        try:
            for run in _ranges(entries):
                start = _start(run[0])
                data = read_run(store, run)
                received += len(data)
                for entry in run:
                    header = data[_start(entry) - start : _start(entry) - start + ENTRY_HEADER_SIZE]
                    if header[8:12] != entry.stored_len.to_bytes(4, "little") or header[12:44] != entry.chunk_id:
                        raise CorruptObjectError(f"{store.describe()}: pack {entry.pack} does not hold chunk "
                                                 f"{entry.chunk_id.hex()} where its index says", pack=entry.pack,
                                                 chunk_id=entry.chunk_id.hex(), damaged_on_disk=True)
                    payload = data[entry.offset - start : entry.offset - start + entry.stored_len]
                    writer.add(entry.chunk_id, entry.codec, entry.raw_len, payload, entry.base)
                if progress is not None:
                    progress(received, received)
            with _fs.storage_errors(f"sealing pack {writer.name}"):
                writer.seal()
        except BaseException:
            writer.abort()
            raise
        added = list({e.chunk_id: e for e in reversed(writer.entries)}.values())
        try:
            repo.chunks.index.add(added)
            for entry in added:  # verified read path: BLAKE3 of the decoded bytes against the id
                repo.chunks.read_chunk(entry.chunk_id, describe=lambda e=entry: _describe(e, located))  # type: ignore[misc]
        except BaseException:
            with contextlib.suppress(Exception):
                repo.chunks.index.update([], added)
            repo.chunks.packs.forget(writer.name)
            with contextlib.suppress(OSError):
                os.unlink(repo.root / "packs" / f"{writer.name}.pack")
            raise
    return received


def _describe(entry: PackEntry, located: dict[bytes, PackEntry]) -> str:
    remote = located.get(entry.chunk_id)
    return f"chunk {entry.chunk_id.hex()} fetched from remote pack {remote.pack if remote else '?'}"


def _factory(repo: Repo) -> Callable[[list[bytes]], None] | None:
    name = repo.config.get("lazy_remote")
    return LazyChunkSource(repo, name) if isinstance(name, str) else None

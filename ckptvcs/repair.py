"""repair: rebuild the LMDB chunk index from the packs alone.

Packs describe themselves (docs/format.md, section 5.1), so the index is derived data.
The rebuild runs under the exclusive repository lock (no writer is adding chunks), fills
a fresh environment beside the live one, makes it durable, and only then swaps it in
(an atomic directory exchange where the filesystem has one; otherwise two renames whose
interruption the next open completes). A crash at any point leaves the old index or the
new one, never a half-built one in use. Nothing in ``packs/`` or ``objects/`` is touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import _fs
from .errors import CorruptObjectError
from .index import REBUILT_SUFFIX, open_environment, write_entries
from .pack import PackEntry, iter_pack_entries
from .store import MAX_CHAIN_LENGTH, ChunkStore

__all__ = ["RepairReport", "rebuild_index"]

_PACK_SUFFIX = ".pack"


@dataclass
class RepairReport:
    """What ``repair index`` did."""

    packs: int = 0
    chunks: int = 0  # distinct chunks in the new index
    previous_chunks: int | None = None  # entries in the old index (None: it did not open)
    damaged_packs: list[str] = field(default_factory=list)  # salvaged up to their first damage
    undecodable: int = 0  # pack entries left out: delta chains whose base is in no pack (orphans of gc)

    def summary(self) -> str:
        before = "unreadable" if self.previous_chunks is None else str(self.previous_chunks)
        text = f"rebuilt the index from {self.packs} packs: {self.chunks} chunks (the old index had {before})"
        if self.damaged_packs:
            text += f"; damaged packs, salvaged up to the damage: {', '.join(self.damaged_packs)}"
        if self.undecodable:
            text += f"; {self.undecodable} delta entries left out (their base chunk is in no pack)"
        return text


def _pack_entries(packs_dir: Path, report: RepairReport, progress: Callable[[int, int], None] | None) -> Iterator[PackEntry]:
    names = sorted(n for n in os.listdir(packs_dir) if n.endswith(_PACK_SUFFIX)) if packs_dir.is_dir() else []
    for done, name in enumerate(names, 1):
        path = packs_dir / name
        try:
            entries = list(iter_pack_entries(path))
        except CorruptObjectError:
            report.damaged_packs.append(name[: -len(_PACK_SUFFIX)])
            entries = list(iter_pack_entries(path, strict=False))
        report.packs += 1
        yield from entries
        if progress is not None:
            progress(done, len(names))


def _decodable(entries: Iterable[PackEntry], report: RepairReport) -> list[PackEntry]:
    """One entry per chunk whose delta chain resolves among the chosen entries.

    The first decodable entry of a chunk wins (a chunk stored twice by racing writers
    is valid in either pack). A delta whose base is in no pack (gc released the base
    while the dead delta stayed in a mostly live pack) is left out: its row would name
    bytes no one can read, and a commit of the same bytes would trust it.
    """
    candidates: dict[bytes, list[PackEntry]] = {}
    for entry in entries:
        candidates.setdefault(entry.chunk_id, []).append(entry)
    chosen: dict[bytes, PackEntry | None] = {}

    def choose(chunk: bytes, depth: int) -> PackEntry | None:
        if chunk not in chosen:
            chosen[chunk] = None  # a cycle resolves to nothing
            for entry in candidates.get(chunk, ()):
                base = None if entry.base is None or depth >= MAX_CHAIN_LENGTH else choose(entry.base, depth + 1)
                if entry.base is None or (base is not None and base.raw_len == entry.raw_len):
                    chosen[chunk] = entry
                    break
        return chosen[chunk]

    kept = [entry for entry in (choose(chunk, 0) for chunk in candidates) if entry is not None]
    report.undecodable = len(candidates) - len(kept)
    return kept


def rebuild_index(root: Path, store: ChunkStore, progress: Callable[[int, int], None] | None = None) -> RepairReport:
    """Rebuild ``root/index`` from ``root/packs``. The caller holds the exclusive repo lock."""
    report = RepairReport()
    index_dir = root / "index"
    try:
        report.previous_chunks = len(store.index)
    except Exception:  # StorageError, or lmdb's errors for a damaged file: rebuilding is the cure
        report.previous_chunks = None
    for leftover in [*root.glob("index.rebuild-*"), *root.glob("index.old-*")]:
        _fs.remove_tree(leftover)  # an earlier repair that was interrupted while building or swapping
    work = root / _fs.temp_name("index.rebuild-")
    with _fs.storage_errors("rebuilding the chunk index"):
        work.mkdir()
        env = open_environment(work)
        try:
            report.chunks = write_entries(env, _decodable(_pack_entries(root / "packs", report, progress), report))
            env.sync(True)
        finally:
            env.close()
        for name in os.listdir(work):
            fd = os.open(work / name, os.O_RDONLY)
            try:
                _fs.fsync_file(fd)
            finally:
                os.close(fd)
        _fs.fsync_dir(work)
        rebuilt = root / f"index{REBUILT_SUFFIX}"
        if rebuilt.exists():
            _fs.remove_tree(rebuilt)
        _fs.durable_rename(work, rebuilt)  # complete and durable: from here on, it wins
        store.close_index()
        if index_dir.exists():
            parked = root / _fs.temp_name("index.old-")
            _fs.exchange_directories(rebuilt, index_dir, parked)
            _fs.remove_tree(parked)
        else:
            _fs.durable_rename(rebuilt, index_dir)
    return report

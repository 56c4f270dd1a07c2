"""repair: rebuild the LMDB chunk index from the packs alone.

Packs describe themselves (docs/format.md, section 5.1), so the index is derived data.
The rebuild runs under the exclusive repository lock (no writer is adding chunks), fills
a fresh environment beside the live one, makes it durable, and only then swaps it in
(an atomic directory exchange where the filesystem has one; otherwise two renames whose
interruption the next open completes). A crash at any point leaves the old index or the
new one, never a half-built one in use. Nothing in ``packs/`` or ``objects/`` is touched.

A damaged pack is salvaged (docs/format.md, section 5.1): every well-formed entry header
it still holds, before and after the damage, is a candidate; a candidate is indexed only
when its payload decodes to bytes that hash to its id (or, for a delta whose base cannot
be read, when nothing proves it wrong), and only after every entry of the intact packs,
so a damaged copy of a chunk never shadows an intact one. A commit that loaded before
the rebuild therefore loads after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import _fs, codec, layout
from .backends import Backend
from .errors import CorruptObjectError
from .index import REBUILT_SUFFIX, ChunkIndex, open_environment, write_entries
from .pack import PackEntry, PackFiles, iter_backend_pack, pack_names
from .store import MAX_CHAIN_LENGTH, chunk_hash

__all__ = ["RepairReport", "rebuild_index", "RepairStore"]



class RepairStore(Protocol):
    """What a rebuild needs of the chunk store (a :class:`~ckptvcs.store.ChunkStore`): its chunk
    size (to check salvaged entries), the old index (to count it) and a way to close it
    before the new one is swapped in."""

    @property
    def chunk_size(self) -> int: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def index_dir(self) -> Path: ...

    @property
    def index(self) -> ChunkIndex: ...

    def close_index(self) -> None: ...


@dataclass
class RepairReport:
    """What ``repair index`` did."""

    packs: int = 0
    chunks: int = 0  # distinct chunks in the new index
    previous_chunks: int | None = None  # entries in the old index (None: it did not open)
    damaged_packs: list[str] = field(default_factory=list)  # salvaged around their damage
    dropped: list[str] = field(default_factory=list)  # "<pack> offset <n>": salvaged entries that failed verification
    undecodable: int = 0  # pack entries left out: delta chains whose base is in no pack (orphans of gc)

    def summary(self) -> str:
        before = "unreadable" if self.previous_chunks is None else str(self.previous_chunks)
        text = f"rebuilt the index from {self.packs} packs: {self.chunks} chunks (the old index had {before})"
        if self.damaged_packs:
            text += f"; damaged packs, salvaged around the damage: {', '.join(self.damaged_packs)}"
        if self.dropped:
            text += f"; {len(self.dropped)} damaged entr{'y' if len(self.dropped) == 1 else 'ies'} left out"
        if self.undecodable:
            text += f"; {self.undecodable} delta entries left out (their base chunk is in no pack)"
        return text


class _Wrong(Exception):
    """A salvaged entry is proven wrong: its payload does not decode to its id."""


class _Unknown(Exception):
    """A salvaged entry cannot be checked (its delta base is unavailable)."""


class _Salvage:
    """Checks the entries salvaged from damaged packs before they are indexed."""

    def __init__(self, backend: Backend, intact: dict[bytes, PackEntry], salvaged: list[PackEntry],
                 chunk_size: int) -> None:
        self.packs = PackFiles(backend)
        self.intact = intact
        self.chunk_size = chunk_size
        self.candidates: dict[bytes, list[PackEntry]] = {}
        for entry in salvaged:
            self.candidates.setdefault(entry.chunk_id, []).append(entry)
        self.verdicts: dict[tuple[str, int], str] = {}  # "ok", "wrong" or "unknown"

    def verdict(self, entry: PackEntry, depth: int = 0) -> str:
        key = (entry.pack, entry.offset)
        if key not in self.verdicts:
            self.verdicts[key] = "unknown"  # a base loop lands here: not provable either way
            try:
                self.verdicts[key] = "ok" if chunk_hash(memoryview(self.decode(entry, depth))) == entry.chunk_id else "wrong"
            except _Wrong:
                self.verdicts[key] = "wrong"
            except _Unknown:
                pass
        return self.verdicts[key]

    def decode(self, entry: PackEntry, depth: int) -> np.ndarray:
        if not 0 < entry.raw_len <= self.chunk_size:
            raise _Wrong
        base_bytes = None
        if entry.base is not None:
            base = self.base(entry.base, depth + 1) if depth < MAX_CHAIN_LENGTH else None
            if base is None:
                raise _Unknown
            try:
                base_bytes = self.decode(base, depth + 1)
            except _Wrong:
                raise _Unknown from None  # the base is bad, not necessarily this entry
        out = np.empty(entry.raw_len, dtype=np.uint8)
        try:
            codec.decode_into(entry.codec, self.packs.read_payload(entry), memoryview(out), base=base_bytes)
        except CorruptObjectError:
            raise _Wrong from None
        return out

    def base(self, chunk_id: bytes, depth: int) -> PackEntry | None:
        """An entry for a delta base: the intact one, else a salvaged one that verifies."""
        if chunk_id in self.intact:
            return self.intact[chunk_id]
        for candidate in self.candidates.get(chunk_id, ()):
            if self.verdict(candidate, depth) == "ok":
                return candidate
        return None

    def entries(self, report: RepairReport) -> Iterator[PackEntry]:
        """The salvaged entries worth indexing; the others are named in ``report.dropped``."""
        try:
            for chunk_id, candidates in self.candidates.items():
                if chunk_id in self.intact:
                    continue  # an intact copy is indexed already
                verdicts = [(self.verdict(c), c) for c in candidates]
                for verdict, candidate in verdicts:
                    if verdict == "wrong":
                        report.dropped.append(f"{candidate.pack} offset {candidate.offset}")
                kept = [c for v, c in verdicts if v == "ok"] or [c for v, c in verdicts if v == "unknown"]
                yield from kept[:1]
        finally:
            self.packs.close()


def _pack_entries(backend: Backend, report: RepairReport, progress: Callable[[int, int], None] | None,
                  chunk_size: int) -> Iterator[PackEntry]:
    """Entries of the intact packs, then the verified entries salvaged from damaged ones."""
    names = pack_names(backend)
    intact: dict[bytes, PackEntry] = {}
    salvaged: list[PackEntry] = []
    for done, name in enumerate(names, 1):
        try:
            entries = list(iter_backend_pack(backend, name))
        except CorruptObjectError:
            report.damaged_packs.append(name)
            salvaged += iter_backend_pack(backend, name, strict=False)
            entries = []
        report.packs += 1
        for entry in entries:
            intact.setdefault(entry.chunk_id, entry)
        yield from entries
        if progress is not None:
            progress(done, len(names))
    if salvaged:
        yield from _Salvage(backend, intact, salvaged, chunk_size).entries(report)


def _decodable(entries: Iterable[PackEntry], report: RepairReport, backend: Backend | None = None) -> list[PackEntry]:
    """One entry per chunk whose delta chain resolves among the chosen entries.

    The first decodable entry of a chunk wins (a chunk stored twice by racing writers
    is valid in either pack). A delta whose base is in no pack (gc released the base
    while the dead delta stayed in a mostly live pack) is left out: its row would name
    bytes no one can read, and a commit of the same bytes would trust it. With
    ``backend``, a chunk found in several packs keeps a copy that verifies
    (:func:`_prefer_verifying`).
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

    for chunk in candidates:
        choose(chunk, 0)
    if backend is not None:
        _prefer_verifying(backend, candidates, chosen, report)
    kept = [entry for entry in chosen.values() if entry is not None]
    report.undecodable = len(candidates) - len(kept)
    return kept


def _prefer_verifying(backend: Backend, candidates: dict[bytes, list[PackEntry]],
                      chosen: dict[bytes, PackEntry | None], report: RepairReport) -> None:
    """For each chunk stored more than once, keep a copy that decodes to its id.

    Duplicates are normal after an interrupted gc or repack (the new pack sealed, the
    old one not yet deleted) and after racing writers; the copies may use different
    encodings and bases (a repack turns chains around, so the new copy of a chunk may
    name as base a chunk whose old copy names it). Each duplicated chunk is decoded
    through its chosen chain; when that fails (bit rot in it or below it), the other
    copies of it and of the chunks below it are tried, depth first, never coming back
    to a chunk already on the path (no cycle), and the first path whose every level
    hashes to its id replaces the choices along it. Only duplicated chunks are read, so
    a repository without any costs nothing.
    """
    duplicated = [c for c, found in candidates.items() if len(found) > 1 and chosen.get(c) is not None]
    if not duplicated:
        return
    packs = PackFiles(backend)
    budget = [0]

    def resolve(chunk: bytes, seen: frozenset[bytes]) -> tuple[np.ndarray, list[PackEntry]] | None:
        first = chosen.get(chunk)
        options = ([first] if first is not None else []) + [c for c in candidates.get(chunk, ()) if c != first]
        for entry in options:
            budget[0] += 1
            if budget[0] > 100_000:  # only crafted damage gets here: leave the first choice
                return None
            base_bytes: np.ndarray | None = None
            path: list[PackEntry] = []
            if entry.base is not None:
                if entry.base in seen or len(seen) > MAX_CHAIN_LENGTH:
                    continue
                below = resolve(entry.base, seen | {entry.base})
                if below is None or len(below[0]) != entry.raw_len:
                    continue
                base_bytes, path = below
            out = np.empty(entry.raw_len, dtype=np.uint8)
            try:
                codec.decode_into(entry.codec, packs.read_payload(entry), memoryview(out), base=base_bytes)
            except (CorruptObjectError, OSError):
                continue
            if chunk_hash(memoryview(out)) == entry.chunk_id:
                return out, [*path, entry]
        return None

    try:
        for chunk in duplicated:
            budget[0] = 0
            found = resolve(chunk, frozenset({chunk}))
            for entry in found[1] if found is not None else ():
                previous = chosen.get(entry.chunk_id)
                if previous != entry:
                    if previous is not None:
                        report.dropped.append(f"{previous.pack} offset {previous.offset}")
                    chosen[entry.chunk_id] = entry
    finally:
        packs.close()


def rebuild_index(root: Path, store: RepairStore, progress: Callable[[int, int], None] | None = None) -> RepairReport:
    """Rebuild ``root/index`` from ``root/packs``. The caller holds the exclusive repo lock."""
    report = RepairReport()
    index_dir = store.index_dir
    try:
        report.previous_chunks = len(store.index)
    except Exception:  # StorageError, or lmdb's errors for a damaged file: rebuilding is the cure
        report.previous_chunks = None
    for leftover in [*root.glob(layout.INDEX_REBUILD_PREFIX + "*"), *root.glob(layout.INDEX_OLD_PREFIX + "*")]:
        _fs.remove_tree(leftover)  # an earlier repair that was interrupted while building or swapping
    work = root / _fs.temp_name(layout.INDEX_REBUILD_PREFIX)
    with _fs.storage_errors("rebuilding the chunk index"):
        work.mkdir()
        env = open_environment(work)
        try:
            entries = _pack_entries(store.backend, report, progress, store.chunk_size)
            report.chunks = write_entries(env, _decodable(entries, report, store.backend))
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
            parked = root / _fs.temp_name(layout.INDEX_OLD_PREFIX)
            _fs.exchange_directories(rebuilt, index_dir, parked)
            _fs.remove_tree(parked)
        else:
            _fs.durable_rename(rebuilt, index_dir)
    return report

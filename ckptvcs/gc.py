"""Garbage collection: mark the chunks kept commits need, sweep the packs of the rest.

Mechanism only; :meth:`ckptvcs.Repo.gc` decides when (under the exclusive repository
lock, so no commit is in flight) and which commits are live. Order of a sweep, chosen so
that a crash at any point leaves every live chunk reachable through the index or, after
an index rebuild, through the packs:

1. Write the live entries of the packs being rewritten, payloads copied verbatim (no
   re-encoding), into new packs; seal them (fsync, rename, fsync dir).
2. In one index transaction: point moved chunks at their new place and drop the entries
   of chunks that are gone.
3. Only then delete the old packs (unlink, fsync dir).

Before step 1, the index rows of the live chunks are checked against the entry headers of
the packs (walked anyway): gc trusts the index to tell a live copy from a dead duplicate, so
when they disagree it deletes nothing and asks for ``repair index`` (IndexMismatchError).
Step 2 also drops the rows of dead chunks that would name undecodable bytes afterwards (a
dead delta whose base's pack is deleted): a later commit of the same bytes must not trust
them.

A crash after 1 leaves duplicate chunks (the next gc deletes the copy the index does not
use); a crash after 2 leaves old packs nothing indexes (also deleted by the next gc).
Anything in ``tmp/`` is the leftover of an interrupted commit and is removed. Loose
objects (commits, manifests, tags) are never deleted: they are small, and commit
history, pruned commits included, stays readable.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import _fs, layout
from .backends import Backend
from .errors import CkptvcsError, CorruptObjectError, IndexMismatchError
from .index import ChunkIndex
from .objects import Commit, Manifest
from .pack import PackEntry, PackFiles, PackWriter, entry_size, iter_backend_pack, pack_names, with_delta_bases
from .pack_index import index_sealed_pack
from .store import MAX_CHAIN_LENGTH, PACK_TARGET_SIZE

__all__ = [
    "GcReport", "collect_garbage", "REWRITE_DEAD_FRACTION", "COLLECTED_RULE", "GcRepository", "GcObjects", "GcChunks",
    "GcHistory",
]

COLLECTED_RULE = "gc"
"""The ``rule`` of the pruned record gc writes for an unreachable commit whose data it collected."""

REWRITE_DEAD_FRACTION = 0.5
"""A pack whose dead bytes reach this fraction of its entry bytes is rewritten."""


class GcObjects(Protocol):
    """The object graph as gc reads it (an :class:`~ckptvcs.objects.ObjectStore`): commits and
    their manifests, and a scan of every object for the unreachable commits."""

    def read_commit(self, oid: str) -> Commit: ...

    def get(self, oid: str, expected_kind: str | None = None) -> tuple[str, Any]: ...

    def peek_kind(self, oid: str) -> str | None: ...

    def __iter__(self) -> Iterator[str]: ...


class GcChunks(Protocol):
    """The chunk store as gc uses it (a :class:`~ckptvcs.store.ChunkStore`): the index, whose
    rows tell live copies from dead ones and which the sweep updates, and the open packs that
    rewritten entries are copied from (and that are forgotten before their files go)."""

    @property
    def index(self) -> ChunkIndex: ...

    @property
    def packs(self) -> PackFiles: ...


class GcHistory(Protocol):
    """Which commits gc keeps, and the records it writes before it deletes anything
    (pruned records of the commits whose data goes; expired staged records)."""

    def live_commits(self, *, expire: float | None = None) -> list[str]: ...

    def pruned(self) -> dict[str, dict[str, Any]]: ...

    def _record_collected(self, commit_ids: Iterable[str], reason: str) -> None: ...

    def _mark_collected(self, commit_ids: Iterable[str]) -> None: ...

    def _remove_staged_records(self, manifest_ids: Iterable[str]) -> None: ...


class GcRepository(GcHistory, Protocol):
    """Everything gc touches of a repository (:class:`ckptvcs.Repo` passes itself): its
    folder (``packs/`` and ``tmp/`` below it), objects, chunks and history; nothing else."""

    @property
    def root(self) -> Path: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def objects(self) -> GcObjects: ...

    @property
    def chunks(self) -> GcChunks: ...


@dataclass
class GcReport:
    """What a garbage collection did (or, with ``dry_run``, would do)."""

    dry_run: bool
    live_commits: int = 0
    pruned_commits: int = 0
    live_chunks: int = 0
    dead_chunks: int = 0
    packs_deleted: list[str] = field(default_factory=list)
    packs_rewritten: list[str] = field(default_factory=list)
    packs_written: list[str] = field(default_factory=list)
    packs_skipped: list[str] = field(default_factory=list)  # unreadable packs, left for fsck
    tmp_files_removed: int = 0
    collected_commits: list[str] = field(default_factory=list)  # unreachable commits whose data went
    staged_kept: int = 0  # staged, unpublished states whose data the staged grace keeps
    staged_expired: list[str] = field(default_factory=list)  # manifests of staged states past the grace
    stale_index_rows: int = 0  # rows of unneeded chunks dropped: undecodable chain, or no such pack entry
    pack_bytes_before: int = 0
    pack_bytes_after: int = 0
    bytes_reclaimed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _PackPlan:
    name: str
    key: str
    size: int
    keep: list[PackEntry]
    drop: list[PackEntry]  # entries whose index row (if it points here) must go
    dead_bytes: int

    @property
    def live_bytes(self) -> int:
        return sum(entry_size(e) for e in self.keep)


def live_chunk_ids(repo: GcRepository, commit_ids: Iterable[str], index: dict[bytes, PackEntry]) -> set[bytes]:
    """Chunks of the manifests of ``commit_ids``, closed over delta bases.

    Any malformed manifest raises (CorruptObjectError): gc never deletes when unsure.
    """
    return _manifest_chunk_ids(repo, {repo.objects.read_commit(cid).manifest for cid in commit_ids}, index)


def staged_chunk_ids(repo: GcRepository, manifest_ids: Iterable[str], index: dict[bytes, PackEntry]) -> set[bytes]:
    """Chunks of staged, unpublished manifests, closed over delta bases.

    A staged manifest that is missing or does not parse keeps nothing: it can never be
    published (publish reads it first), and it must not stop gc.
    """
    chunks: set[bytes] = set()
    for manifest_id in manifest_ids:
        try:
            chunks |= _manifest_chunk_ids(repo, [manifest_id], {})
        except CkptvcsError:
            continue
    return with_delta_bases(chunks, index)


def _manifest_chunk_ids(repo: GcRepository, manifest_ids: Iterable[str], index: dict[bytes, PackEntry]) -> set[bytes]:
    chunks: set[bytes] = set()
    for manifest_id in manifest_ids:
        try:
            manifest = Manifest.parse(manifest_id, repo.objects.get(manifest_id, "manifest")[1])
        except CorruptObjectError as err:
            raise CorruptObjectError(f"{err}; gc stopped without deleting anything") from None
        for blob in manifest.blobs:
            chunks.update(bytes.fromhex(c) for c in blob["chunks"])
    return with_delta_bases(chunks, index)


def _plan_pack(backend: Backend, name: str, live: set[bytes], index: dict[bytes, PackEntry]) -> _PackPlan:
    keep, drop, dead = [], [], 0
    for entry in iter_backend_pack(backend, name):
        indexed = index.get(entry.chunk_id)
        here = indexed is not None and indexed.pack == entry.pack and indexed.offset == entry.offset
        # A live chunk the index does not know is kept: never delete when unsure (and the
        # verification before any deletion refuses such an index anyway).
        if entry.chunk_id in live and (here or indexed is None):
            keep.append(entry)
        else:
            drop.append(entry)
            dead += entry_size(entry)
    key = layout.pack_key(name)
    return _PackPlan(name, key, backend.size(key) or 0, keep, drop, dead)


def _salvaged_entries(backend: Backend, name: str) -> list[PackEntry]:
    """The entries of a damaged pack before its damage (gc leaves the pack alone)."""
    try:
        return list(iter_backend_pack(backend, name, strict=False))
    except (CorruptObjectError, OSError):
        return []


def _verify_live_rows(live: set[bytes], index: dict[bytes, PackEntry], located: dict[bytes, list[PackEntry]]) -> None:
    """Refuse to sweep when the index and the packs disagree about a chunk a kept commit needs.

    The index is derived data and may be damaged (bit rot in the LMDB file). gc tells
    live copies from dead duplicates by the index, so a live chunk whose index row
    matches none of its copies in the packs (wrong pack, offset, lengths, codec or
    base; or no row at all) would have its real copy deleted as an unused duplicate.
    A live chunk in no pack at all is already lost; deleting nothing can save it, so
    it does not stop gc (fsck reports it).
    """
    bad = sorted(c for c in live if located.get(c) and index.get(c) not in located[c])
    if bad:
        raise IndexMismatchError(
            f"the chunk index disagrees with the packs about {len(bad)} chunk(s) that kept commits need "
            f"(first: chunk {bad[0].hex()}); gc stopped without deleting anything: run `ckptvcs repair index`, "
            "then gc again"
        )


def _stale_rows(
    index: dict[bytes, PackEntry], plans: list[_PackPlan], removed: list[_PackPlan], damaged: set[str], live: set[bytes]
) -> list[PackEntry]:
    """Index rows of unneeded chunks that would name unreadable bytes after this sweep.

    A dead delta in a pack that stays (mostly live) keeps its pack entry, but its base
    may sit in a pack this sweep deletes: its row would name a chain no one can decode,
    and a later commit of the same bytes would trust it and store nothing. Such rows
    go, transitively (a delta on top of a dropped row), in the sweep's index
    transaction, as do rows that match no entry of any pack (damaged or left by a lost
    pack). Rows of live chunks and rows into damaged packs (``damaged``) are left alone.
    """
    removed_names = {p.name for p in removed}
    standing: set[PackEntry] = set()  # entries whose row stays valid (moved ones are re-put as is)
    removing: set[PackEntry] = set()
    for plan in plans:
        standing.update(plan.keep)
        (removing if plan.name in removed_names else standing).update(plan.drop)
    rows: dict[bytes, PackEntry] = {}
    stale: list[PackEntry] = []
    for chunk, row in index.items():
        if chunk in live or row in standing or row.pack in damaged:
            rows[chunk] = row
        elif row not in removing:  # (rows equal to removed entries are dropped anyway)
            stale.append(row)
    decodable: dict[bytes, bool] = {}

    def resolves(chunk: bytes, depth: int) -> bool:
        if chunk not in decodable:
            row = rows.get(chunk)
            base = None if row is None or row.base is None else rows.get(row.base)
            decodable[chunk] = row is not None and (row.base is None or (
                depth < MAX_CHAIN_LENGTH and base is not None and base.raw_len == row.raw_len
                and resolves(row.base, depth + 1)
            ))
        return decodable[chunk]

    stale += [row for chunk, row in rows.items() if chunk not in live and not resolves(chunk, 0)]
    return stale


def collect_garbage(
    repo: GcRepository,
    *,
    dry_run: bool,
    rewrite_dead_fraction: float = REWRITE_DEAD_FRACTION,
    expire: float | None = None,
    only: set[str] | None = None,
    staged: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> GcReport:
    """Mark and sweep ``repo``. The caller holds the exclusive repository lock.

    ``expire``: seconds a reflog entry keeps its commits (default: the repository's);
    ``only``: collect nothing but these pruned commits' data (see :func:`select_live`);
    ``staged``: (manifests of staged states still in their grace, whose chunks are
    live; names of expired staged records, removed before anything is deleted).
    """
    report = GcReport(dry_run=dry_run)
    index = {entry.chunk_id: entry for entry in repo.chunks.index}
    staged_keep, staged_expired = staged
    staged_live = staged_chunk_ids(repo, staged_keep, index)
    selection = select_live(repo, index, expire=expire, only=only, staged_chunks=staged_live)
    live = selection.chunks | staged_live
    report.staged_kept = len(staged_keep)
    report.staged_expired = list(staged_expired)
    report.live_commits = len(selection.commits)
    report.pruned_commits = selection.pruned
    report.live_chunks = len(live)
    report.collected_commits = selection.collected

    backend = repo.backend
    plans: list[_PackPlan] = []
    located: dict[bytes, list[PackEntry]] = {}  # chunk → its entries, as the packs' own headers say
    with _fs.storage_errors("listing packs"):
        names = pack_names(backend)
    for name in names:
        try:
            plan = _plan_pack(backend, name, live, index)
        except CorruptObjectError:
            report.packs_skipped.append(name)
            report.pack_bytes_before += backend.size(layout.pack_key(name)) or 0
            entries = _salvaged_entries(backend, name)
        else:
            report.pack_bytes_before += plan.size
            report.dead_chunks += len(plan.drop)
            plans.append(plan)
            entries = plan.keep + plan.drop
        for entry in entries:
            located.setdefault(entry.chunk_id, []).append(entry)
    _verify_live_rows(live, index, located)

    delete = [p for p in plans if not p.keep]
    rewrite = [
        p for p in plans
        if p.keep and p.dead_bytes and p.dead_bytes >= rewrite_dead_fraction * (p.dead_bytes + p.live_bytes)
    ]
    report.packs_deleted = [p.name for p in delete]
    report.packs_rewritten = [p.name for p in rewrite]
    stale = _stale_rows(index, plans, delete + rewrite, set(report.packs_skipped), live)
    report.stale_index_rows = len(stale)

    local = backend.local_root()  # temporaries exist only where a backend writes files
    tmp_files = [] if local is None else _tmp_leftovers(local / layout.TMP)
    tmp_bytes = sum(size for _, size in tmp_files)
    report.tmp_files_removed = len(tmp_files)

    if dry_run:
        removed = sum(p.size for p in delete) + sum(p.dead_bytes for p in rewrite)
        report.pack_bytes_after = report.pack_bytes_before - removed
        report.bytes_reclaimed = removed + tmp_bytes
        return report

    selection.record(repo)  # before any chunk goes: a commit without its data is always on record
    repo._remove_staged_records(staged_expired)  # a publish after this fails cleanly: no record, no data

    with _fs.storage_errors("removing leftovers of interrupted commits from tmp/"):
        if local is not None:
            _remove_tmp_leftovers(local / layout.TMP, [name for name, _ in tmp_files])

    written = _copy_live_entries(repo, rewrite)
    report.packs_written = [w.name for w in written]
    moved = [e for w in written for e in w.entries]
    gone = [e for p in delete + rewrite for e in p.keep + p.drop]
    with _fs.storage_errors("updating the chunk index after gc"):
        repo.chunks.index.update(put=moved, remove=gone + stale)

    with _fs.storage_errors("deleting packs no kept commit needs"):
        for plan in delete + rewrite:
            repo.chunks.packs.forget(plan.name)
        # A store without local files has an index object beside each pack (pack_index.py).
        indexes = [layout.pack_index_key(p.name) for p in delete + rewrite] if local is None else []
        backend.delete_many([plan.key for plan in delete + rewrite] + indexes)  # one folder fsync locally

    with _fs.storage_errors("listing packs"):
        report.pack_bytes_after = sum(backend.size(layout.pack_key(name)) or 0 for name in pack_names(backend))
    report.bytes_reclaimed = report.pack_bytes_before - report.pack_bytes_after + tmp_bytes
    return report


def _open_tmp(tmp: Path) -> int | None:
    """A descriptor of the real ``tmp/`` folder, never of what a link in its place names."""
    try:
        return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptObjectError(
                f"{tmp} is not a folder (a symbolic link?); gc stopped without deleting anything"
            ) from None
        raise


def _tmp_leftovers(tmp: Path) -> list[tuple[str, int]]:
    """``(name, size)`` of the regular files directly in ``tmp/`` (links are not followed)."""
    with _fs.storage_errors("listing tmp/"):
        fd = _open_tmp(tmp)
        if fd is None:
            return []
        try:
            with os.scandir(fd) as entries:
                return [(e.name, e.stat(follow_symlinks=False).st_size)
                        for e in entries if e.is_file(follow_symlinks=False)]
        finally:
            os.close(fd)


def _remove_tmp_leftovers(tmp: Path, names: list[str]) -> None:
    """Unlink ``names`` inside the very ``tmp/`` folder they were found in (by descriptor)."""
    if not names:
        return
    fd = _open_tmp(tmp)
    if fd is None:
        return
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        _fs.fsync_file(fd)
    finally:
        os.close(fd)


def _copy_live_entries(repo: GcRepository, plans: list[_PackPlan]) -> list[PackWriter]:
    """Copy the kept entries of ``plans`` verbatim into new sealed packs."""
    sealed: list[PackWriter] = []
    writer: PackWriter | None = None
    try:
        for plan in plans:
            for entry in plan.keep:
                if writer is None:
                    with _fs.storage_errors("creating a pack for gc"):
                        writer = PackWriter(repo.backend)
                with _fs.storage_errors(f"reading pack {entry.pack}"):
                    payload = repo.chunks.packs.read_payload(entry)
                with _fs.storage_errors(f"writing pack {writer.name}"):
                    writer.add(entry.chunk_id, entry.codec, entry.raw_len, payload, base=entry.base)
                if writer.size >= PACK_TARGET_SIZE:
                    with _fs.storage_errors(f"sealing pack {writer.name}"):
                        writer.seal()
                        index_sealed_pack(writer)
                    sealed.append(writer)
                    writer = None
        if writer is not None:
            with _fs.storage_errors(f"sealing pack {writer.name}"):
                writer.seal()
                index_sealed_pack(writer)
            sealed.append(writer)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return sealed


# -- which commits are kept ------------------------------------------------------------


@dataclass
class LiveSelection:
    """What a gc keeps, and whose data it releases (recorded before anything is deleted)."""

    commits: list[str]  # commits whose data is kept
    chunks: set[bytes]  # chunks kept, closed over delta bases
    pruned: int  # commits pruned by a retention rule, on record
    collected: list[str]  # unreachable commits whose data goes now: they get a pruned record, rule "gc"
    released: list[str]  # pruned commits whose data goes now: their record gets a "collected" time

    def record(self, repo: GcHistory) -> None:
        repo._record_collected(self.collected, "no branch, tag or unexpired reflog entry reached it")
        repo._mark_collected(self.released)


def select_live(repo: GcRepository, index: dict[bytes, PackEntry], *, expire: float | None,
                only: set[str] | None, staged_chunks: set[bytes] | frozenset[bytes] = frozenset()) -> LiveSelection:
    """The live set of a gc.

    Default: the commits of :meth:`Repo.live_commits` (refs, and reflog entries younger
    than ``expire``); every other commit whose data goes is reported. With ``only`` (pruned
    commits no ref names): every other commit a ref or any reflog entry reaches, or
    pruned by someone else and not yet collected, is kept, and so is every indexed chunk
    none of the ``only`` commits lists: nothing but their data can go. ``staged_chunks``
    (kept for staged states) stay too: an unreachable commit they hold whole is not collected.
    """
    records = repo.pruned()
    pruned = sum(1 for r in records.values() if r.get("rule") != COLLECTED_RULE)
    if only is None:
        kept = repo.live_commits(expire=expire)
        chunks = live_chunk_ids(repo, kept, index)
        kept_set = set(kept)
        released = [c for c, r in records.items() if c not in kept_set and "collected" not in r]
        stays = chunks | staged_chunks
        collected = [c for c in _unrecorded_commits(repo, kept_set, records) if _data_goes(repo, c, stays)]
        return LiveSelection(kept, chunks, pruned, collected, released)
    others = [c for c, r in records.items() if c not in only and "collected" not in r]
    kept = list(dict.fromkeys(repo.live_commits(expire=math.inf) + others))
    candidates: set[bytes] = set()
    for commit_id in only:
        candidates |= _chunks_of(repo, commit_id, strict=True) or set()
    chunks = with_delta_bases(live_chunk_ids(repo, kept, index) | (set(index) - candidates), index)
    return LiveSelection(kept, chunks, pruned, [], sorted(only))


def _unrecorded_commits(repo: GcRepository, kept: set[str], records: dict[str, Any]) -> Iterator[str]:
    """Commit objects neither kept nor on record (unreachable ones), from a cheap scan."""
    for oid in repo.objects:
        if oid not in kept and oid not in records and repo.objects.peek_kind(oid) == "commit":
            try:
                repo.objects.read_commit(oid)
            except CkptvcsError:
                continue  # a damaged object: fsck reports it; nothing to record
            yield oid


def _data_goes(repo: GcRepository, commit_id: str, live: set[bytes]) -> bool:
    """Whether a commit loses a chunk (or never had a readable manifest) when ``live`` is kept."""
    listed = _chunks_of(repo, commit_id)
    return listed is None or not listed <= live


def _chunks_of(repo: GcRepository, commit_id: str, *, strict: bool = False) -> set[bytes] | None:
    """Chunk ids a commit's manifest lists; None when it does not read (with ``strict``,
    gc stops without deleting anything instead)."""
    try:
        return live_chunk_ids(repo, [commit_id], {})
    except CkptvcsError:
        if strict:
            raise
        return None

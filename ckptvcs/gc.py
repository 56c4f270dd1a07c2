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

A crash after 1 leaves duplicate chunks (the next gc deletes the copy the index does not
use); a crash after 2 leaves old packs nothing indexes (also deleted by the next gc).
Anything in ``tmp/`` is the leftover of an interrupted commit and is removed. Loose
objects (commits, manifests, tags) are never deleted: they are small, and commit
history, pruned commits included, stays readable.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _fs
from .errors import CorruptObjectError
from .objects import Manifest
from .pack import PackEntry, PackWriter, entry_size, iter_pack_entries, with_delta_bases
from .store import PACK_TARGET_SIZE

if TYPE_CHECKING:
    from .repo import Repo

__all__ = ["GcReport", "collect_garbage", "REWRITE_DEAD_FRACTION"]

REWRITE_DEAD_FRACTION = 0.5
"""A pack whose dead bytes reach this fraction of its entry bytes is rewritten."""


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
    pack_bytes_before: int = 0
    pack_bytes_after: int = 0
    bytes_reclaimed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _PackPlan:
    name: str
    path: Path
    size: int
    keep: list[PackEntry]
    drop: list[PackEntry]  # entries whose index row (if it points here) must go
    dead_bytes: int

    @property
    def live_bytes(self) -> int:
        return sum(entry_size(e) for e in self.keep)


def live_chunk_ids(repo: Repo, commit_ids: Iterable[str], index: dict[bytes, PackEntry]) -> set[bytes]:
    """Chunks of the manifests of ``commit_ids``, closed over delta bases.

    Any malformed manifest raises (CorruptObjectError): gc never deletes when unsure.
    """
    chunks: set[bytes] = set()
    for manifest_id in {repo.objects.read_commit(cid).manifest for cid in commit_ids}:
        try:
            manifest = Manifest.parse(manifest_id, repo.objects.get(manifest_id, "manifest")[1])
        except CorruptObjectError as err:
            raise CorruptObjectError(f"{err}; gc stopped without deleting anything") from None
        for blob in manifest.blobs:
            chunks.update(bytes.fromhex(c) for c in blob["chunks"])
    return with_delta_bases(chunks, index)


def _plan_pack(path: Path, live: set[bytes], index: dict[bytes, PackEntry]) -> _PackPlan:
    keep, drop, dead = [], [], 0
    for entry in iter_pack_entries(path):
        indexed = index.get(entry.chunk_id)
        here = indexed is not None and indexed.pack == entry.pack and indexed.offset == entry.offset
        # A live chunk the index does not know (damaged index) is kept: never delete when unsure.
        if entry.chunk_id in live and (here or indexed is None):
            keep.append(entry)
        else:
            drop.append(entry)
            dead += entry_size(entry)
    return _PackPlan(path.stem, path, path.stat().st_size, keep, drop, dead)


def collect_garbage(repo: Repo, *, dry_run: bool, rewrite_dead_fraction: float = REWRITE_DEAD_FRACTION) -> GcReport:
    """Mark and sweep ``repo``. The caller holds the exclusive repository lock."""
    report = GcReport(dry_run=dry_run)
    commits = repo.live_commits()
    report.live_commits = len(commits)
    report.pruned_commits = len(repo.pruned())
    index = {entry.chunk_id: entry for entry in repo.chunks.index}
    live = live_chunk_ids(repo, commits, index)
    report.live_chunks = len(live)

    packs_dir = repo.root / "packs"
    plans: list[_PackPlan] = []
    for path in sorted(packs_dir.glob("*.pack")):
        try:
            plan = _plan_pack(path, live, index)
        except CorruptObjectError:
            report.packs_skipped.append(path.stem)
            report.pack_bytes_before += path.stat().st_size
            continue
        report.pack_bytes_before += plan.size
        report.dead_chunks += len(plan.drop)
        plans.append(plan)

    delete = [p for p in plans if not p.keep]
    rewrite = [
        p for p in plans
        if p.keep and p.dead_bytes and p.dead_bytes >= rewrite_dead_fraction * (p.dead_bytes + p.live_bytes)
    ]
    report.packs_deleted = [p.name for p in delete]
    report.packs_rewritten = [p.name for p in rewrite]

    tmp_files = _tmp_leftovers(repo.root / "tmp")
    tmp_bytes = sum(size for _, size in tmp_files)
    report.tmp_files_removed = len(tmp_files)

    if dry_run:
        removed = sum(p.size for p in delete) + sum(p.dead_bytes for p in rewrite)
        report.pack_bytes_after = report.pack_bytes_before - removed
        report.bytes_reclaimed = removed + tmp_bytes
        return report

    with _fs.storage_errors("removing leftovers of interrupted commits from tmp/"):
        _remove_tmp_leftovers(repo.root / "tmp", [name for name, _ in tmp_files])

    written = _copy_live_entries(repo, rewrite)
    report.packs_written = [w.name for w in written]
    moved = [e for w in written for e in w.entries]
    gone = [e for p in delete + rewrite for e in p.keep + p.drop]
    with _fs.storage_errors("updating the chunk index after gc"):
        repo.chunks.index.update(put=moved, remove=gone)

    with _fs.storage_errors("deleting packs no kept commit needs"):
        for plan in delete + rewrite:
            repo.chunks.packs.forget(plan.name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(plan.path)
        if delete or rewrite:
            _fs.fsync_dir(packs_dir)

    report.pack_bytes_after = sum(p.stat().st_size for p in packs_dir.glob("*.pack"))
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


def _copy_live_entries(repo: Repo, plans: list[_PackPlan]) -> list[PackWriter]:
    """Copy the kept entries of ``plans`` verbatim into new sealed packs."""
    sealed: list[PackWriter] = []
    writer: PackWriter | None = None
    try:
        for plan in plans:
            for entry in plan.keep:
                if writer is None:
                    with _fs.storage_errors("creating a pack for gc"):
                        writer = PackWriter(repo.root / "tmp", repo.root / "packs")
                with _fs.storage_errors(f"reading pack {entry.pack}"):
                    payload = repo.chunks.packs.read_payload(entry)
                with _fs.storage_errors(f"writing pack {writer.name}"):
                    writer.add(entry.chunk_id, entry.codec, entry.raw_len, payload, base=entry.base)
                if writer.size >= PACK_TARGET_SIZE:
                    with _fs.storage_errors(f"sealing pack {writer.name}"):
                        writer.seal()
                    sealed.append(writer)
                    writer = None
        if writer is not None:
            with _fs.storage_errors(f"sealing pack {writer.name}"):
                writer.seal()
            sealed.append(writer)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return sealed

"""Tiers: keep the last N checkpoints (and every tag and ref tip) local, the rest only on a remote.

``archive(repo, "origin", keep_last=N)`` releases the local data of older commits once the
remote holds it, verified: each such commit must be reachable from the remote's refs (so
the remote's push protocol guarantees it complete), every chunk it needs (delta bases
included) must be listed by a remote pack index, and every one of those chunks that is
still local is read back from the remote by ranged reads and compared byte for byte with
the local entry (which the local store verifies against its id). A chunk whose remote
copy differs, or is encoded differently, keeps its commits local. Then the repository
becomes a lazy clone of that remote (loads fetch what they lack, verified), each archived
commit gets a pruned record with rule ``archived``, and gc releases their data. Loading an
archived commit fetches its chunks back transparently; history, log and diff --stat stay
local (objects are never archived).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ckptvcs import history
from ckptvcs.catalog_cache import Summaries
from ckptvcs.errors import UsageError
from ckptvcs.gc import GcReport
from ckptvcs.pack import PackEntry, with_delta_bases
from ckptvcs.remotes.config import get_remote, open_backend, set_lazy_remote
from ckptvcs.remotes.layout import RemoteStore
from ckptvcs.remotes.lazy import _ranges, _start, locate_chunks, read_run
from ckptvcs.remotes.policy import TierPolicy, get_policy
from ckptvcs.remotes.transfer import _local_parents, _manifest_chunks, _peel_local
from ckptvcs.repo import ARCHIVED_RULE

if TYPE_CHECKING:
    from ckptvcs.objects import Commit
    from ckptvcs.repo import Repo

__all__ = ["ArchiveReport", "archive", "archive_commits", "TierSummary", "TIERS", "where"]


@dataclass
class ArchiveReport:
    """``archived``: commits whose local data was released; ``kept``: kept local by the
    policy; ``not_on_remote``: older commits the remote does not hold (push first);
    ``bytes_compared``: remote bytes read to verify; ``gc``: the local gc that released them."""

    remote: str
    archived: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    not_on_remote: list[str] = field(default_factory=list)
    bytes_compared: int = 0
    gc: GcReport | None = None


def archive(repo: Repo, remote: str | None = None, *, keep_last: int | None = None,
            dry_run: bool = False) -> ArchiveReport:
    """Release the local data of commits older than the last ``keep_last`` that ``remote`` holds, verified.

    Arguments left None come from the tier policy in config.json (``ckptvcs tier set``);
    without one, ``remote`` defaults to ``origin`` and ``keep_last`` is required (UsageError)."""
    policy = get_policy(repo)
    if policy is not None and remote in (None, policy.remote):
        remote = policy.remote
        keep_last = policy.keep_local_last if keep_last is None else keep_last
    remote = "origin" if remote is None else remote
    if keep_last is None:
        raise UsageError(f"no tier policy for remote {remote!r}: give keep_last (--keep-last N), or set one with "
                         f"`ckptvcs tier set {remote} --keep-local-last N`")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise UsageError(f"keep_last must be a positive integer, got {keep_last!r}")
    commits = [c.id for c in repo.all_commits()]  # newest first
    protected = _protected(repo)
    kept = [c for c in commits if c in protected or c in commits[:keep_last]]
    report = archive_commits(repo, remote, [c for c in commits if c not in kept], dry_run=dry_run)
    report.kept = kept + report.kept
    return report


def _protected(repo: Repo) -> set[str]:
    """Commits whose data stays local: every ref tip (branches, HEAD, remote-tracking refs)
    and every tagged commit."""
    return set(repo._all_tips()) | {t.object for t in repo.tags().values()}


def archive_commits(repo: Repo, remote: str, commits: list[str], *, dry_run: bool = False) -> ArchiveReport:
    """Release the local data of ``commits`` that ``remote`` holds, verified (as :func:`archive`).

    For a caller with its own policy (the training manager's keep policy). Every ref tip
    and tagged commit among ``commits`` is kept (``kept``), as are commits already pruned
    or archived (left out); the remote's copy is checked exactly as :func:`archive` does.
    """
    cfg = get_remote(repo, remote)
    store = RemoteStore(open_backend(cfg.url, cfg.endpoint_url))
    report = ArchiveReport(store.describe())
    protected = _protected(repo)
    report.kept = [c for c in commits if c in protected]
    older = [c for c in dict.fromkeys(commits) if c not in protected and repo.pruned_record(c) is None]
    if not older:
        return report
    held = {_peel_local(repo, v) for v in store.refs().values()}
    on_remote = history.reachable(_local_parents(repo), [c for c in held if c is not None])
    report.not_on_remote = [c for c in older if c not in on_remote]
    candidates = [c for c in older if c in on_remote]
    located = locate_chunks(store)
    needs = {c: _chunks_with_bases(repo, c, located) for c in candidates}
    unverified = _unverified_chunks(repo, store, set().union(*needs.values()) if needs else set(), located, report)
    for commit_id in candidates:
        if needs[commit_id] & unverified:
            report.not_on_remote.append(commit_id)
        else:
            report.archived.append(commit_id)
    if dry_run or not report.archived:
        return report
    if repo.config.get("lazy_remote") != cfg.name:
        set_lazy_remote(repo, cfg.name)
    for commit_id in report.archived:
        repo.prune(commit_id, ARCHIVED_RULE, f"archived to remote {cfg.name} ({cfg.url})")
    report.gc = repo.gc(only=report.archived)
    return report


def _chunks_with_bases(repo: Repo, commit_id: str, located: dict[bytes, PackEntry]) -> set[bytes]:
    manifest = repo.objects.read_commit(commit_id).manifest
    return with_delta_bases(_manifest_chunks(repo.objects.get(manifest, "manifest")[1]), located)


def _unverified_chunks(repo: Repo, store: RemoteStore, chunks: set[bytes], located: dict[bytes, PackEntry],
                       report: ArchiveReport) -> set[bytes]:
    """The chunks among ``chunks`` whose remote copy is absent or not byte-identical to the local one."""
    bad = {c for c in chunks if c not in located}
    compare: list[PackEntry] = []
    for chunk_id in chunks - bad:
        local = repo.chunks.index.get(chunk_id)
        remote = located[chunk_id]
        if local is None:
            continue  # not local any more: nothing to release, nothing to compare
        if (local.codec, local.base, local.stored_len, local.raw_len) != (remote.codec, remote.base, remote.stored_len,
                                                                            remote.raw_len):
            bad.add(chunk_id)
        else:
            compare.append(remote)
    for run in _ranges(sorted(compare, key=lambda e: (e.pack, e.offset))):
        start = _start(run[0])
        data = read_run(store, run)
        report.bytes_compared += len(data)
        for entry in run:
            local = repo.chunks.index.get(entry.chunk_id)
            assert local is not None
            theirs = data[entry.offset - start : entry.offset - start + entry.stored_len]
            if bytes(repo.chunks.packs.read_payload(local)) != theirs:
                bad.add(entry.chunk_id)
            else:  # and the bytes themselves are right (decoded, BLAKE3 against the id)
                repo.chunks.read_chunk(entry.chunk_id, describe=lambda: "a chunk about to be archived")
    return bad


# -- what lives where ------------------------------------------------------------------------

TIERS = ("local_only", "local_and_remote", "remote_only", "not_fetched", "pruned")
"""``local_only``: every chunk local, on no remote this repository knows of;
``local_and_remote``: every chunk local, and reachable from a remote-tracking ref
(``refs/remotes/<name>/...``: pushed or fetched); ``remote_only``: archived (its data
only on the remote); ``not_fetched``: a lazy clone's commit with chunks not fetched yet;
``pruned``: data released with no remote copy (history only). Manifests are read only in a
lazy clone (to find what is not fetched); elsewhere a kept commit's chunks are local by the
store's invariants (``ckptvcs fsck`` checks that), so this costs what ``log`` costs."""


@dataclass
class TierSummary:
    """Which tier holds each commit (:data:`TIERS`), with counts and the remotes."""

    remotes: dict[str, str] = field(default_factory=dict)  # name → URL
    lazy_remote: str | None = None
    commits: dict[str, str] = field(default_factory=dict)  # commit id → tier
    on_remote: dict[str, list[str]] = field(default_factory=dict)  # commit id → remotes whose refs reach it
    policy: TierPolicy | None = None  # the tier policy in config.json (ckptvcs tier set)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(TIERS, 0)
        for tier in self.commits.values():
            counts[tier] += 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {"remotes": dict(self.remotes), "lazy_remote": self.lazy_remote, "counts": self.counts,
                "commits": dict(self.commits), "policy": None if self.policy is None else self.policy.to_json()}

    def line(self) -> str:
        """One line in words: ``3 local only, 2 local + remote, 4 only on the remote (archived)...``."""
        if not self.remotes:
            return f"no remotes configured; all {len(self.commits)} commit(s) live in this repository"
        words = {"local_only": "local only", "local_and_remote": "local + remote",
                 "remote_only": "only on the remote (archived)", "not_fetched": "not fetched yet (lazy)",
                 "pruned": "pruned (no copy)"}
        parts = [f"{n} {words[t]}" for t, n in self.counts.items() if n]
        policy = f"; policy: {self.policy.line()}" if self.policy is not None else ""
        return f"{', '.join(parts) or 'no commits'}; remotes: {', '.join(sorted(self.remotes))}{policy}"


def where(repo: Repo) -> TierSummary:
    """Which tier holds each commit of ``repo`` (reads refs and commits, and a lazy clone's manifests)."""
    from ckptvcs.remotes.config import list_remotes

    summary = TierSummary({n: r.url for n, r in list_remotes(repo).items()})
    lazy = repo.config.get("lazy_remote")
    summary.lazy_remote = lazy if isinstance(lazy, str) else None
    summary.policy = get_policy(repo)
    # Parents and the walk come from the commit-summary cache (catalog_cache.py): status and
    # stats print this line, and reading every commit object made them linear in the history.
    summaries = Summaries(repo.backend, repo.objects.read_commit)

    def parents(oid: str) -> list[str]:
        return list(summaries.get(oid).parents)

    for name in summary.remotes:
        tips = []
        for branch in repo.refs.names(f"remotes/{name}"):
            value = repo.refs.read_raw(f"refs/remotes/{name}/{branch}")
            tip = _peel_local(repo, value) if value else None
            if tip is not None:
                tips.append(tip)
        for commit_id in history.reachable_in_order(parents, tips):
            summary.on_remote.setdefault(commit_id, []).append(name)
    index = repo.chunks.index
    pruned = repo.pruned()
    walked = history.walk(cast("Callable[[str], Commit]", summaries.get), repo._all_tips(skip_damaged=True))
    summaries.save()
    for commit in walked:  # newest first, as Repo.all_commits
        record = pruned.get(commit.id)
        if record is not None:
            summary.commits[commit.id] = "remote_only" if record.get("rule") == ARCHIVED_RULE else "pruned"
            continue
        manifest = repo.objects.read_commit(commit.id).manifest if summary.lazy_remote else ""
        if summary.lazy_remote and index.missing(set(_manifest_chunks(repo.objects.get(manifest, "manifest")[1]))):
            summary.commits[commit.id] = "not_fetched"
        else:
            summary.commits[commit.id] = "local_and_remote" if commit.id in summary.on_remote else "local_only"
    return summary

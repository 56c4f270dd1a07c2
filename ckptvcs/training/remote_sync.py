"""Background pushes for ``CheckpointManager(remote=...)``: one worker, in order, never in the loop's way.

After each save is durable (the branch moved), the manager hands the branch to this
worker, which pushes it (``ckptvcs.remotes.push``: data, then the remote ref by
compare-and-swap) on its own thread and its own handle of the repository. Pushes run one
at a time, in save order; while one runs, at most one more waits (it pushes the branch
as it is when it starts, so it covers every save made meanwhile).

Two tiers: the manager's keep policy decides which commits leave the *local* disk; with
a remote, those commits are archived (``remotes.tiers.archive_commits``) after a push
succeeded: their data leaves only once the remote holds it, verified byte for byte. A
commit the remote does not hold yet stays local and is tried again after the next push.

Failures never stop training. A failed push is kept in ``error`` and reported as a
RuntimeWarning at the manager's next call; the next save's push retries it (it sends
everything the remote lacks). ``drain()`` waits for the queue; ``finish()`` (the
manager's ``close()``) drains, retries once when the last push failed, and raises that
error when it fails again, so a job never ends believing its checkpoints are off the
machine when they are not.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import CkptvcsError, InvalidInputError, StorageError
from ..remotes.config import add_remote, get_remote, list_remotes
from ..remotes.lazy import LazyChunkSource
from ..remotes.policy import TierPolicy, get_policy
from ..remotes.remote_gc import prune_on_remote
from ..remotes.tiers import archive_commits
from ..remotes.transfer import push

if TYPE_CHECKING:
    from ..repo import Repo

__all__ = ["RemoteSync", "resolve_remote"]


def resolve_remote(repo: Repo, remote: str) -> str:
    """The configured remote name for ``remote``: a name as is; a URL of a configured remote
    by that remote's name; another URL is added as ``origin`` (or ``origin-<hash>`` when
    ``origin`` names another URL)."""
    if not isinstance(remote, str) or not remote.strip():
        raise InvalidInputError(f"remote must be a configured remote name or a URL, got {remote!r}")
    remotes = list_remotes(repo)
    if remote in remotes:
        return remote
    if "://" not in remote and "/" not in remote:
        return get_remote(repo, remote).name  # raises RemoteNotFoundError naming the configured ones
    for cfg in remotes.values():
        if cfg.url == remote:
            return cfg.name
    name = "origin" if "origin" not in remotes else "origin-" + hashlib.sha256(remote.encode()).hexdigest()[:8]
    return add_remote(repo, name, remote).name


class RemoteSync:
    """Pushes one branch to one remote on a background thread (see the module docstring)."""

    def __init__(self, repo: Repo, remote: str, branch: str | None, keep_local_last: int | None = None) -> None:
        if branch is None:
            raise InvalidInputError("remote= needs the manager on a branch (HEAD is detached): pass branch=")
        self.name = resolve_remote(repo, remote)
        configured = get_policy(repo)
        configured = configured if configured is not None and configured.remote == self.name else None
        # The tier policy: an explicit keep_local_last overrides the configured one (prune_remote comes from config).
        self.policy: TierPolicy | None = configured if keep_local_last is None else TierPolicy(
            self.name, keep_local_last, configured.prune_remote if configured is not None else False)
        self._to_prune: list[tuple[str, str, str]] = []
        self.pruned: set[str] = set()  # pruned on both tiers by this worker
        self._repo = repo
        self._branch = branch
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._queued: Future[None] | None = None  # submitted and not started yet
        self._futures: list[Future[None]] = []
        self._to_archive: list[str] = []
        self._handle: Repo | None = None  # the worker's own handle: no Python state shared with the loop
        self._reported: BaseException | None = None
        self.error: BaseException | None = None
        self.pushed: str | None = None  # the commit the remote branch was last seen at after a push
        self.archived: list[str] = []
        self._archived: set[str] = set()

    # -- called by the manager (the loop's thread or its async-save thread) -------------------

    def archive_later(self, commit_ids: list[str]) -> None:
        """Commits the keep policy drops locally: archived after the next successful push."""
        with self._lock:  # the manager passes its whole drop list each save: skip what is archived already
            fresh = [c for c in commit_ids if c not in self._archived]
            self._to_archive = list(dict.fromkeys(self._to_archive + fresh))

    def prune_later(self, decisions: list[tuple[str, str, str]]) -> None:
        """``(commit, rule, reason)`` the keep policy drops on both tiers (the tier policy's
        ``prune_remote``): a remote prune record is written after the next successful push."""
        with self._lock:
            known = {d[0] for d in self._to_prune} | self.pruned
            self._to_prune += [d for d in decisions if d[0] not in known]

    def submit(self) -> None:
        """Queue a push of the branch (a push already waiting to start covers this one)."""
        with self._lock:
            if self._queued is not None and not self._queued.running() and not self._queued.done():
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptvcs-push")
            future = self._executor.submit(self._run)
            self._queued = future
            self._futures = [f for f in self._futures if not f.done()] + [future]

    def report(self) -> None:
        """Warn (once per failure) about a background push that failed; training goes on."""
        err = self.error
        if err is not None and err is not self._reported:
            self._reported = err
            warnings.warn(f"background push to remote {self.name!r} failed (the checkpoint is saved locally; "
                          f"the next save retries): {err}", RuntimeWarning, stacklevel=4)

    def drain(self) -> None:
        """Block until every queued push has run (their failures stay in ``error``)."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.result()  # _run never raises

    def finish(self) -> None:
        """Drain; retry once if the last push failed; raise its error if it fails again."""
        self.drain()
        if self.error is None:
            return
        self.submit()
        self.drain()
        err = self.error
        if err is None:
            return
        self._reported = err
        if isinstance(err, CkptvcsError):
            raise err
        raise StorageError(f"background push to remote {self.name!r} failed: {err}") from err

    def close(self) -> None:
        """Stop the worker (after the queue) and close its repository handle."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        with self._lock:
            to_archive, self._to_archive = self._to_archive, []
            to_prune, self._to_prune = self._to_prune, []
        try:
            repo = self._open()
            report = push(repo, self.name, [self._branch])
            ref = f"refs/heads/{self._branch}"
            self.pushed = report.updated[ref][1] if ref in report.updated else repo.refs.read_raw(ref)
            if to_archive:
                done = archive_commits(repo, self.name, to_archive)
                self.archived += done.archived
                self._archived.update(done.archived)
                if done.archived and self._repo.chunk_source is None:  # the loop's handle loads them back
                    self._repo.chunk_source = LazyChunkSource(self._repo, self.name)
                self.archive_later(done.not_on_remote)
            if to_prune:
                self._prune_both(repo, to_prune)
                to_prune = []
            self.error = None
        except Exception as err:  # reported at the next call; retried by the next push
            self.error = err
            self.archive_later(to_archive)
            self.prune_later(to_prune)

    def _prune_both(self, repo: Repo, decisions: list[tuple[str, str, str]]) -> None:
        """The tier policy's ``prune_remote``: a remote prune record (``gc --remote`` reclaims the
        data), then the local prune (an archived commit's record takes the keep rule), then a gc
        of those commits. Runs after a successful push, so the remote holds their history."""
        from ..errors import ProtectedCommitError
        from ..repo import ARCHIVED_RULE

        done = []
        for commit_id, rule, reason in decisions:
            prune_on_remote(repo, self.name, [commit_id], rule, reason)
            try:
                repo.prune(commit_id, rule, reason)
            except ProtectedCommitError:
                continue  # a ref moved onto it meanwhile: it stays (and the remote keeps it: a ref names it)
            record = repo.pruned_record(commit_id)
            if record is not None and record.get("rule") == ARCHIVED_RULE:
                repo._write_pruned_record(commit_id, rule, reason)
            done.append(commit_id)
        with self._lock:
            self.pruned.update(done)
        if done:
            repo.gc(only=done)

    def _open(self) -> Repo:
        if self._handle is None:
            from ..repo import Repo

            self._handle = Repo.open(self._repo.root)
        return self._handle

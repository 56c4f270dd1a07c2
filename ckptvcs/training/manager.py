"""CheckpointManager: checkpointing, retention and exact resume for a training loop.

The manager sits on top of :class:`ckptvcs.Repo`. Each save commits the ``state_dict()``
of every object it was given, the RNG streams, and the loop's progress (step, epoch,
metrics, training wall time) onto one branch. A save policy decides when to save; a keep
policy (retention) decides which older checkpoints to prune, and runs only after the new
commit is durable (the branch moved); both are in :mod:`ckptvcs.training.policies`.
Restore loads a commit back into the live objects in place.

With ``async_save`` the loop waits only while the state is copied to host memory; the
commit (hashing, compression, writes, ref update, retention) runs on one background
thread, at most one save in flight. A background failure is raised (AsyncSaveError) at
the next manager call.

Layout of a manager commit: the user's state keys at the top level (so
``repo.load(rev, keys=["model"])`` reads the model alone) plus one reserved key,
``"ckptvcs.manager"``, holding ``{"step", "epoch", "metrics", "wall_time", "rng"}``.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch

from .. import _validate, provenance
from .._lazy import LazyMapping
from ..errors import (
    IndexMismatchError,
    IntegrityError,
    InvalidInputError,
    KeyNotFoundError,
    LockTimeoutError,
    NotARepositoryError,
    ProtectedCommitError,
    RefExistsError,
    RepositoryDamagedError,
    StepOrderError,
)
from ..repo import ARCHIVED_RULE, Repo
from ..state import encode_state
from .async_save import BackgroundSaver
from .policies import (
    KeepPolicy,
    SaveContext,
    SavePolicy,
    check_every_n,
    check_policy_conflicts,
    prune_decisions,
    save_policy_from_keywords,
)
from .preemption import PreemptionWatcher
from .retention import CheckpointRecord, RetentionPolicy, best_value, parse_time
from .rng import capture_rng, restore_rng
from .unchanged import UnchangedTracker
from .verify_worker import BackgroundVerifier

__all__ = ["CheckpointManager", "MANAGER_KEY"]

MANAGER_KEY = "ckptvcs.manager"


class CheckpointManager:
    """Save triggers, retention, async save and exact resume for one training run.

    ``repo`` is a :class:`Repo` or a path (opened, or created when absent; the manager
    then closes it). ``state`` maps names to objects with ``state_dict()`` /
    ``load_state_dict()`` (modules, optimizers, schedulers, GradScaler, samplers, your
    own) or to plain tensors and values. Commits go to ``branch`` (default: the branch
    HEAD is on; a new branch starts at HEAD). ``gc_every=N`` (default 1; 0 disables)
    runs ``repo.gc(only=...)`` after every N saves that followed a prune (in the background with ``async_save``), so
    pruned data leaves the disk without a separate ``ckptvcs gc``; it releases only what this
    manager's retention pruned. A gc that cannot run (the repository lock busy for ``gc_lock_timeout``
    seconds, or an index gc refuses to trust) is skipped with a RuntimeWarning and tried again after
    the next save, never failing the save it follows. ``repack_every=N`` runs ``repo.repack()``
    after every N saves, so the newest checkpoint loads from keyframes (default 0, off: a repack
    holds the exclusive lock and, like gc, reads every reachable commit; with ``async_save`` it
    runs on the background worker). With
    ``save_on_preemption``, a signal that meets no ``step()`` within ``preemption_grace``
    seconds takes its course without a save. See docs/training.md for every argument.

    ``save_policy=`` and ``keep_policy=`` take policy objects (:mod:`ckptvcs.training.policies`);
    the trigger keywords (``every_steps``, ``every_seconds``, ``best_metric``) and the keep
    keywords (``keep_last``, ``keep_best``, ``keep_every_steps``, ``max_age``) are shorthands
    for them, and passing a policy with a shorthand of its family raises PolicyConflictError.

    ``reuse_unchanged`` (default True) lets a commit take the chunk ids of tensors the loop did
    not touch since this manager's last commit instead of hashing them (version counters,
    storages and optimizer step hooks say which), re-hashing a rotating ``1/reuse_check_every``
    of them at every save; a mismatch warns and turns it off for the run
    (ckptvcs.training.unchanged, docs/training.md "Unchanged tensors").

    ``remote=`` (a configured remote name, or a URL, added as ``origin``) pushes the branch
    after each save on one background worker (ckptvcs.training.remote_sync); the keep policy
    then archives what it drops (data only on the remote, verified) instead of pruning it.
    A failed push warns at the next call, sets :attr:`remote_error` and is retried by the
    next save's push; ``wait()`` drains the pushes, ``close()`` retries a failed last push
    once and raises its error if it fails again (docs/remotes.md). With a tier policy
    (``keep_local_last=N``, or ``ckptvcs tier set`` in the repository's config), the keep
    policy decides what exists on both tiers and the newest N kept checkpoints stay local,
    the other kept ones are archived; with the policy's ``prune_remote``, what the keep
    policy drops is pruned locally and on the remote (``gc --remote`` reclaims it).
    """

    gc_lock_timeout: float = 10.0
    """Seconds the automatic gc waits for the repository lock before it is skipped."""

    def __init__(
        self,
        repo: Repo | str | os.PathLike[str],
        state: Mapping[str, Any],
        branch: str | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every_steps: int | None = None,
        max_age: float | timedelta | None = None,
        async_save: bool = False,
        save_on_preemption: bool = False,
        *,
        config: Any = None,
        data_version: str | None = None,
        code_version: Mapping[str, Any] | None | bool = True,
        gc_every: int = 1,
        repack_every: int = 0,
        preemption_grace: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        save_policy: SavePolicy | None = None,
        keep_policy: KeepPolicy | None = None,
        remote: str | None = None,
        keep_local_last: int | None = None,
        verify_every: int = 0,
        verify_check: str | None = None,
        verify_timeout: float | None = None,
        reuse_unchanged: bool = True,
        reuse_check_every: int = 8,
    ) -> None:
        if not isinstance(state, Mapping) or not state:
            raise InvalidInputError("state must be a non-empty dict of name -> object, tensor or value")
        for name in state:
            if not isinstance(name, str):
                raise InvalidInputError(f"state names must be strings, got {name!r}")
            if name == MANAGER_KEY:
                raise InvalidInputError(f"state name {MANAGER_KEY!r} is reserved for the manager's own record")
            _refuse_stateless_loader(name, state[name])
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1):
            raise InvalidInputError(f"every_steps must be a positive integer, got {every_steps!r}")
        if every_seconds is not None and (isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float))
                                          or not every_seconds > 0):
            raise InvalidInputError(f"every_seconds must be a positive number, got {every_seconds!r}")
        self.gc_every = check_every_n(gc_every, "gc_every")
        # repack is off by default: its sweep reads every reachable commit
        self.repack_every = check_every_n(repack_every, "repack_every")
        self._saves_since_repack = 0
        self._saves_since_gc = 0
        self._pruned_since_gc = False
        self._pruned_by_me: set[str] = set()  # what retention pruned and no gc of ours collected yet
        self._damage_warned: frozenset[str] = frozenset()  # damage already warned about
        self.policy = RetentionPolicy(
            keep_last=keep_last, keep_best=keep_best, best_metric=best_metric, best_mode=best_mode,
            keep_every_steps=keep_every_steps, max_age=max_age,  # type: ignore[arg-type]  # it converts a timedelta
        )
        check_policy_conflicts(save_policy, keep_policy, dict(
            every_steps=every_steps, every_seconds=every_seconds, best_metric=best_metric,
            keep_last=keep_last, keep_best=keep_best, keep_every_steps=keep_every_steps, max_age=max_age,
        ))
        self.save_policy: SavePolicy | None = (
            save_policy if save_policy is not None
            else save_policy_from_keywords(every_steps, every_seconds, best_metric, best_mode)
        )
        self.keep_policy: KeepPolicy | None = (
            keep_policy if keep_policy is not None else self.policy if self.policy.active else None
        )
        self._owns_repo = not isinstance(repo, Repo)
        if isinstance(repo, Repo):
            self.repo = repo
        else:
            try:
                self.repo = Repo.open(repo)
            except NotARepositoryError:
                self.repo = Repo.init(repo)
        self.state: dict[str, Any] = dict(state)
        if branch is None:
            branch = self.repo.head()[0]  # None: HEAD is detached, commit there
        self.branch = branch
        # remote=: each save is pushed in the background, and the keep policy archives instead of pruning.
        if keep_local_last is not None and remote is None:
            raise InvalidInputError("keep_local_last needs remote= (the tier the other checkpoints live on)")
        self._remote = _remote_sync(self.repo, remote, branch, keep_local_last) if remote is not None else None
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.async_save = bool(async_save)
        self._commit_options = {
            "config": config,
            "data_version": data_version,
            # Captured once: one git call per run, not per save.
            "code_version": provenance.code_version() if code_version is True else code_version,
        }
        self._clock = clock
        self._started = clock()
        self._wall_offset = 0.0
        self._last_save_clock = self._started
        self._last_saved_step: int | None = None
        self._branch_floor: int | None = None  # the branch head's step (read at the first call)
        self._branch_floor_read = False
        self._current_step: int | None = None
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}
        self.resumed_from: str | None = None
        self.last_commit: str | None = None
        self._bests: dict[tuple[str, str], float | None] = {}  # (metric, mode) -> best saved on the branch
        self._records: list[CheckpointRecord] = []  # first-parent history of the branch, newest first
        self._other_tips: frozenset[str] | None = None
        self._other_history: set[str] = set()
        self._saver = BackgroundSaver()
        # verify_every=N: every N-th commit restored and checked in a fresh process, in the background.
        if (verify_check is not None or verify_timeout is not None) and not verify_every:
            raise InvalidInputError("verify_check and verify_timeout need verify_every=N (verify every N-th save)")
        self._verifier = (BackgroundVerifier(self.repo, verify_every, verify_check, verify_timeout)
                          if verify_every else None)
        self._unchanged = _unchanged_tracker(self.state, reuse_unchanged, reuse_check_every)
        self._closed = False
        self._preemption = PreemptionWatcher(preemption_grace)
        self._on_signal = self._preemption.on_signal  # the handler installed for SIGTERM/SIGINT
        if save_on_preemption:
            self._preemption.install()

    # -- the loop's calls --------------------------------------------------------------

    def step(self, step: int, metrics: Mapping[str, float] | None = None, *, epoch: int | None = None) -> Any:
        """Report a finished training step; saves when a trigger fires.

        Returns the new commit id (with ``async_save``, a Future of it), or None when no
        trigger fired. A pending preemption signal saves now and then takes its course.
        A step lower than the last one saved on the branch raises StepOrderError.
        """
        step = self._begin_call(step, epoch)
        if self._preemption.pending is not None:
            self._preemption_save(step, metrics)
        reason = self._triggers(step, metrics)
        if not reason:
            return None
        return self._save(step, metrics, f"step {step} ({reason})", None)

    def save(
        self,
        step: int,
        metrics: Mapping[str, float] | None = None,
        message: str = "",
        tag: str | None = None,
        *,
        epoch: int | None = None,
    ) -> Any:
        """Save now, whatever the triggers say (epoch end, before a change, a release).

        ``tag`` names an annotated tag to put on the new commit (tags are never pruned).
        Returns the commit id (with ``async_save``, a Future of it). Idempotent: when the
        branch head is the commit this manager last saved or restored, at this same step,
        nothing new is committed; the tag (if any) goes onto that commit and its id is
        returned. So a finished job that runs again (re-queued) adds no duplicate commit.
        """
        step = self._begin_call(step, epoch)
        message = message or f"step {step} (explicit save)"
        existing = self._head_saved_at(step)
        if existing is not None:
            if tag is not None:
                self._tag_once(tag, existing, message)
            return existing if not self.async_save else _done(existing)
        if tag is not None:
            self._check_tag_free(tag)
        return self._save(step, metrics, message, tag)

    def _begin_call(self, step: int, epoch: int | None) -> int:
        """What step() and save() do first: refuse a closed manager, surface a failed
        background save, and record the loop's progress. Returns the validated step."""
        self._check_open()
        self._raise_background_error(wait=False)
        if self._remote is not None:
            self._remote.report()
        if self._verifier is not None:
            self._verifier.warn_failures(stacklevel=4)
        step = _step_number(step)
        self._check_step_order(step)
        self._current_step = step
        if epoch is not None:
            self.epoch = epoch
        return step

    def _check_step_order(self, step: int) -> None:
        """Refuse a step below the last one saved on the branch (or restored).

        A loop that forgot ``restore()``, or counts from 0 again, would otherwise append
        old step numbers after newer ones. Before the first save or restore of this run
        the floor is the step of the branch head.
        """
        last = self._last_saved_step
        if last is None:
            if not self._branch_floor_read:
                self._branch_floor_read = True
                head = self._branch_head()
                self._branch_floor = None if head is None else self.repo.objects.read_commit(head).step
            last = self._branch_floor
        if last is not None and step < last:
            where = f"branch {self.branch!r}" if self.branch is not None else "the detached HEAD"
            raise StepOrderError(
                f"step {step} is lower than step {last}, the last checkpoint saved on {where}; "
                "call mgr.restore() to resume from it, or mgr.restore(rev) to go back to an earlier commit "
                "(the next saves then continue from that step)", step, last,
            )

    def _head_saved_at(self, step: int) -> str | None:
        """The branch head when it is the commit this manager last saved or restored, at ``step``."""
        self._raise_background_error(wait=True)  # the save only: neither a background push nor a verification
        if self.last_commit is None or self._last_saved_step != step:
            return None
        return self.last_commit if self._branch_head() == self.last_commit else None

    def _check_tag_free(self, tag: str) -> None:
        """Refuse, before committing, a tag name that already names another commit."""
        existing = self.repo.tags().get(tag)
        if existing is not None:
            raise RefExistsError(
                f"tag {tag!r} already names commit {existing.object[:12]}; tags never move: pick another name"
            )

    def _tag_once(self, tag: str, commit_id: str, message: str) -> None:
        """Tag ``commit_id``; a tag of that name already on that commit is fine (a re-run)."""
        try:
            self.repo.tag(tag, commit_id, message=message)
        except RefExistsError:
            existing = self.repo.tags().get(tag)
            if existing is None or existing.object != commit_id:
                raise

    def restore(self, rev: str = "latest", *, map_location: Any = None, strict: bool = True) -> int | None:
        """Load a checkpoint into the live objects in place; returns its step.

        ``rev`` is ``"latest"`` (the head of the manager's branch) or any revision.
        Returns None when ``"latest"`` finds nothing to resume. Restores every object's
        state, the RNG streams, epoch, metrics and training wall time; the restored
        commit is protected from retention for the rest of the run. Objects without
        ``load_state_dict`` are updated in place (tensors copied into, dicts and lists
        refilled); immutable values are replaced in ``manager.state``. With ``strict``
        a state name missing from the checkpoint raises KeyNotFoundError. The restored
        step becomes the lowest step the next ``step()``/``save()`` accepts (an earlier
        commit restored: the run continues from there, on top of the branch head).
        """
        self._check_open()
        self._raise_background_error(wait=True)  # the save only: never a verification
        if rev == "latest":
            commit_id = self._branch_head()
            if commit_id is None:
                return None
        else:
            commit_id = self.repo.resolve(rev)
        started = time.perf_counter()
        loaded = self.repo.load(commit_id, map_location=map_location)
        load_seconds = time.perf_counter() - started
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"commit {commit_id[:12]} does not hold a dict of named states")
        missing = [name for name in self.state if name not in loaded]
        if missing and strict:
            raise KeyNotFoundError(
                f"commit {commit_id[:12]} has no state named {', '.join(map(repr, missing))} "
                f"(it has {', '.join(map(repr, (k for k in loaded if k != MANAGER_KEY)))}); pass strict=False to skip"
            )
        for name in list(self.state):
            if name in loaded:
                self._load_into(name, loaded[name])
        record = loaded.get(MANAGER_KEY)
        commit = self.repo.show(commit_id)
        if isinstance(record, dict):
            if "rng" in record:
                restore_rng(record["rng"])
            step = record.get("step")
            self.epoch = record.get("epoch")
            self.metrics = dict(record.get("metrics") or {})
            self._wall_offset = float(record.get("wall_time") or 0.0)
        else:  # a commit not made by a manager: what the commit record says
            step = commit.step
            self.epoch = commit.epoch
            self.metrics = dict(commit.metrics)
            self._wall_offset = 0.0
        if self._unchanged is not None:
            self._unchanged.forget()  # the next save hashes every byte again
        self._started = self._clock()
        self._last_save_clock = self._started
        self._last_saved_step = step
        self._branch_floor, self._branch_floor_read = step, True  # the next saves continue from here
        self._current_step = step
        self.resumed_from = commit_id
        self.last_commit = commit_id
        self._record_restore(commit_id, step, load_seconds, time.perf_counter() - started, commit)
        return step

    def _record_restore(self, commit_id: str, step: int | None, load: float, total: float, commit: Any) -> None:
        """Keep this restore's timings in ``records/restore.jsonl`` for the report (a store
        that cannot be written, read-only, just goes without)."""
        self.repo.add_record("restore", {
            "commit": commit_id,
            "branch": self.branch,
            "step": step,
            "load_seconds": round(load, 6),
            "restore_seconds": round(total, 6),
            "logical_bytes": commit.stats.get("logical_bytes"),
        })

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable, the background verifications
        (``verify_every``) are done and, with ``remote=``, every queued background push has run;
        raise the save's error if it failed (a failed push is not raised here: see :attr:`remote_error`)."""
        self._raise_background_error(wait=True)
        if self._verifier is not None:
            self._verifier.drain()
            self._verifier.warn_failures()
        if self._remote is not None:
            self._remote.drain()

    @property
    def remote_error(self) -> BaseException | None:
        """With ``remote=``: the error of the last background push, or None once a push succeeded."""
        return None if self._remote is None else self._remote.error

    @property
    def verifications(self) -> dict[str, dict[str, Any]]:
        """Commit id -> outcome of each background verification finished in this run (``verify_every``)."""
        return dict(self._verifier.results) if self._verifier is not None else {}

    def close(self) -> None:
        """Flush the save in flight, remove signal handlers, release resources. Idempotent."""
        if self._closed:
            return
        try:
            if self._preemption.pending is not None and self._current_step is not None:
                self._preemption_save(self._current_step, None)
            self.wait()
            if self._remote is not None:
                self._remote.finish()  # a last push failed: retried once, raised if it fails again
        finally:
            self._closed = True
            self._preemption.uninstall()
            self._saver.close()
            if self._unchanged is not None:
                self._unchanged.close()
            if self._verifier is not None:
                self._verifier.close()
            if self._remote is not None:
                self._remote.close()
            if self._owns_repo:
                self.repo.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as err:  # do not mask the exception that ended the block
            warnings.warn(f"while closing the checkpoint manager: {err}", RuntimeWarning, stacklevel=2)

    # -- information --------------------------------------------------------------------

    @property
    def wall_time(self) -> float:
        """Seconds of training wall time, summed over resumed runs."""
        return self._wall_offset + (self._clock() - self._started)

    @property
    def last_reuse(self) -> Any:
        """A :class:`ckptvcs.ReuseOutcome`: how many chunks the last commit took from the previous
        one without hashing them (``reuse_unchanged``), or None (hints off, or a first save)."""
        return self._unchanged.last_outcome if self._unchanged is not None else None

    @property
    def preempted(self) -> bool:
        """True once SIGTERM/SIGINT arrived and has not been handled yet."""
        return self._preemption.pending is not None

    @property
    def best(self) -> float | None:
        """The best value of ``best_metric`` saved on this branch so far."""
        return None if self.best_metric is None else self._best_of(self.best_metric, self.best_mode)

    # -- triggers ---------------------------------------------------------------------------

    def _triggers(self, step: int, metrics: Mapping[str, float] | None) -> str | None:
        """The save policy's reason to save at ``step``, or None."""
        if step == self._last_saved_step or self.save_policy is None:
            return None  # already saved (or restored) at this step, or no trigger
        ctx = SaveContext(
            step=step,
            # Coerced only when a policy reads them, as the metrics of a step that saves nothing
            # were never checked.
            metrics=LazyMapping(lambda: _plain_metrics(metrics)),
            now=self._clock(),
            last_save_step=self._last_saved_step,
            last_save_time=self._last_save_clock,
            best=self._best_of,
        )
        return self.save_policy.should_save(ctx)

    def _best_of(self, metric: str, mode: str) -> float | None:
        """The best value of ``metric`` saved on the branch (its history is read once per metric)."""
        key = (metric, mode)
        if key not in self._bests:
            self._bests[key] = None
            for record in self._history():
                self._note_best(key, record.metrics)
            if self._saver.in_flight:  # an async save that may not be on the branch yet
                self._note_best(key, self.metrics)
        return self._bests[key]

    def _note_best(self, key: tuple[str, str], metrics: Mapping[str, float]) -> None:
        value = best_value(dict(metrics), key[0])
        if value is None:
            return
        best = self._bests[key]
        if best is None or (value < best if key[1] == "min" else value > best):
            self._bests[key] = value

    # -- saving -------------------------------------------------------------------------------

    def _save(self, step: int, metrics: Mapping[str, float] | None, message: str, tag: str | None) -> Any:
        self._raise_background_error(wait=True)  # at most one save in flight
        plain = _plain_metrics(metrics)
        captured = self._capture(step, plain)
        hint = self._unchanged.capture(captured) if self._unchanged is not None else None  # live tensors, before any copy
        options = dict(
            message=message, branch=self.branch, step=step, epoch=self.epoch, metrics=plain, **self._commit_options
        )
        if not self.async_save:
            commit_id = self._commit_and_retain(captured, options, tag, hint)
            self._saved(step, plain)
            return commit_id
        snapshot = self._saver.snapshot(captured)  # the only part the loop waits for (the previous save is done)
        del captured
        encode_state(snapshot)  # refuse unsupported values here, not in the background
        future = self._saver.submit(step, self._commit_and_retain, snapshot, options, tag, hint)
        self._saved(step, plain)
        return future

    def _saved(self, step: int, metrics: dict[str, float]) -> None:
        """Trigger bookkeeping once a save is committed (sync) or handed to the background."""
        self._last_saved_step = step
        self._last_save_clock = self._clock()
        if self.best_metric is not None:
            self._best_of(self.best_metric, self.best_mode)
        for key in self._bests:
            self._note_best(key, metrics)

    def _capture(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Every object's state_dict plus the manager's record; tensors still live (no copy)."""
        captured: dict[str, Any] = {}
        for name, obj in self.state.items():
            if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, torch.Tensor):
                captured[name] = obj.state_dict()
            else:
                captured[name] = obj
        captured[MANAGER_KEY] = {
            "step": step,
            "epoch": self.epoch,
            "metrics": metrics,
            "wall_time": self.wall_time,
            "rng": capture_rng(),
        }
        self.metrics = metrics
        return captured

    def _commit_and_retain(
        self, captured: dict[str, Any], options: dict[str, Any], tag: str | None, hint: Any = None
    ) -> str:
        """Commit, tag, then apply retention: the prune decisions follow a durable commit.

        ``hint``: ``(ReuseHint or None, fingerprints)`` from the unchanged-tensor tracker.
        """
        try:
            commit_id = self.repo.commit(captured, reuse=hint[0] if hint else None, **options)
        except BaseException:
            if self._unchanged is not None:
                self._unchanged.forget()
            raise
        self.last_commit = commit_id
        if hint is not None and self._unchanged is not None:
            self._unchanged.committed(commit_id, hint[1], hint[0])
        if tag is not None:
            self._tag_once(tag, commit_id, options["message"])
        if self._verifier is not None:
            self._verifier.saved(commit_id)  # held from here: retention below cannot prune it
        if not self._retention_blocked():
            self._apply_retention()
            self._maybe_collect_garbage()
            self._maybe_repack()
        if self._remote is not None:
            self._remote.submit()
        return commit_id

    def _retention_blocked(self) -> bool:
        """True (with a warning, once per distinct damage) while a branch, tag or pruned record
        is damaged: retention and gc need them all to know what other history still needs,
        so both wait, and saves go on."""
        if self.keep_policy is None and self.gc_every == 0:
            return False
        damaged = self.repo._damaged_items()
        if damaged and frozenset(damaged) != self._damage_warned:
            warnings.warn(f"retention and gc are skipped until this is fixed: {'; '.join(damaged)}",
                          RuntimeWarning, stacklevel=4)
        self._damage_warned = frozenset(damaged)
        return bool(damaged)

    def _maybe_collect_garbage(self) -> None:
        """With ``gc_every=N``: release pruned data every N saves (only if something was pruned).

        Only the data of the commits this manager's retention pruned can go: every other
        commit (another run's, a deleted branch's, a detached HEAD's) is kept as live.
        The save is committed already: a gc that cannot run now (other processes keep
        the repository lock busy, or gc refuses a damaged index before deleting
        anything) is skipped with a warning and retried after the next save.
        """
        if self.gc_every == 0:
            return
        self._saves_since_gc += 1
        if self._saves_since_gc >= self.gc_every and self._pruned_since_gc:
            try:
                self.repo.gc(only=self._pruned_by_me, lock_timeout=self.gc_lock_timeout)
            except (LockTimeoutError, IndexMismatchError, RepositoryDamagedError) as err:
                warnings.warn(f"automatic gc skipped, the save is committed: {err}", RuntimeWarning, stacklevel=2)
                return
            self._pruned_by_me.clear()
            self._saves_since_gc = 0
            self._pruned_since_gc = False

    def _maybe_repack(self) -> None:
        """With ``repack_every=N``: after every N saves, ``repo.repack()`` so the newest
        checkpoint (the one a resume loads) is stored as keyframes (docs/format.md 12.1).

        It runs where the commit ran (the background worker with ``async_save``), after
        the commit is durable; one that cannot get the lock or refuses is skipped with a
        warning and tried again after the next save, never failing the save.
        """
        if self.repack_every == 0:
            return
        self._saves_since_repack += 1
        if self._saves_since_repack < self.repack_every:
            return
        try:
            self.repo.repack(lock_timeout=self.gc_lock_timeout)
        except (LockTimeoutError, IndexMismatchError, RepositoryDamagedError, IntegrityError) as err:
            warnings.warn(f"automatic repack skipped, the save is committed: {err}", RuntimeWarning, stacklevel=2)
            return
        self._saves_since_repack = 0

    # -- retention ------------------------------------------------------------------------------

    def _branch_head(self) -> str | None:
        if self.branch is None:
            return self.repo.head()[1]
        return self.repo.refs.read_raw(f"refs/heads/{self.branch}")

    def _history(self) -> list[CheckpointRecord]:
        """Non-pruned commits on the branch's first-parent chain, newest first (cached)."""
        head = self._branch_head()
        known = {r.id: i for i, r in enumerate(self._records)}
        if head is None:
            self._records = []
            return self._records
        if head in known:  # the branch moved back (or not at all)
            self._records = self._records[known[head]:]
            return self._records
        fresh: list[CheckpointRecord] = []
        oid: str | None = head
        # An archived commit is still a checkpoint of the run (its data on the remote): the keep
        # rules count it, so an archived best is not replaced by a worse local one.
        pruned = {c for c, r in self.repo.pruned().items() if r.get("rule") != ARCHIVED_RULE}
        while oid is not None and oid not in known:
            commit = self.repo.objects.read_commit(oid)
            if oid not in pruned:
                fresh.append(CheckpointRecord(oid, commit.step, parse_time(commit.time), dict(commit.metrics)))
            oid = commit.parents[0] if commit.parents else None
        self._records = fresh + (self._records[known[oid]:] if oid is not None else [])
        return self._records

    def _other_branches_history(self) -> set[str]:
        """Commits reachable from any other branch: that branch's history too, left alone.

        (A run started from another branch's head, or a branch forked off this run,
        shares those commits.) Cached until the other branches move.
        """
        own = f"refs/heads/{self.branch}" if self.branch is not None else None
        tips = frozenset(
            cid for name, cid in self.repo.branches().items() if f"refs/heads/{name}" != own and cid is not None
        )
        if tips != self._other_tips:
            self._other_tips = tips
            self._other_history = {c.id for c in self.repo._walk(tips)} if tips else set()
        return self._other_history

    def _protected(self) -> set[str]:
        protected = set(self.repo.branches().values())
        protected.update(t.object for t in self.repo.tags().values())
        head = self.repo.head()[1]
        if head is not None:
            protected.add(head)
        if self.resumed_from is not None:
            protected.add(self.resumed_from)
        if self.last_commit is not None:
            protected.add(self.last_commit)
        if self._verifier is not None:
            protected |= self._verifier.holding()  # a verification in flight reads its data
        return protected

    def _apply_retention(self) -> None:
        tiered = self._remote is not None and self._remote.policy is not None
        if self.keep_policy is None and not tiered:
            return
        others = self._other_branches_history()
        if self._remote is not None:  # what the worker pruned on both tiers is gone from this run
            others = others | self._remote.pruned
        records = [r for r in self._history() if r.id not in others]
        decisions = ([] if self.keep_policy is None
                     else prune_decisions(records, self.keep_policy, self._protected(), time.time()))
        if self._remote is not None:  # two tiers: archived after the push (remote copy verified), never lost
            tier = self._remote.policy
            if tier is not None:  # the newest N kept stay local; the other kept ones live on the remote
                dropping = {d.id for d in decisions}
                self._remote.archive_later([r.id for r in records if r.id not in dropping][tier.keep_local_last:])
            if tier is None or not tier.prune_remote:
                self._remote.archive_later([d.id for d in decisions])
            else:  # pruned on both tiers by the worker, after a push: the remote then holds the history
                self._remote.prune_later([(d.id, d.rule, d.reason) for d in decisions])
            return
        dropped = set()
        for decision in decisions:
            try:
                self.repo.prune(decision.id, decision.rule, decision.reason)
            except ProtectedCommitError:
                continue  # a ref moved onto it meanwhile: it stays
            dropped.add(decision.id)
        self._pruned_by_me |= dropped
        if dropped:
            self._records = [r for r in self._records if r.id not in dropped]
            self._pruned_since_gc = True

    # -- restoring -----------------------------------------------------------------------------

    def _load_into(self, name: str, value: Any) -> None:
        target = self.state[name]
        if hasattr(target, "load_state_dict") and callable(target.load_state_dict) \
                and not isinstance(target, torch.Tensor):
            target.load_state_dict(value)
            _prime_loader(target)
        elif isinstance(target, torch.Tensor):
            if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                raise InvalidInputError(f"state {name!r}: checkpoint holds {_describe(value)}, "
                                        f"the live tensor is {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)
        elif isinstance(target, dict) and isinstance(value, dict):
            target.clear()
            target.update(value)
        elif isinstance(target, list) and isinstance(value, list):
            target[:] = value
        else:
            self.state[name] = value

    # -- background errors -----------------------------------------------------------------------

    def _raise_background_error(self, *, wait: bool) -> None:
        self._saver.check(wait=wait)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this CheckpointManager is closed")

    # -- preemption -----------------------------------------------------------------------------

    @property
    def preemption_grace(self) -> float:
        """Seconds a preemption signal waits for a ``step()`` before it acts without a save."""
        return self._preemption.grace

    @preemption_grace.setter
    def preemption_grace(self, seconds: float) -> None:
        self._preemption.grace = seconds

    def _preemption_save(self, step: int, metrics: Mapping[str, float] | None) -> None:
        """Save the state at this step boundary (blocking), then let the signal take its course."""
        signum = self._preemption.take()
        try:
            if step != self._last_saved_step:
                result = self._save(step, metrics, f"step {step} (preemption: {signal.Signals(signum).name})", None)  # type: ignore[arg-type]
                if isinstance(result, Future):
                    self._raise_background_error(wait=True)  # the save only: the signal is waiting
            else:
                self._raise_background_error(wait=True)  # the save only: never a push or a verification
        finally:
            self._preemption.let_act(signum)


def _remote_sync(repo: Repo, remote: str, branch: str | None, keep_local_last: int | None) -> Any:
    """The background pusher, imported only when a remote is asked for (the remotes package stays unloaded otherwise)."""
    from .remote_sync import RemoteSync

    return RemoteSync(repo, remote, branch, keep_local_last)


def _unchanged_tracker(state: Mapping[str, Any], enabled: bool, check_every: int) -> UnchangedTracker | None:
    """The tracker of untouched tensors (``reuse_unchanged``), watching every optimizer of ``state``."""
    if not isinstance(enabled, bool):
        raise InvalidInputError(f"reuse_unchanged must be True or False, got {enabled!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise InvalidInputError(f"reuse_check_every must be an integer >= 1, got {check_every!r}")
    if not enabled:
        return None
    tracker = UnchangedTracker(check_every)
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            tracker.watch(obj)
    return tracker


def _done(value: Any) -> Future[Any]:
    """A Future already holding ``value`` (async saves return Futures, even when nothing was saved)."""
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _refuse_stateless_loader(name: str, obj: Any) -> None:
    """A plain DataLoader has no state_dict(): its position in the data cannot be saved."""
    if isinstance(obj, torch.utils.data.DataLoader) and not callable(getattr(obj, "state_dict", None)):
        raise InvalidInputError(
            f"state {name!r}: a torch.utils.data.DataLoader has no state_dict(), so its position in the data "
            "cannot be saved or restored; use torchdata.stateful_dataloader.StatefulDataLoader (a drop-in "
            "replacement, `pip install torchdata`) for an exact resume of the data order"
        )


def _prime_loader(obj: Any) -> None:
    """Build a restored data loader's iterator now, before the RNG streams are restored.

    Creating a DataLoader iterator draws a seed from the global torch RNG (unless the
    loader has its own ``generator=``). In the saved run that draw happened before the
    checkpoint; drawn after the restore it would shift every random number that follows.
    A StatefulDataLoader builds its iterator in ``state_dict()`` and reuses it at the
    next ``iter()``, so asking for its state here is enough.
    """
    if isinstance(obj, torch.utils.data.DataLoader):
        obj.state_dict()  # type: ignore[attr-defined]  # a StatefulDataLoader: a plain one was refused at save


def _step_number(step: Any) -> int:
    return _validate.require_int(step, "step")


# One metrics rule for the manager and Repo.commit (ckptvcs._validate).
_plain_metrics = _validate.metrics


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"

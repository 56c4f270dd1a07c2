"""DistributedCheckpointManager: CheckpointManager's triggers, retention and exact resume for
a job on several ranks, saving sharded states through torch.distributed.checkpoint.

Why a class of its own rather than an option of :class:`ckptvcs.training.CheckpointManager`:
that manager commits a whole state from one process (``Repo.commit``, a host snapshot for
async saves, one open Repo for the run). Here every step is a collective: the save decision
is taken once and broadcast, the save is ``dcp.save(RepoWriter)`` on every rank, and only the
coordinator reads history and prunes. What the two share is torch-free and reused as is: the
save and keep policies (:mod:`ckptvcs.training.policies`) and the RNG capture.

Decisions: **rank 0 decides and broadcasts** (one int64 per ``step()``). So every policy works,
``EverySeconds`` (clocks differ between ranks) and ``OnImprovement`` (rank 0's metric; report an
all-reduced one if the ranks' values differ) included, and the ranks can never disagree.

Commit layout: the state keys ``"model"`` and ``"optim"`` (``get_state_dict``'s sharded dicts),
the user's extra states, ``"ckptvcs.manager"`` (step and epoch, the same on every rank) and one
``"ckptvcs.rng.<rank>"`` per rank (that rank's RNG streams: restored at the same world size).
The metrics go to the commit record (rank 0's).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ckptvcs import InvalidInputError, Repo, StepOrderError
from ckptvcs.integrations.dcp import RepoLoadPlanner, RepoReader, RepoTarget, RepoWriter, _RepoHandle
from ckptvcs.training.policies import (
    KeepPolicy,
    SaveContext,
    SavePolicy,
    check_every_n,
    check_policy_conflicts,
    prune_decisions,
    save_policy_from_keywords,
)
from ckptvcs.training.retention import CheckpointRecord, RetentionPolicy, parse_time
from ckptvcs.training.rng import capture_rng, restore_rng

__all__ = ["DistributedCheckpointManager", "MANAGER_KEY", "RNG_KEY"]

MANAGER_KEY = "ckptvcs.manager"
RNG_KEY = "ckptvcs.rng"
_RESERVED = ("model", "optim", MANAGER_KEY)
_MAX_ID = 128  # bytes of a commit id (hex) broadcast by restore


class DistributedCheckpointManager:
    """Save triggers, retention and exact resume for a torch.distributed job (every rank).

    Create it on every rank with the same arguments. ``repo``: a path (ranks of one host
    sharing it), a URL such as ``s3://bucket/prefix`` with ``storage_options`` (ranks on
    several hosts), or a Backend; the repository must exist (``Repo.init`` once, beforehand).
    ``model`` / ``optimizer`` are saved with ``get_state_dict`` (FSDP2, DTensor, plain);
    ``state`` maps names to further objects with ``state_dict()``/``load_state_dict()`` or
    tensors (the same keys on every rank). The policy keywords are CheckpointManager's
    (``every_steps``, ``every_seconds``, ``best_metric``, ``keep_last``, ``keep_best``,
    ``keep_every_steps``, ``max_age``, or ``save_policy=`` / ``keep_policy=``). Retention runs
    on the coordinator only, after the commit; ``gc_every=N`` (default 1, 0 disables) then
    releases what it pruned every N saves. Saves are synchronous.
    """

    def __init__(
        self,
        repo: RepoTarget,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        state: Mapping[str, Any] | None = None,
        *,
        branch: str | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every_steps: int | None = None,
        max_age: float | None = None,
        save_policy: SavePolicy | None = None,
        keep_policy: KeepPolicy | None = None,
        gc_every: int = 1,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        config: Any = None,
        data_version: str | None = None,
        code_version: Any = True,
    ) -> None:
        if isinstance(repo, Repo):
            raise InvalidInputError("pass the repository's path or URL: every rank opens it in its own process")
        if model is None and not state:
            raise InvalidInputError("nothing to checkpoint: give a model and/or a state dict of objects")
        self.state = dict(state or {})
        for name in self.state:
            if not isinstance(name, str) or name in _RESERVED or name.startswith(RNG_KEY):
                raise InvalidInputError(f"state name {name!r} is reserved or not a string")
        if optimizer is not None and model is None:
            raise InvalidInputError("an optimizer needs its model")
        self.model, self.optimizer = model, optimizer
        self._target, self._options = repo, dict(storage_options or {})
        self._handle = _RepoHandle(repo, storage_options)
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self._src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        self.branch = branch
        check_policy_conflicts(save_policy, keep_policy, dict(
            every_steps=every_steps, every_seconds=every_seconds, best_metric=best_metric, keep_last=keep_last,
            keep_best=keep_best, keep_every_steps=keep_every_steps, max_age=max_age,
        ))
        self.save_policy = save_policy if save_policy is not None else save_policy_from_keywords(
            every_steps, every_seconds, best_metric, best_mode)
        retention = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric,
                                    best_mode=best_mode, keep_every_steps=keep_every_steps, max_age=max_age)
        self.keep_policy = keep_policy if keep_policy is not None else retention if retention.active else None
        self.gc_every = check_every_n(gc_every, "gc_every")
        self._commit_options = {"config": config, "data_version": data_version, "code_version": code_version}
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._bests: dict[tuple[str, str], float | None] = {}
        self._pruned_by_me: set[str] = set()
        self._saves_since_gc = 0
        self.epoch: int | None = None
        self.last_commit: str | None = None
        self.resumed_from: str | None = None

    # -- the loop's calls ------------------------------------------------------------------

    def step(self, step: int, metrics: Mapping[str, float] | None = None, *, epoch: int | None = None) -> str | None:
        """Report a finished step on every rank; saves (collectively) when rank 0's policy fires.

        Returns the new commit id on every rank, or None.
        """
        self._check_order(step, epoch)
        reason = self._decide(step, metrics) if self.rank == 0 else None
        if not self._broadcast_flag(reason is not None):
            return None
        return self._save(step, metrics, f"step {step} ({reason})" if reason else "")

    def save(self, step: int, metrics: Mapping[str, float] | None = None, message: str = "",
             *, epoch: int | None = None) -> str:
        """Save now on every rank (all must call it); returns the commit id."""
        self._check_order(step, epoch)
        return self._save(step, metrics, message or f"step {step} (explicit save)")

    def restore(self, rev: str = "latest") -> int | None:
        """Every rank loads its own shards of ``rev`` (``"latest"``: the branch head, as rank 0
        reads it) into the model, optimizer, states and its RNG streams; returns the step, or
        None when ``"latest"`` finds no commit. Same world size for the RNG streams."""
        commit_id = self._resolve_on_rank0(rev)
        if commit_id is None:
            return None
        rng_key = f"{RNG_KEY}.{self.rank}"
        target = self._capture()
        target[MANAGER_KEY] = {"step": 0, "epoch": None}
        target[rng_key] = capture_rng()
        dcp.load(target, storage_reader=RepoReader(self._target, commit_id, storage_options=self._options),
                 planner=RepoLoadPlanner(), process_group=self.group)
        if self.model is not None:
            set_state_dict(self.model, self.optimizer if self.optimizer is not None else [],
                           model_state_dict=target["model"], optim_state_dict=target.get("optim", {}))
        for name, obj in self.state.items():
            value = target[name]
            if callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, torch.Tensor):
                obj.load_state_dict(value)
            elif not isinstance(obj, torch.Tensor):
                self.state[name] = value  # tensors were loaded in place by dcp.load
        restore_rng(target[rng_key])
        record = target[MANAGER_KEY]
        step = record["step"]
        self.epoch = record.get("epoch")
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        self.resumed_from = self.last_commit = commit_id
        return int(step) if step is not None else None

    # -- decisions (rank 0) ------------------------------------------------------------------

    def _check_order(self, step: int, epoch: int | None) -> None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise InvalidInputError(f"step must be an integer, got {step!r}")
        last = self._last_saved_step
        if last is not None and step < last:
            raise StepOrderError(f"step {step} is lower than step {last}, the last checkpoint saved or restored",
                                 step, last)
        if epoch is not None:
            self.epoch = epoch

    def _decide(self, step: int, metrics: Mapping[str, float] | None) -> str | None:
        if step == self._last_saved_step or self.save_policy is None:
            return None
        ctx = SaveContext(step=step, metrics=dict(metrics or {}), now=time.monotonic(),
                          last_save_step=self._last_saved_step, last_save_time=self._last_save_time,
                          best=self._best_of)
        return self.save_policy.should_save(ctx)

    def _best_of(self, metric: str, mode: str) -> float | None:
        key = (metric, mode)
        if key not in self._bests:
            with self._handle.open() as repo:
                values = [r.metrics[metric] for r in self._history(repo) if metric in r.metrics]
            self._bests[key] = (min if mode == "min" else max)(values) if values else None
        return self._bests[key]

    def _broadcast_flag(self, value: bool) -> bool:
        flag = torch.tensor([1 if value else 0], dtype=torch.int64)
        dist.broadcast(flag, src=self._src, group=self.group)
        return bool(flag.item())

    def _resolve_on_rank0(self, rev: str) -> str | None:
        """The commit rank 0 resolves ``rev`` to, on every rank (its id broadcast as bytes)."""
        raw = torch.zeros(1 + _MAX_ID, dtype=torch.uint8)
        if self.rank == 0:
            with self._handle.open() as repo:
                commit_id = _branch_head(repo, self.branch) if rev == "latest" else repo.resolve(rev)
            if commit_id is not None:
                data = commit_id.encode("ascii")
                raw[0] = len(data)
                raw[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(raw, src=self._src, group=self.group)
        size = int(raw[0].item())
        return bytes(raw[1:1 + size].tolist()).decode("ascii") if size else None

    # -- saving ------------------------------------------------------------------------------

    def _capture(self) -> dict[str, Any]:
        captured: dict[str, Any] = {}
        if self.model is not None:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer if self.optimizer is not None else [])
            captured["model"] = model_sd
            if self.optimizer is not None:
                captured["optim"] = optim_sd
        for name, obj in self.state.items():
            has_sd = callable(getattr(obj, "state_dict", None)) and not isinstance(obj, torch.Tensor)
            captured[name] = obj.state_dict() if has_sd else obj
        return captured

    def _save(self, step: int, metrics: Mapping[str, float] | None, message: str) -> str:
        plain = {str(k): float(v) for k, v in (metrics or {}).items()}
        state = self._capture()
        state[MANAGER_KEY] = {"step": step, "epoch": self.epoch}
        state[f"{RNG_KEY}.{self.rank}"] = capture_rng()
        writer = RepoWriter(self._target, message=message, step=step, branch=self.branch, metrics=plain,
                            epoch=self.epoch, storage_options=self._options, **self._commit_options)
        metadata = dcp.save(state, storage_writer=writer, process_group=self.group)
        commit_id = metadata.storage_meta.save_id  # the coordinator published it before any rank got here
        self.last_commit = commit_id
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        for key in self._bests:
            value = plain.get(key[0])
            best = self._bests[key]
            if value is not None and (best is None or (value < best if key[1] == "min" else value > best)):
                self._bests[key] = value
        if self.rank == 0:
            self._retain()
        return commit_id

    # -- retention (rank 0, after the commit) ------------------------------------------------

    def _retain(self) -> None:
        if self.keep_policy is None:
            return
        with self._handle.open() as repo:
            others: set[str] = set()
            for name, tip in repo.branches().items():
                if name != (self.branch or repo.head()[0]) and tip is not None:
                    others.update(c.id for c in repo.log(tip))
            records = [r for r in self._history(repo) if r.id not in others]
            protected = set(repo.branches().values()) | {t.object for t in repo.tags().values()}
            protected |= {c for c in (repo.head()[1], self.resumed_from, self.last_commit) if c is not None}
            for decision in prune_decisions(records, self.keep_policy, protected, time.time()):
                repo.prune(decision.id, decision.rule, decision.reason)
                self._pruned_by_me.add(decision.id)
            self._saves_since_gc += 1
            if self.gc_every and self._pruned_by_me and self._saves_since_gc >= self.gc_every:
                repo.gc(only=self._pruned_by_me)
                self._pruned_by_me.clear()
                self._saves_since_gc = 0

    def _history(self, repo: Repo) -> list[CheckpointRecord]:
        """Non-pruned commits on the branch's first-parent chain, newest first."""
        pruned = repo.pruned()
        records = []
        oid = _branch_head(repo, self.branch)
        while oid is not None:
            commit = repo.show(oid)
            if oid not in pruned:
                records.append(CheckpointRecord(oid, commit.step, parse_time(commit.time), dict(commit.metrics)))
            oid = commit.parents[0] if commit.parents else None
        return records


def _branch_head(repo: Repo, branch: str | None) -> str | None:
    if branch is None:
        return repo.head()[1]
    return repo.branches().get(branch)


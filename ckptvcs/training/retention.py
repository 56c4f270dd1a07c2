"""Retention: which checkpoints of a run to keep. Pure functions over commit records.

A :class:`RetentionPolicy` combines the keep rules of the manager: the last N, the best
K by a metric, every K-th step as a milestone, and a maximum age. A checkpoint is kept
when any keep rule (``keep_last``, ``keep_best``, ``keep_every_steps``) selects it and it
is not older than ``max_age``; protected checkpoints (tagged, branch heads, the one a
run resumed from) are always kept. No policy at all keeps everything. The functions here
decide; the manager records the decision (``Repo.prune``) only after the newest
checkpoint is durable, and gc releases the data later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..errors import InvalidInputError

__all__ = ["CheckpointRecord", "RetentionPolicy", "PruneDecision", "select_prunable", "parse_time"]


@dataclass(frozen=True)
class CheckpointRecord:
    """What retention needs to know about one checkpoint."""

    id: str
    step: int | None
    time: float  # seconds since the epoch (UTC)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PruneDecision:
    """A checkpoint to prune: ``rule`` names the rule (``keep_last=3``), ``reason`` says why."""

    id: str
    rule: str
    reason: str


def parse_time(stamp: str) -> float:
    """Seconds since the epoch of a commit's ISO 8601 UTC time (``...Z``)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()


def _positive_int(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer or None, got {value!r}")
    return value


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep rules; every field None means "keep everything".

    ``max_age`` is seconds (or a ``timedelta``); ``best_mode`` is ``"min"`` or ``"max"``.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every_steps: int | None = None
    max_age: float | None = None

    def __post_init__(self) -> None:
        _positive_int(self.keep_last, "keep_last")
        _positive_int(self.keep_best, "keep_best")
        _positive_int(self.keep_every_steps, "keep_every_steps")
        if self.best_mode not in ("min", "max"):
            raise InvalidInputError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_best is not None and not self.best_metric:
            raise InvalidInputError("keep_best needs best_metric (the metric that ranks checkpoints)")
        if isinstance(self.max_age, timedelta):
            object.__setattr__(self, "max_age", self.max_age.total_seconds())
        if self.max_age is not None and (
            isinstance(self.max_age, bool) or not isinstance(self.max_age, (int, float)) or not self.max_age > 0
        ):
            raise InvalidInputError(f"max_age must be a positive number of seconds or a timedelta, got {self.max_age!r}")

    @property
    def has_keep_rules(self) -> bool:
        return any(v is not None for v in (self.keep_last, self.keep_best, self.keep_every_steps))

    @property
    def active(self) -> bool:
        return self.has_keep_rules or self.max_age is not None

    @property
    def rule(self) -> str:
        """How a prune record names these rules: ``keep_last=3,keep_best=2``, ``max_age=60s``."""
        parts = [self.keep_rule_names()] if self.has_keep_rules else []
        if self.max_age is not None:
            parts.append(f"max_age={self.max_age:g}s")
        return ",".join(parts)

    def keep(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, str]:
        """The keep-policy protocol (:mod:`ckptvcs.training.policies`): the ids these rules keep,
        each with its reason. Decided by :func:`select_prunable`."""
        dropped = {d.id for d in select_prunable(records, self, (), now)}
        why = f"kept by {self.rule}" if self.active else "no retention rule: everything is kept"
        return {r.id: why for r in records if r.id not in dropped}

    def keep_rule_names(self) -> str:
        parts = []
        if self.keep_last is not None:
            parts.append(f"keep_last={self.keep_last}")
        if self.keep_best is not None:
            parts.append(f"keep_best={self.keep_best}")
        if self.keep_every_steps is not None:
            parts.append(f"keep_every_steps={self.keep_every_steps}")
        return ",".join(parts)


def best_value(metrics: dict[str, float], metric: str | None) -> float | None:
    """The ranking value of a checkpoint, or None when it has no usable value (missing, NaN)."""
    if metric is None:
        return None
    value = metrics.get(metric)
    return None if value is None or math.isnan(value) else value


def _best_ids(records: Sequence[CheckpointRecord], policy: RetentionPolicy) -> set[str]:
    ranked = [(best_value(r.metrics, policy.best_metric), i, r.id) for i, r in enumerate(records)]
    scored = [(v, i, cid) for v, i, cid in ranked if v is not None]
    sign = 1 if policy.best_mode == "min" else -1
    # Ties go to the newer checkpoint (records are newest first: lower index).
    scored.sort(key=lambda item: (sign * item[0], item[1]))
    return {cid for _, _, cid in scored[: policy.keep_best]}


def select_prunable(
    records: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    protected: Iterable[str],
    now: float,
) -> list[PruneDecision]:
    """The checkpoints ``policy`` drops. ``records`` are newest first; ``protected`` ids never drop."""
    if not policy.active:
        return []
    guarded = set(protected)
    last_ids = {r.id for r in records[: policy.keep_last]} if policy.keep_last is not None else set()
    best_ids = _best_ids(records, policy) if policy.keep_best is not None else set()
    decisions = []
    for record in records:
        if record.id in guarded:
            continue
        age = now - record.time
        if policy.max_age is not None and age > policy.max_age:
            decisions.append(PruneDecision(
                record.id, f"max_age={policy.max_age:g}s", f"{age:.0f}s old, older than max_age {policy.max_age:g}s"
            ))
            continue
        if not policy.has_keep_rules:
            continue
        milestone = (
            policy.keep_every_steps is not None and record.step is not None
            and record.step % policy.keep_every_steps == 0
        )
        if record.id in last_ids or record.id in best_ids or milestone:
            continue
        reasons = []
        if policy.keep_last is not None:
            reasons.append(f"not among the last {policy.keep_last}")
        if policy.keep_best is not None:
            reasons.append(f"not among the best {policy.keep_best} by {policy.best_metric} ({policy.best_mode})")
        if policy.keep_every_steps is not None:
            reasons.append(f"step {record.step} is not a multiple of {policy.keep_every_steps}")
        decisions.append(PruneDecision(record.id, policy.keep_rule_names(), "; ".join(reasons)))
    return decisions

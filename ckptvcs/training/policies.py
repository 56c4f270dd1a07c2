"""Save and keep policies: small objects that decide when to save and which checkpoints to keep.

Two families, each a :class:`typing.Protocol` with one method, so any object with that
method is a policy (the manager, and trainer adapters, only call the method):

* a **save policy** answers ``should_save(ctx) -> reason | None`` for a finished step;
  ``ctx`` (:class:`SaveContext`) carries the step, its metrics, the run's clock and the last
  save. Built in: :class:`EverySteps`, :class:`EverySeconds`, :class:`OnImprovement`,
  :class:`AtSteps`; :class:`AnySave` saves when any of its policies does (the reasons of all
  that fire are joined, as in the commit message ``step 1000 (every_steps=1000, best loss)``).
* a **keep policy** answers ``keep(records, now) -> {commit id: reason}`` over a branch's
  checkpoint records (newest first, :class:`CheckpointRecord`); every record it does not keep
  may be pruned. Built in: :class:`KeepLast`, :class:`KeepBest`, :class:`KeepEverySteps`,
  :class:`KeepMaxAge`; :class:`AnyKeep` keeps what any of its policies keeps, :class:`AllKeep`
  only what all of them keep (``AllKeep(KeepMaxAge(s), AnyKeep(...))`` is the manager's
  ``max_age=`` beside other keep rules: nothing older than ``s``, whatever the rules say).

Keep policies decide; the manager prunes only after the new commit is durable, and never a
protected commit (tags, branch heads, HEAD, the commit it resumed from). The built-in keep
policies are :class:`RetentionPolicy` rules run through :func:`select_prunable`, so they decide
exactly what the manager's keywords (``keep_last=`` ...) decide, and a RetentionPolicy is itself
a keep policy. Everything here is torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, runtime_checkable

from .._validate import check_int
from ..errors import InvalidInputError, PolicyConflictError
from .retention import CheckpointRecord, PruneDecision, RetentionPolicy, best_value, select_prunable

__all__ = [
    "SaveContext",
    "SavePolicy",
    "KeepPolicy",
    "EverySteps",
    "EverySeconds",
    "OnImprovement",
    "AtSteps",
    "AnySave",
    "KeepLast",
    "KeepBest",
    "KeepEverySteps",
    "KeepMaxAge",
    "AnyKeep",
    "AllKeep",
    "prune_decisions",
    "rule_name",
    "save_policy_from_keywords",
    "check_policy_conflicts",
]


def _no_best(metric: str, mode: str) -> float | None:
    return None


@dataclass(frozen=True)
class SaveContext:
    """What a save policy sees at a finished step.

    ``now`` and ``last_save_time`` are readings of the run's clock (seconds; the manager's
    ``clock=``, monotonic by default); ``last_save_time`` is the time of the last save, or of
    the run's start or restore when nothing was saved since. ``best(metric, mode)`` is the best
    value of ``metric`` saved so far (on the manager's branch), or None.
    """

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    now: float = 0.0
    last_save_step: int | None = None
    last_save_time: float = 0.0
    best: Callable[[str, str], float | None] = _no_best

    @property
    def seconds_since_save(self) -> float:
        return self.now - self.last_save_time


@runtime_checkable
class SavePolicy(Protocol):
    """Decides whether to save at a finished step."""

    def should_save(self, ctx: SaveContext) -> str | None:
        """A short reason to save now (it goes into the commit message), or None."""
        ...


@runtime_checkable
class KeepPolicy(Protocol):
    """Decides which checkpoints of a branch to keep.

    An optional ``rule`` attribute (a short string) names the policy in the prune records;
    the class name is used otherwise.
    """

    def keep(self, records: Sequence[CheckpointRecord], now: float) -> Mapping[str, str]:
        """The ids of ``records`` (newest first) to keep, each with a reason; ``now`` is
        seconds since the epoch. Records not returned may be pruned."""
        ...


# -- validation --------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    return check_int(value, name, minimum=1, message=f"{name} must be a positive integer, got {{value}}")


def _positive_seconds(value: object, name: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInputError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _mode(mode: object) -> str:
    if mode not in ("min", "max"):
        raise InvalidInputError(f"mode must be 'min' or 'max', got {mode!r}")
    return str(mode)


def _policies(policies: tuple[object, ...], method: str, kind: str) -> tuple[object, ...]:
    if not policies:
        raise InvalidInputError(f"{kind} needs at least one policy")
    for policy in policies:
        if not callable(getattr(policy, method, None)):
            raise InvalidInputError(f"{kind}: {policy!r} has no {method}() method")
    return policies


# -- save policies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EverySteps:
    """Save at every step that is a multiple of ``n``."""

    n: int

    def __post_init__(self) -> None:
        _positive_int(self.n, "every_steps")

    def should_save(self, ctx: SaveContext) -> str | None:
        return f"every_steps={self.n}" if ctx.step % self.n == 0 else None


@dataclass(frozen=True)
class EverySeconds:
    """Save when ``seconds`` have passed on the run's clock since the last save (or start)."""

    seconds: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", _positive_seconds(self.seconds, "every_seconds"))

    def should_save(self, ctx: SaveContext) -> str | None:
        return f"every_seconds={self.seconds:g}" if ctx.seconds_since_save >= self.seconds else None


@dataclass(frozen=True)
class OnImprovement:
    """Save when ``metrics[metric]`` beats the best value saved so far (``mode`` ``"min"`` or
    ``"max"``); a missing or NaN value never saves."""

    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str):
            raise InvalidInputError(f"OnImprovement needs a metric name, got {self.metric!r}")
        _mode(self.mode)

    def should_save(self, ctx: SaveContext) -> str | None:
        value = best_value(dict(ctx.metrics), self.metric)
        if value is None:
            return None
        best = ctx.best(self.metric, self.mode)
        if best is None or (value < best if self.mode == "min" else value > best):
            return f"best {self.metric}"
        return None


@dataclass(frozen=True)
class AtSteps:
    """Save at each of the given steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        chosen = frozenset(steps)
        for step in chosen:
            if isinstance(step, bool) or not isinstance(step, int):
                raise InvalidInputError(f"AtSteps takes integer steps, got {step!r}")
        object.__setattr__(self, "steps", chosen)

    def should_save(self, ctx: SaveContext) -> str | None:
        return "at_steps" if ctx.step in self.steps else None


class AnySave:
    """Save when any of ``policies`` says so; the reason joins the reasons of all that fire."""

    def __init__(self, *policies: SavePolicy) -> None:
        self.policies: tuple[SavePolicy, ...] = _policies(policies, "should_save", "AnySave")  # type: ignore[assignment]

    def should_save(self, ctx: SaveContext) -> str | None:
        reasons = [r for r in (p.should_save(ctx) for p in self.policies) if r]
        return ", ".join(reasons) if reasons else None

    def __repr__(self) -> str:
        return f"AnySave({', '.join(map(repr, self.policies))})"


# -- keep policies ---------------------------------------------------------------------------


class _RetentionRule:
    """A keep policy that is one set of :class:`RetentionPolicy` rules."""

    retention: RetentionPolicy

    @property
    def rule(self) -> str:
        return self.retention.rule

    def keep(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, str]:
        return self.retention.keep(records, now)

    def _decisions(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, PruneDecision]:
        return {d.id: d for d in select_prunable(records, self.retention, (), now)}


@dataclass(frozen=True)
class KeepLast(_RetentionRule):
    """Keep the newest ``n`` checkpoints."""

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "retention", RetentionPolicy(keep_last=_positive_int(self.n, "keep_last")))


@dataclass(frozen=True)
class KeepBest(_RetentionRule):
    """Keep the ``n`` best checkpoints by ``metric`` (``mode`` ``"min"`` or ``"max"``; ties go
    to the newer one; a checkpoint without the metric is never among the best)."""

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        object.__setattr__(self, "retention", RetentionPolicy(
            keep_best=_positive_int(self.n, "keep_best"), best_metric=self.metric, best_mode=_mode(self.mode)))


@dataclass(frozen=True)
class KeepEverySteps(_RetentionRule):
    """Keep every checkpoint whose step is a multiple of ``n`` (milestones)."""

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "retention", RetentionPolicy(keep_every_steps=_positive_int(self.n, "keep_every_steps")))


@dataclass(frozen=True)
class KeepMaxAge(_RetentionRule):
    """Keep the checkpoints no older than ``seconds`` (a number or a ``timedelta``)."""

    seconds: float

    def __post_init__(self) -> None:
        seconds = _positive_seconds(self.seconds, "max_age")
        object.__setattr__(self, "seconds", seconds)
        object.__setattr__(self, "retention", RetentionPolicy(max_age=seconds))


class AnyKeep:
    """Keep a checkpoint when any of ``policies`` keeps it."""

    def __init__(self, *policies: KeepPolicy) -> None:
        self.policies: tuple[KeepPolicy, ...] = _policies(policies, "keep", "AnyKeep")  # type: ignore[assignment]

    @property
    def rule(self) -> str:
        return ",".join(rule_name(p) for p in self.policies)

    def keep(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, str]:
        kept: dict[str, str] = {}
        for policy in self.policies:
            for cid, why in policy.keep(records, now).items():
                kept.setdefault(cid, why)
        return kept

    def _decisions(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, PruneDecision]:
        """Dropped by every policy: one decision naming all of them (as the manager's keywords do)."""
        each = [_decisions(p, records, now) for p in self.policies]
        dropped = set.intersection(*(set(d) for d in each))
        return {cid: PruneDecision(cid, self.rule, "; ".join(d[cid].reason for d in each))
                for cid in (r.id for r in records) if cid in dropped}

    def __repr__(self) -> str:
        return f"AnyKeep({', '.join(map(repr, self.policies))})"


class AllKeep:
    """Keep a checkpoint only when every one of ``policies`` keeps it (the first policy that
    drops it names the prune)."""

    def __init__(self, *policies: KeepPolicy) -> None:
        self.policies: tuple[KeepPolicy, ...] = _policies(policies, "keep", "AllKeep")  # type: ignore[assignment]

    @property
    def rule(self) -> str:
        return "+".join(rule_name(p) for p in self.policies)

    def keep(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, str]:
        each = [policy.keep(records, now) for policy in self.policies]
        return {r.id: "; ".join(k[r.id] for k in each) for r in records if all(r.id in k for k in each)}

    def _decisions(self, records: Sequence[CheckpointRecord], now: float) -> dict[str, PruneDecision]:
        decisions: dict[str, PruneDecision] = {}
        for policy in self.policies:
            for cid, decision in _decisions(policy, records, now).items():
                decisions.setdefault(cid, decision)
        return {r.id: decisions[r.id] for r in records if r.id in decisions}

    def __repr__(self) -> str:
        return f"AllKeep({', '.join(map(repr, self.policies))})"


def rule_name(policy: object) -> str:
    """How prune records name ``policy``: its ``rule`` attribute, else its class name."""
    rule = getattr(policy, "rule", None)
    return rule if isinstance(rule, str) and rule else type(policy).__name__


def _decisions(policy: object, records: Sequence[CheckpointRecord], now: float) -> dict[str, PruneDecision]:
    """The records ``policy`` drops, each with the rule and reason a prune record stores."""
    if isinstance(policy, RetentionPolicy):
        return {d.id: d for d in select_prunable(records, policy, (), now)}
    explain = getattr(policy, "_decisions", None)
    if callable(explain):
        return dict(explain(records, now))
    kept = policy.keep(records, now)  # type: ignore[attr-defined]
    rule = rule_name(policy)
    return {r.id: PruneDecision(r.id, rule, f"not kept by {rule}") for r in records if r.id not in kept}


def prune_decisions(
    records: Sequence[CheckpointRecord], policy: object, protected: Iterable[str], now: float
) -> list[PruneDecision]:
    """The checkpoints keep ``policy`` drops, newest first; ``protected`` ids never drop.

    For a :class:`RetentionPolicy` this is :func:`select_prunable`; for any other keep
    policy, every record its ``keep()`` leaves out (built-in policies name the rule and the
    reason as the manager's keywords do).
    """
    guarded = set(protected)
    decided = _decisions(policy, records, now)
    return [decided[r.id] for r in records if r.id in decided and r.id not in guarded]


# -- the manager's keywords as policies ------------------------------------------------------

RESERVED_RULES = ("gc", "manual")  # the rules of gc's and `ckptvcs prune`'s records
SAVE_KEYWORDS = ("every_steps", "every_seconds", "best_metric")
KEEP_KEYWORDS = ("keep_last", "keep_best", "keep_every_steps", "max_age")


def check_every_n(value: object, name: str) -> int:
    """``value`` of a manager's ``<work>_every=N`` option (``gc_every``, ``repack_every``): a
    non-negative integer, 0 turning the work off; InvalidInputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative integer (0 disables), got {value!r}")
    return value


def save_policy_from_keywords(
    every_steps: int | None = None,
    every_seconds: float | None = None,
    best_metric: str | None = None,
    best_mode: str = "min",
) -> SavePolicy | None:
    """The save policy the manager's trigger keywords stand for (None: no trigger).

    ``every_steps=N, every_seconds=S, best_metric=M`` is ``AnySave(EverySteps(N),
    EverySeconds(S), OnImprovement(M, best_mode))``, in that order (the commit message lists
    the reasons in it). The keep keywords stand for ``RetentionPolicy(...)`` itself.
    """
    parts: list[SavePolicy] = []
    if every_steps is not None:
        parts.append(EverySteps(every_steps))
    if every_seconds is not None:
        parts.append(EverySeconds(every_seconds))
    if best_metric is not None:
        parts.append(OnImprovement(best_metric, best_mode))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else AnySave(*parts)


def check_policy_conflicts(save_policy: object, keep_policy: object, keywords: Mapping[str, object]) -> None:
    """Refuse an explicit policy together with a shorthand keyword of its family.

    ``best_metric`` is a save keyword (save on improvement): with ``save_policy=`` use
    ``OnImprovement(metric)`` in it, and ``KeepBest(n, metric)`` in ``keep_policy=``.
    """
    for family, policy, names, method in (("save", save_policy, SAVE_KEYWORDS, "should_save"),
                                          ("keep", keep_policy, KEEP_KEYWORDS, "keep")):
        if policy is None:
            continue
        if not callable(getattr(policy, method, None)):
            raise InvalidInputError(f"{family}_policy must have a {method}() method, got {policy!r}")
        if family == "keep" and rule_name(policy) in RESERVED_RULES:
            raise InvalidInputError(f"keep policy rule {rule_name(policy)!r} is reserved (gc and `ckptvcs prune` use it)")
        given = tuple(name for name in names if keywords.get(name) is not None)
        if given:
            hint = " (and KeepBest(n, metric) in keep_policy= for keep_best)" if "best_metric" in given else ""
            raise PolicyConflictError(
                f"{family}_policy= was given together with {', '.join(f'{n}=' for n in given)}, a shorthand for a "
                f"{family} policy: pass one or the other (put the shorthand's policy into {family}_policy, e.g. "
                f"AnySave/AnyKeep of both{hint})", family, given,
            )

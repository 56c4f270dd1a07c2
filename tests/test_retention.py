"""Retention rules as pure functions: each rule, their union, max_age, and protections."""

from __future__ import annotations

import math

import pytest

from ckptvcs import InvalidInputError, RetentionPolicy
from ckptvcs.retention import CheckpointRecord, select_prunable

NOW = 1_000_000.0


def history(n: int, losses: list[float] | None = None, age_step: float = 10.0) -> list[CheckpointRecord]:
    """Checkpoints at steps 1..n, newest first; step s is (n - s) * age_step seconds old."""
    records = []
    for s in range(n, 0, -1):
        metrics = {"loss": losses[s - 1]} if losses is not None else {}
        records.append(CheckpointRecord(f"c{s}", s, NOW - (n - s) * age_step, metrics))
    return records


def pruned_steps(records, policy, protected=()) -> list[int]:
    by_id = {r.id: r.step for r in records}
    return sorted(by_id[d.id] for d in select_prunable(records, policy, protected, NOW))


def test_no_policy_keeps_everything() -> None:
    assert pruned_steps(history(10), RetentionPolicy()) == []


def test_keep_last() -> None:
    assert pruned_steps(history(10), RetentionPolicy(keep_last=3)) == [1, 2, 3, 4, 5, 6, 7]


def test_keep_best_min_and_max() -> None:
    losses = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]
    assert pruned_steps(history(6, losses), RetentionPolicy(keep_best=2, best_metric="loss")) == [1, 3, 5, 6]
    assert pruned_steps(
        history(6, losses), RetentionPolicy(keep_best=2, best_metric="loss", best_mode="max")
    ) == [2, 4, 5, 6]


def test_keep_best_ignores_checkpoints_without_the_metric_or_nan() -> None:
    records = history(4, [1.0, math.nan, 3.0, 2.0])
    records.append(CheckpointRecord("nometric", 0, NOW - 100, {}))
    decisions = select_prunable(records, RetentionPolicy(keep_best=2, best_metric="loss"), (), NOW)
    assert sorted(d.id for d in decisions) == ["c2", "c3", "nometric"]


def test_keep_every_steps_milestones() -> None:
    assert pruned_steps(history(10), RetentionPolicy(keep_every_steps=4)) == [1, 2, 3, 5, 6, 7, 9, 10]


def test_rules_are_a_union() -> None:
    losses = [0.1, 9, 9, 9, 9, 9, 9, 9, 9, 9]
    policy = RetentionPolicy(keep_last=2, keep_best=1, best_metric="loss", keep_every_steps=5)
    assert pruned_steps(history(10, losses), policy) == [2, 3, 4, 6, 7, 8]


def test_max_age_drops_old_even_when_another_rule_keeps_it() -> None:
    records = history(10, age_step=100.0)  # step 1 is 900 s old
    assert pruned_steps(records, RetentionPolicy(max_age=450)) == [1, 2, 3, 4, 5]
    assert pruned_steps(records, RetentionPolicy(keep_last=8, max_age=450)) == [1, 2, 3, 4, 5]


def test_protected_commits_are_never_dropped() -> None:
    records = history(10, age_step=100.0)
    policy = RetentionPolicy(keep_last=1, max_age=50)
    assert pruned_steps(records, policy, protected={"c10", "c2", "c5"}) == [1, 3, 4, 6, 7, 8, 9]


def test_decision_names_the_rule_and_says_why() -> None:
    records = history(3, [1.0, 2.0, 3.0])
    (decision,) = select_prunable(records, RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss"), (), NOW)
    assert decision.id == "c2"
    assert decision.rule == "keep_last=1,keep_best=1"
    assert "not among the last 1" in decision.reason and "best 1 by loss (min)" in decision.reason
    records = history(3, age_step=1000.0)
    old = select_prunable(records, RetentionPolicy(max_age=1500), (), NOW)
    assert [(d.id, d.rule) for d in old] == [("c1", "max_age=1500s")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": 2.5},
        {"keep_every_steps": -1},
        {"keep_best": 2},  # no best_metric
        {"best_mode": "lowest", "keep_best": 1, "best_metric": "loss"},
        {"max_age": 0},
        {"max_age": "1d"},
    ],
)
def test_invalid_policies_are_refused(kwargs) -> None:
    with pytest.raises(InvalidInputError):
        RetentionPolicy(**kwargs)


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def histories_and_policies(draw):
    n = draw(st.integers(0, 30))
    steps = sorted(draw(st.lists(st.integers(0, 500), min_size=n, max_size=n, unique=True)), reverse=True)
    records = [
        CheckpointRecord(
            f"c{i}", step, NOW - draw(st.floats(0, 1000)) if i else NOW,
            {"loss": draw(st.floats(-10, 10) | st.just(math.nan))} if draw(st.booleans()) else {},
        )
        for i, step in enumerate(steps)
    ]
    policy = RetentionPolicy(
        keep_last=draw(st.none() | st.integers(1, 5)),
        keep_best=draw(st.none() | st.integers(1, 3)),
        best_metric="loss",
        best_mode=draw(st.sampled_from(["min", "max"])),
        keep_every_steps=draw(st.none() | st.integers(1, 50)),
        max_age=draw(st.none() | st.floats(1, 1000)),
    )
    protected = {r.id for r in records if draw(st.booleans()) and draw(st.booleans())}
    return records, policy, protected


@given(histories_and_policies())
def test_retention_invariants(case) -> None:
    records, policy, protected = case
    decisions = select_prunable(records, policy, protected, NOW)
    dropped = {d.id for d in decisions}
    by_id = {r.id: r for r in records}
    assert len(dropped) == len(decisions) and dropped <= set(by_id)
    assert not dropped & protected
    for record in records:
        too_old = policy.max_age is not None and NOW - record.time > policy.max_age
        if record.id in protected:
            continue
        if too_old:
            assert record.id in dropped
            continue
        if not policy.has_keep_rules:
            assert record.id not in dropped
            continue
        if policy.keep_last is not None and records.index(record) < policy.keep_last:
            assert record.id not in dropped
        if policy.keep_every_steps is not None and record.step % policy.keep_every_steps == 0:
            assert record.id not in dropped
    if policy.keep_best is not None and not policy.max_age:
        scored = [r for r in records if "loss" in r.metrics and r.metrics["loss"] == r.metrics["loss"]]
        best = sorted(scored, key=lambda r: r.metrics["loss"] * (1 if policy.best_mode == "min" else -1))
        for record in best[: policy.keep_best]:
            ties = [r for r in scored if r.metrics["loss"] == record.metrics["loss"]]
            if len(ties) == 1:
                assert record.id not in dropped

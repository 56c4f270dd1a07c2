"""Save and keep policies: each alone, composed, as the manager's keywords, and user-written."""

from __future__ import annotations

import math

import pytest
import torch

import ckptvcs
from ckptvcs import CheckpointManager, InvalidInputError, PolicyConflictError, RetentionPolicy
from ckptvcs.training.policies import (
    AllKeep,
    AnyKeep,
    AnySave,
    AtSteps,
    EverySeconds,
    EverySteps,
    KeepBest,
    KeepEverySteps,
    KeepLast,
    KeepMaxAge,
    KeepPolicy,
    OnImprovement,
    SaveContext,
    SavePolicy,
    prune_decisions,
)
from ckptvcs.training.retention import CheckpointRecord, select_prunable

NOW = 1_000_000.0


def ctx(step: int, **kwargs) -> SaveContext:
    return SaveContext(step=step, **kwargs)


def records(n: int = 10) -> list[CheckpointRecord]:
    """Steps 10..10n, newest first, one minute apart; loss goes down then up."""
    out = []
    for i in range(n, 0, -1):
        out.append(CheckpointRecord(f"c{i:02d}", 10 * i, NOW - 60.0 * (n - i), {"loss": abs(i - 4) + 0.5}))
    return out


# -- save policies alone ---------------------------------------------------------------------


def test_every_steps_fires_at_multiples() -> None:
    policy = EverySteps(5)
    assert [s for s in range(1, 16) if policy.should_save(ctx(s))] == [5, 10, 15]
    assert policy.should_save(ctx(10)) == "every_steps=5"


def test_every_seconds_reads_the_context_clock() -> None:
    policy = EverySeconds(60)
    assert policy.should_save(ctx(1, now=159.0, last_save_time=100.0)) is None
    assert policy.should_save(ctx(1, now=160.0, last_save_time=100.0)) == "every_seconds=60"


@pytest.mark.parametrize("mode, best, value, fires", [
    ("min", None, 3.0, True), ("min", 2.0, 1.5, True), ("min", 2.0, 2.0, False), ("min", 2.0, 2.5, False),
    ("max", 2.0, 2.5, True), ("max", 2.0, 1.0, False),
])
def test_on_improvement_compares_with_the_best_saved(mode, best, value, fires) -> None:
    asked = []

    def best_of(metric: str, m: str) -> float | None:
        asked.append((metric, m))
        return best

    reason = OnImprovement("val", mode).should_save(ctx(1, metrics={"val": value}, best=best_of))
    assert (reason == "best val") is fires and asked == [("val", mode)]


@pytest.mark.parametrize("metrics", [{}, {"other": 1.0}, {"val": math.nan}])
def test_on_improvement_ignores_a_missing_or_nan_value(metrics) -> None:
    assert OnImprovement("val").should_save(ctx(1, metrics=metrics)) is None


def test_at_steps_fires_at_the_listed_steps() -> None:
    policy = AtSteps([3, 7, 7])
    assert [s for s in range(10) if policy.should_save(ctx(s))] == [3, 7]


def test_any_save_joins_the_reasons_of_all_that_fire_in_order() -> None:
    policy = AnySave(EverySteps(2), EverySeconds(10), AtSteps([4]))
    assert policy.should_save(ctx(4, now=5.0)) == "every_steps=2, at_steps"
    assert policy.should_save(ctx(3, now=15.0)) == "every_seconds=10"
    assert policy.should_save(ctx(3, now=5.0)) is None


@pytest.mark.parametrize("build", [
    lambda: EverySteps(0), lambda: EverySteps(True), lambda: EverySeconds(0), lambda: EverySeconds("1"),
    lambda: OnImprovement("x", "median"), lambda: AtSteps([1.5]), lambda: AnySave(), lambda: AnySave(object()),
    lambda: KeepLast(0), lambda: KeepBest(2, "x", "up"), lambda: KeepEverySteps(-1), lambda: KeepMaxAge(0),
    lambda: AnyKeep(), lambda: AllKeep(EverySteps(1)),
])
def test_bad_arguments_are_refused(build) -> None:
    with pytest.raises(InvalidInputError):
        build()


# -- keep policies alone and composed ----------------------------------------------------------


def kept(policy, recs=None, now=NOW) -> list[int]:
    recs = records() if recs is None else recs
    ids = policy.keep(recs, now)
    return sorted(r.step for r in recs if r.id in ids)


def test_keep_policies_alone() -> None:
    assert kept(KeepLast(3)) == [80, 90, 100]
    assert kept(KeepBest(2, "loss")) == [40, 50]  # losses 0.5 and 1.5 (step 30 ties with 50: the newer wins)
    assert kept(KeepBest(1, "loss", "max")) == [100]
    assert kept(KeepEverySteps(30)) == [30, 60, 90]
    assert kept(KeepMaxAge(150)) == [80, 90, 100]  # 0, 60 and 120 seconds old


def test_any_keep_keeps_what_any_keeps_and_all_keep_what_all_keep() -> None:
    assert kept(AnyKeep(KeepLast(2), KeepEverySteps(40))) == [40, 80, 90, 100]
    assert kept(AllKeep(KeepLast(5), KeepEverySteps(20))) == [60, 80, 100]
    assert kept(AllKeep(KeepMaxAge(150), AnyKeep(KeepLast(4), KeepBest(1, "loss")))) == [80, 90, 100]


@pytest.mark.parametrize("rules, composed", [
    (dict(keep_last=3), KeepLast(3)),
    (dict(keep_last=2, keep_best=2, best_metric="loss"), AnyKeep(KeepLast(2), KeepBest(2, "loss"))),
    (dict(keep_last=1, keep_best=1, best_metric="loss", best_mode="max", keep_every_steps=30),
     AnyKeep(KeepLast(1), KeepBest(1, "loss", "max"), KeepEverySteps(30))),
    (dict(max_age=200), KeepMaxAge(200)),
    (dict(keep_last=3, max_age=100), AllKeep(KeepMaxAge(100), KeepLast(3))),
    (dict(keep_best=3, best_metric="loss", keep_every_steps=50, max_age=400),
     AllKeep(KeepMaxAge(400), AnyKeep(KeepBest(3, "loss"), KeepEverySteps(50)))),
])
def test_composed_policies_decide_as_the_retention_keywords(rules, composed) -> None:
    recs = records()
    legacy = select_prunable(recs, RetentionPolicy(**rules), {"c05"}, NOW)
    assert legacy  # the case prunes something
    assert prune_decisions(recs, composed, {"c05"}, NOW) == legacy  # same ids, rules and reasons
    assert prune_decisions(recs, RetentionPolicy(**rules), {"c05"}, NOW) == legacy


def test_retention_policy_is_a_keep_policy() -> None:
    policy = RetentionPolicy(keep_last=2)
    assert isinstance(policy, KeepPolicy) and isinstance(EverySteps(1), SavePolicy)
    assert kept(policy) == [90, 100] and policy.rule == "keep_last=2"
    assert kept(RetentionPolicy()) == list(range(10, 101, 10))  # no rule keeps everything


def test_a_user_keep_policy_is_named_by_its_rule_or_class() -> None:
    class KeepOdd:
        def keep(self, recs, now):
            return {r.id: "odd" for r in recs if (r.step // 10) % 2}

    decisions = prune_decisions(records(4), KeepOdd(), (), NOW)
    assert [(d.id, d.rule, d.reason) for d in decisions] == [
        ("c04", "KeepOdd", "not kept by KeepOdd"), ("c02", "KeepOdd", "not kept by KeepOdd")]
    mixed = prune_decisions(records(4), AnyKeep(KeepOdd(), KeepLast(1)), (), NOW)
    assert [d.id for d in mixed] == ["c02"] and mixed[0].rule == "KeepOdd,keep_last=1"


# -- in the manager ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


LOSSES = [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 2.0, 2.5, 2.4, 2.6, 1.0, 1.5]


def scripted_run(repo, **kwargs) -> tuple[list[tuple[int, str]], dict[int, tuple[str, str]]]:
    """Twelve steps, a clock tick of 25 s each, a loss that improves now and then, and one
    explicit save: (step, message) of every commit, and step -> (rule, reason) of the pruned."""
    clock = FakeClock()
    weight = torch.zeros(4)
    with CheckpointManager(repo, {"w": weight}, code_version=None, clock=clock, **kwargs) as mgr:
        for step, loss in enumerate(LOSSES, start=1):
            clock.now += 25.0
            weight += 1
            mgr.step(step, {"loss": loss})
            if step == 6:
                mgr.save(step, {"loss": loss}, message="epoch end")
    pruned = repo.pruned()
    log = [(c.step, c.message) for c in reversed(repo.log())]
    return log, {c.step: (pruned[c.id]["rule"], pruned[c.id]["reason"]) for c in repo.log() if c.id in pruned}


@pytest.mark.parametrize("keywords, policies", [
    (dict(every_steps=4), dict(save_policy=EverySteps(4))),
    (dict(every_steps=3, every_seconds=40, best_metric="loss", keep_last=2),
     dict(save_policy=AnySave(EverySteps(3), EverySeconds(40), OnImprovement("loss")), keep_policy=KeepLast(2))),
    (dict(best_metric="loss", keep_best=2, keep_every_steps=4),
     dict(save_policy=OnImprovement("loss"), keep_policy=AnyKeep(KeepBest(2, "loss"), KeepEverySteps(4)))),
    (dict(every_steps=2, best_metric="loss", best_mode="max", keep_last=1, keep_best=1),
     dict(save_policy=AnySave(EverySteps(2), OnImprovement("loss", "max")),
          keep_policy=AnyKeep(KeepLast(1), KeepBest(1, "loss", "max")))),
])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_keywords_and_explicit_policies_save_and_prune_the_same(tmp_path, keywords, policies, async_save) -> None:
    by_keywords = scripted_run(ckptvcs.Repo.init(tmp_path / "a"), async_save=async_save, **keywords)
    by_policies = scripted_run(ckptvcs.Repo.init(tmp_path / "b"), async_save=async_save, **policies)
    assert by_keywords == by_policies
    assert len(by_keywords[0]) >= 3 and bool(by_keywords[1]) == ("keep_policy" in policies)


@pytest.mark.parametrize("kwargs, family, keywords", [
    (dict(save_policy=EverySteps(2), every_steps=3), "save", ("every_steps",)),
    (dict(save_policy=EverySteps(2), every_seconds=3, best_metric="loss"), "save", ("every_seconds", "best_metric")),
    (dict(keep_policy=KeepLast(2), keep_last=3), "keep", ("keep_last",)),
    (dict(keep_policy=KeepLast(2), max_age=30), "keep", ("max_age",)),
])
def test_a_policy_and_a_shorthand_of_its_family_conflict(repo, kwargs, family, keywords) -> None:
    with pytest.raises(PolicyConflictError) as info:
        CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None, **kwargs)
    assert info.value.family == family and info.value.keywords == keywords
    assert f"{family}_policy=" in str(info.value) and isinstance(info.value, InvalidInputError)
    assert info.value.exit_code == 9


def test_policies_of_different_families_mix_with_shorthands(repo) -> None:
    mgr = CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None, every_steps=2, keep_policy=KeepLast(1))
    with mgr:
        for step in range(1, 7):
            mgr.step(step)
    assert [c.step for c in repo.log() if not c.pruned] == [6]


def test_an_object_without_the_method_is_refused(repo) -> None:
    with pytest.raises(InvalidInputError, match="should_save"):
        CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None, save_policy=object())


def test_a_keep_policy_may_not_take_a_reserved_rule_name(repo) -> None:
    class Sneaky:
        rule = "gc"

        def keep(self, recs, now):
            return {}

    with pytest.raises(InvalidInputError, match="reserved"):
        CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None, keep_policy=Sneaky())


def test_user_policies_drive_the_manager(repo) -> None:
    class SaveBelow:
        """Saves whenever the loss is under a threshold; sees the whole context."""

        def __init__(self) -> None:
            self.seen: list[SaveContext] = []

        def should_save(self, context: SaveContext) -> str | None:
            self.seen.append(context)
            return "low loss" if context.metrics.get("loss", math.inf) < 2.7 else None

    class KeepOddSteps:
        rule = "odd_steps"

        def keep(self, recs, now):
            return {r.id: "odd" for r in recs if r.step % 2}

    save = SaveBelow()
    with CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None,
                           save_policy=save, keep_policy=KeepOddSteps()) as mgr:
        for step, loss in enumerate(LOSSES, start=1):
            mgr.step(step, {"loss": loss})
    log = repo.log()
    assert [c.step for c in reversed(log)] == [7, 8, 9, 10, 11, 12]
    assert all("(low loss)" in c.message for c in log)
    # The head (a branch tip) is protected; every other even step was pruned by the user's rule.
    assert {c.step: c.pruned["rule"] for c in log if c.pruned} == {8: "odd_steps", 10: "odd_steps"}
    assert [c.step for c in save.seen] == list(range(1, 13))
    assert save.seen[8].last_save_step == 8 and save.seen[8].metrics["loss"] == 2.4


def test_a_step_that_saves_nothing_does_not_read_its_metrics(repo) -> None:
    with CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None, every_steps=5) as mgr:
        assert mgr.step(1, {"loss": "not a number"}) is None  # as before: checked only when read


def test_old_import_paths_still_work() -> None:
    import ckptvcs.manager
    import ckptvcs.retention
    import ckptvcs.rng
    import ckptvcs.snapshot
    import ckptvcs.training.manager as new

    assert ckptvcs.manager.CheckpointManager is new.CheckpointManager is ckptvcs.CheckpointManager
    assert ckptvcs.manager.MANAGER_KEY == "ckptvcs.manager"
    assert ckptvcs.retention.select_prunable is select_prunable
    assert ckptvcs.retention.RetentionPolicy is ckptvcs.RetentionPolicy is ckptvcs.training.RetentionPolicy
    assert ckptvcs.snapshot.host_copy is ckptvcs.training.snapshot.host_copy
    assert ckptvcs.rng.capture_rng is ckptvcs.training.rng.capture_rng
    assert ckptvcs.KeepLast is KeepLast and ckptvcs.training.AnySave is AnySave


# -- the seams split out of the manager ------------------------------------------------------------


def test_background_saver_runs_one_save_and_raises_its_failure_later() -> None:
    from ckptvcs import AsyncSaveError
    from ckptvcs.training.async_save import BackgroundSaver

    saver = BackgroundSaver()
    try:
        snap = saver.snapshot({"w": torch.ones(3)})
        assert saver.submit(1, lambda s: "ok" if s["w"].sum() == 3 else "bad", snap).result() == "ok"
        assert saver.in_flight
        saver.check(wait=True)
        assert not saver.in_flight

        def fail() -> str:
            raise OSError("disk gone")

        saver.submit(2, fail)
        with pytest.raises(AsyncSaveError, match="step 2 failed: disk gone") as info:
            saver.check(wait=True)
        assert isinstance(info.value.__cause__, OSError)
        saver.check(wait=True)  # reported once
    finally:
        saver.close()


def test_preemption_watcher_sets_a_flag_and_restores_the_handlers() -> None:
    import signal
    import threading

    from ckptvcs.training.preemption import PreemptionWatcher

    previous = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(grace=3600)
    try:
        watcher.install()
        watcher.on_signal(signal.SIGTERM, None)  # as the handler is called
        assert watcher.pending == signal.SIGTERM
        assert watcher.take() == signal.SIGTERM and watcher.pending is None
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(InvalidInputError, watcher.install)))
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0].value)

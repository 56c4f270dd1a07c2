"""CheckpointManager: triggers, capture and restore, retention in a run, async save, preemption."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ckptvcs
from ckptvcs import (
    AsyncSaveError,
    CheckpointManager,
    CommitPrunedError,
    KeyNotFoundError,
    StorageError,
    UnsupportedValueError,
)
from ckptvcs.cli import cli
from ckptvcs.manager import MANAGER_KEY
from helpers import assert_tensor_identical


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def train_step(model, opt, sched) -> float:
    x = torch.randn(4, 8) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def manager(repo, model, opt, sched, **kwargs) -> CheckpointManager:
    kwargs.setdefault("code_version", None)
    return CheckpointManager(repo, {"model": model, "optimizer": opt, "scheduler": sched}, **kwargs)


def saved_steps(repo, rev: str = "HEAD") -> list[int]:
    return sorted(c.step for c in repo.log(rev))


# -- triggers -------------------------------------------------------------------------------


def test_every_steps_saves_at_multiples_only(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_steps=3) as mgr:
        results = {s: mgr.step(s, {"loss": train_step(model, opt, sched)}) for s in range(1, 10)}
    assert [s for s, r in results.items() if r is not None] == [3, 6, 9]
    assert saved_steps(repo) == [3, 6, 9]
    head = repo.show(results[9])
    assert head.step == 9 and "loss" in head.metrics and "every_steps=3" in head.message


def test_every_seconds_uses_the_clock(repo) -> None:
    clock = FakeClock()
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_seconds=60, clock=clock) as mgr:
        assert mgr.step(1) is None
        clock.now += 59
        assert mgr.step(2) is None
        clock.now += 1
        assert mgr.step(3) is not None  # 60 s since the manager started
        clock.now += 30
        assert mgr.step(4) is None  # the timer restarted at the save
        clock.now += 30
        assert mgr.step(5) is not None
    assert saved_steps(repo) == [3, 5]


@pytest.mark.parametrize("mode, values, expected", [
    ("min", [3.0, 2.0, 2.5, 1.0, 1.0], [1, 2, 4]),
    ("max", [0.5, 0.4, 0.7, 0.6, 0.9], [1, 3, 5]),
])
def test_best_metric_saves_on_improvement(repo, mode, values, expected) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, best_metric="acc", best_mode=mode) as mgr:
        for step, value in enumerate(values, 1):
            mgr.step(step, {"acc": value, "other": 1.0})
        assert mgr.step(6, {"other": 0.0}) is None  # no value of the metric: no save
    assert saved_steps(repo) == expected


def test_best_so_far_survives_a_new_manager(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, best_metric="loss") as mgr:
        mgr.step(1, {"loss": 1.0})
    with manager(repo, model, opt, sched, best_metric="loss") as mgr:
        assert mgr.best == 1.0
        assert mgr.step(2, {"loss": 1.5}) is None
        assert mgr.step(3, {"loss": 0.5}) is not None
    assert saved_steps(repo) == [1, 3]


def test_explicit_save_with_tag_and_message(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_steps=100) as mgr:
        cid = mgr.save(7, {"loss": 0.3}, message="epoch 1 done", tag="epoch-1", epoch=1)
    commit = repo.show("epoch-1")
    assert commit.id == cid and commit.message == "epoch 1 done"
    assert (commit.step, commit.epoch, commit.metrics) == (7, 1, {"loss": 0.3})
    assert repo.tags()["epoch-1"].message == "epoch 1 done"


def test_commits_go_to_the_given_branch_without_moving_head(repo) -> None:
    model, opt, sched = make_run()
    base = repo.commit({"x": 1}, "base", code_version=None)
    with manager(repo, model, opt, sched, branch="run-2") as mgr:
        cid = mgr.save(1)
    assert repo.branches()["run-2"] == cid
    assert repo.head() == ("main", base)
    assert repo.show(cid).parents == (base,)


# -- capture and restore --------------------------------------------------------------------


def test_restore_brings_back_objects_rng_and_progress(repo) -> None:
    model, opt, sched = make_run()
    buffer = torch.zeros(3)
    extras = {"seen": [1, 2]}
    state = {"model": model, "optimizer": opt, "scheduler": sched, "buffer": buffer, "extras": extras, "count": 5}
    with CheckpointManager(repo, state, code_version=None) as mgr:
        for _step in range(1, 5):
            train_step(model, opt, sched)
        buffer += 7
        wall = mgr.wall_time
        mgr.save(4, {"loss": 0.25}, epoch=2)
        expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
        expected_lr = sched.get_last_lr()
        after = (random.random(), float(np.random.rand()), torch.rand(3))

    model2, opt2, sched2 = make_run(seed=1)
    buffer2, extras2 = torch.ones(3), {"other": True}
    state2 = {"model": model2, "optimizer": opt2, "scheduler": sched2, "buffer": buffer2, "extras": extras2, "count": 0}
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    with CheckpointManager(repo, state2, code_version=None) as mgr2:
        assert mgr2.restore() == 4
        assert (mgr2.epoch, mgr2.metrics) == (2, {"loss": 0.25})
        assert mgr2.wall_time >= wall
        assert mgr2.resumed_from == repo.resolve("HEAD")
        for name, tensor in model2.state_dict().items():
            assert_tensor_identical(tensor, expected_weights[name])
        assert sched2.get_last_lr() == expected_lr
        assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
        assert (random.random(), float(np.random.rand())) == after[:2]
        assert torch.equal(torch.rand(3), after[2])
        assert torch.equal(buffer2, torch.full((3,), 7.0))  # copied into in place
        assert extras2 == {"seen": [1, 2]}  # refilled in place
        assert mgr2.state["count"] == 5  # immutable value: replaced


def test_restore_with_nothing_to_resume_returns_none(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched) as mgr:
        assert mgr.restore() is None


def test_restore_strict_names_missing_state(repo) -> None:
    model, opt, sched = make_run()
    with CheckpointManager(repo, {"model": model}, code_version=None) as mgr:
        mgr.save(1)
    with manager(repo, model, opt, sched) as mgr:
        with pytest.raises(KeyNotFoundError, match="optimizer"):
            mgr.restore()
        assert mgr.restore(strict=False) == 1


def test_commit_layout_keeps_user_keys_loadable_alone(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched) as mgr:
        mgr.save(3)
    assert set(repo.load()) == {"model", "optimizer", "scheduler", MANAGER_KEY}
    weights = repo.load(keys=["model"])["model"]
    assert set(weights) == set(model.state_dict())


def test_reserved_and_invalid_arguments_are_refused(repo) -> None:
    with pytest.raises(ckptvcs.InvalidInputError, match="reserved"):
        CheckpointManager(repo, {MANAGER_KEY: 1})
    with pytest.raises(ckptvcs.InvalidInputError):
        CheckpointManager(repo, {"x": 1}, every_steps=0)
    with pytest.raises(ckptvcs.InvalidInputError, match="best_metric"):
        CheckpointManager(repo, {"x": 1}, keep_best=2)


def test_manager_opens_or_creates_a_repository_path(tmp_path) -> None:
    with CheckpointManager(tmp_path / "store", {"x": torch.ones(2)}, code_version=None) as mgr:
        cid = mgr.save(1)
    with ckptvcs.Repo.open(tmp_path / "store") as repo:
        assert repo.resolve("HEAD") == cid


# -- retention --------------------------------------------------------------------------------


def test_retention_keeps_last_and_protects_tags_branches_and_resumed_from(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_steps=1, keep_last=2) as mgr:
        for step in range(1, 4):
            mgr.step(step)
        repo.branch("experiment", "HEAD~1")  # forked at step 2 (step 1 was pruned already): its history now
        mgr.save(4, tag="milestone")
        for step in range(5, 8):
            mgr.step(step)
    kept = sorted(c.step for c in repo.log() if c.pruned is None)
    assert kept == [2, 4, 6, 7]

    with manager(repo, model, opt, sched, every_steps=1, keep_last=1) as mgr:
        assert mgr.restore(repo.log()[1].id) == 6  # resume from step 6 (not the head)
        for step in range(8, 11):
            mgr.step(step)
    kept = sorted(c.step for c in repo.log() if c.pruned is None)
    assert kept == [2, 4, 6, 10]


def test_a_run_started_from_another_branch_leaves_its_history_alone(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_steps=1) as mgr:
        for step in range(1, 4):
            mgr.step(step)
    with manager(repo, model, opt, sched, branch="finetune", every_steps=1, keep_last=1) as mgr:
        for step in range(11, 14):
            mgr.step(step)
    assert sorted(c.step for c in repo.log("finetune") if c.pruned is None) == [1, 2, 3, 13]


def test_pruned_commit_keeps_history_and_refuses_to_load(repo) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_steps=1, keep_last=1) as mgr:
        first = mgr.step(1, {"loss": 2.0})
        train_step(model, opt, sched)
        mgr.step(2, {"loss": 1.0})
    assert repo.is_pruned(first) and first in repo.pruned()
    record = repo.show(first)
    assert (record.step, record.metrics, record.pruned["rule"]) == (1, {"loss": 2.0}, "keep_last=1")
    assert repo.manifest(first).root  # metadata still readable
    with pytest.raises(CommitPrunedError, match=r"pruned by retention rule keep_last=1") as info:
        repo.load(first)
    assert info.value.rule == "keep_last=1" and info.value.commit_id == first
    with pytest.raises(CommitPrunedError):
        repo.diff(first, "HEAD")
    with pytest.raises(CommitPrunedError):
        with manager(repo, model, opt, sched) as mgr:
            mgr.restore(first)
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "log", "--oneline"])
    assert result.exit_code == 0
    assert f"{first[:12]} step=1 loss=2 [pruned: keep_last=1]" in click_plain(result.output)
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "checkout", first, "-o", str(repo.root.parent / "x.pt")])
    assert result.exit_code == CommitPrunedError.exit_code
    assert result.output.startswith("error: commit") and "pruned" in result.output


def click_plain(text: str) -> str:
    import click

    return click.unstyle(text)


def test_a_ref_tip_cannot_be_pruned(repo) -> None:
    cid = repo.commit({"x": 1}, code_version=None)
    with pytest.raises(ckptvcs.ProtectedCommitError):
        repo.prune(cid, "manual")


def test_retention_runs_only_after_the_commit_is_durable(repo, monkeypatch) -> None:
    model, opt, sched = make_run()
    with manager(repo, model, opt, sched, every_steps=1, keep_last=1) as mgr:
        mgr.step(1)

        def failing_commit(*args, **kwargs):
            raise StorageError("disk full while writing a pack")

        monkeypatch.setattr(repo, "commit", failing_commit)
        with pytest.raises(StorageError):
            mgr.step(2)
    assert repo.pruned() == {}  # the only durable checkpoint stays whole
    assert saved_steps(repo) == [1]


# -- async save ----------------------------------------------------------------------------------


def test_async_save_commits_the_state_as_it_was_when_saved(repo) -> None:
    model, opt, sched = make_run()
    weight = model[0].weight
    with manager(repo, model, opt, sched, async_save=True) as mgr:
        before = weight.detach().clone()
        future = mgr.save(1)
        with torch.no_grad():
            weight.add_(1.0)  # the loop goes on while the save runs
        cid = future.result()
        mgr.wait()
        assert mgr.last_commit == cid
    saved = repo.load(cid)["model"]["0.weight"]
    assert torch.equal(saved, before)


def test_async_saves_are_one_at_a_time(repo, monkeypatch) -> None:
    model, opt, sched = make_run()
    active, peak = [0], [0]
    original = repo.commit

    def slow_commit(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(repo, "commit", slow_commit)
    with manager(repo, model, opt, sched, every_steps=1, async_save=True) as mgr:
        for step in range(1, 5):
            mgr.step(step)
    assert peak[0] == 1
    assert saved_steps(repo) == [1, 2, 3, 4]  # close() flushed the last one


def test_async_failure_surfaces_at_the_next_call(repo, monkeypatch) -> None:
    model, opt, sched = make_run()
    mgr = manager(repo, model, opt, sched, every_steps=1, async_save=True)
    mgr.step(1)
    mgr.wait()

    def failing_commit(*args, **kwargs):
        raise StorageError("disk full while writing a pack")

    monkeypatch.setattr(repo, "commit", failing_commit)
    mgr.step(2)
    with pytest.raises(AsyncSaveError, match="background save of step 2 failed: disk full") as info:
        for _ in range(200):  # the error is raised by whichever call comes after the failure
            mgr.step(2)
            time.sleep(0.01)
    assert isinstance(info.value.__cause__, StorageError)
    monkeypatch.undo()
    mgr.step(3)
    mgr.close()
    assert saved_steps(repo) == [1, 3]


def test_async_failure_surfaces_at_wait_and_close(repo, monkeypatch) -> None:
    model, opt, sched = make_run()
    mgr = manager(repo, model, opt, sched, async_save=True)
    monkeypatch.setattr(repo, "commit", lambda *a, **k: (_ for _ in ()).throw(StorageError("I/O error")))
    mgr.save(1)
    with pytest.raises(AsyncSaveError):
        mgr.wait()
    mgr.save(2)
    with pytest.raises(AsyncSaveError):
        mgr.close()


def test_async_save_refuses_unsupported_values_on_the_caller(repo) -> None:
    with CheckpointManager(repo, {"bad": {"fn": object()}}, async_save=True, code_version=None) as mgr:
        with pytest.raises(UnsupportedValueError, match="bad/fn"):
            mgr.save(1)
    assert repo.head()[1] is None


def test_async_copy_keeps_tied_weights_tied(repo) -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    with CheckpointManager(repo, {"model": model}, async_save=True, code_version=None) as mgr:
        cid = mgr.save(1).result()
    loaded = repo.load(cid)["model"]
    assert loaded["emb.weight"].untyped_storage().data_ptr() == loaded["head.weight"].untyped_storage().data_ptr()


# -- preemption ----------------------------------------------------------------------------------


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_preemption_saves_at_the_step_boundary_then_runs_the_previous_handler(repo) -> None:
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        model, opt, sched = make_run()
        mgr = manager(repo, model, opt, sched, every_steps=100, save_on_preemption=True)
        mgr.step(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.preempted and calls == []  # only a flag so far: the state may be mid-update
        mgr.step(2, {"loss": 0.5})
        assert calls == [signal.SIGTERM]  # then the signal took its course
        assert not mgr.preempted
        head = repo.show()
        assert head.step == 2 and "preemption: SIGTERM" in head.message
        mgr.close()
        assert signal.getsignal(signal.SIGTERM) is not mgr._on_signal
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigint_saves_then_raises_keyboard_interrupt(repo) -> None:
    model, opt, sched = make_run()
    mgr = manager(repo, model, opt, sched, save_on_preemption=True, async_save=True)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        mgr.step(5)
    assert repo.show().step == 5
    mgr.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- host copies for async saves ---------------------------------------------------------------


def test_host_copy_is_deep_and_keeps_structure() -> None:
    from collections import OrderedDict

    from ckptvcs.snapshot import HostBuffers, host_copy

    base = torch.arange(12.0)
    view = base[2:8].view(2, 3)
    odict = OrderedDict(w=nn.Parameter(torch.ones(2)))
    odict._metadata = {"": {"version": 1}}
    state = {"base": base, "view": view, "odict": odict, "arr": np.arange(3), "groups": [{"lr": 0.1}], "n": 3}
    buffers = HostBuffers()
    copy = host_copy(state, buffers)
    base.add_(100)
    state["groups"][0]["lr"] = 0.5
    state["arr"][0] = 9
    assert torch.equal(copy["base"], torch.arange(12.0))
    assert torch.equal(copy["view"], torch.arange(2.0, 8.0).view(2, 3)) and copy["view"].stride() == (3, 1)
    assert copy["view"].untyped_storage().data_ptr() == copy["base"].untyped_storage().data_ptr()
    assert isinstance(copy["odict"], OrderedDict) and copy["odict"]._metadata == {"": {"version": 1}}
    assert isinstance(copy["odict"]["w"], nn.Parameter) and copy["odict"]["w"].requires_grad
    assert copy["groups"] == [{"lr": 0.1}] and copy["arr"][0] == 0 and copy["n"] == 3
    # After release the next copy reuses the same memory (no fresh allocation).
    first_ptr = copy["base"].untyped_storage().data_ptr()
    buffers.release()
    again = host_copy(state, buffers)
    assert again["base"].untyped_storage().data_ptr() == first_ptr
    assert torch.equal(again["base"], torch.arange(12.0) + 100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_copy_of_cuda_tensors_is_pinned_complete_and_reused() -> None:
    from ckptvcs.snapshot import HostBuffers, host_copy

    big = torch.randn(4_000_000, device="cuda")
    state = {"big": big, "view": big[10:20], "cpu": torch.ones(3)}
    buffers = HostBuffers()
    copy = host_copy(state, buffers)
    big.add_(1.0)  # queued after the copy on the same stream: must not show in it
    assert copy["big"].device.type == "cpu" and copy["big"].is_pinned()
    assert torch.equal(copy["big"], (big - 1.0).cpu()) and torch.equal(copy["view"], copy["big"][10:20])
    assert not copy["cpu"].is_pinned()
    first_ptr = copy["big"].untyped_storage().data_ptr()
    buffers.release()
    again = host_copy(state, buffers)
    assert again["big"].untyped_storage().data_ptr() == first_ptr and torch.equal(again["big"], big.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_device_tensors_round_trip(repo) -> None:
    model = nn.Linear(4, 4).cuda()
    torch.cuda.manual_seed_all(3)
    torch.rand(1, device="cuda")
    with CheckpointManager(repo, {"model": model}, async_save=True, code_version=None) as mgr:
        mgr.save(1).result()
        expected_draw = torch.rand(5, device="cuda")
        expected_weight = model.weight.detach().clone()
        torch.cuda.manual_seed_all(99)
        with torch.no_grad():
            model.weight.zero_()
        assert mgr.restore() == 1
        assert torch.equal(torch.rand(5, device="cuda"), expected_draw)
        assert torch.equal(model.weight, expected_weight) and model.weight.is_cuda
    assert len(repo.load(keys=[MANAGER_KEY])[MANAGER_KEY]["rng"]["cuda"]) == torch.cuda.device_count()


def test_ref_lock_of_a_process_killed_mid_update_is_broken(repo, tmp_path) -> None:
    """A writer SIGKILLed inside a ref update leaves ``<ref>.lock`` holding the new value,
    not its owner line; the next writer must still recognise it as dead (an async save
    can be killed exactly there)."""
    import subprocess
    import sys

    cid = repo.commit({"a": 1}, code_version=None)
    lock = repo.root / "refs" / "heads" / "main.lock"
    script = (
        "import fcntl, os, signal, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, (sys.argv[2] + '\\n').encode())\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(lock), "f" * 64])
    assert proc.returncode == -signal.SIGKILL and lock.exists()
    os.utime(lock, (time.time() - 5, time.time() - 5))  # past the creation grace period
    repo.refs.lock_timeout = 5
    new = repo.commit({"a": 2}, code_version=None)
    assert repo.resolve("HEAD") == new and repo.show(new).parents == (cid,)
    assert not lock.exists()


def test_ref_lock_held_by_a_live_process_without_owner_line_is_respected(repo) -> None:
    import fcntl

    repo.commit({"a": 1}, code_version=None)
    lock = repo.root / "refs" / "heads" / "main.lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"f" * 64 + b"\n")
        os.utime(lock, (time.time() - 5, time.time() - 5))
        repo.refs.lock_timeout = 0.2
        with pytest.raises(ckptvcs.LockTimeoutError):
            repo.commit({"a": 2}, code_version=None)
    finally:
        os.close(fd)
        lock.unlink()


def _pack_bytes_per_save(repo, gc_every: int | None) -> list[int]:
    """Pack bytes on disk after each of 8 saves of all-new data with keep_last=2."""
    weights = torch.zeros(16384)
    extra = {} if gc_every is None else {"gc_every": gc_every}
    with CheckpointManager(repo, {"w": weights}, every_steps=1, keep_last=2, async_save=True,
                           code_version=None, **extra) as mgr:
        sizes = []
        for step in range(1, 9):
            weights.copy_(torch.randn(16384, generator=torch.Generator().manual_seed(step)))  # all new data
            mgr.step(step)
            mgr.wait()
            sizes.append(sum(p.stat().st_size for p in (repo.root / "packs").glob("*.pack")))
    return sizes


def test_by_default_pruned_data_leaves_the_disk(small_repo) -> None:
    sizes = _pack_bytes_per_save(small_repo, gc_every=None)
    assert max(sizes[3:]) <= 2 * 16384 * 4 * 1.1  # two checkpoints' worth, not eight
    assert small_repo.gc(dry_run=True).bytes_reclaimed == 0
    assert torch.equal(small_repo.load()["w"], torch.randn(16384, generator=torch.Generator().manual_seed(8)))


def test_gc_every_zero_leaves_pruned_data_for_an_explicit_gc(small_repo) -> None:
    sizes = _pack_bytes_per_save(small_repo, gc_every=0)
    # every save's data is still there (byte planes keep ~86% of randn float32)
    assert sizes[-1] >= 8 * 16384 * 4 * 0.8
    assert small_repo.gc().bytes_reclaimed >= 6 * 16384 * 4 * 0.8


def test_gc_every_is_validated(small_repo) -> None:
    with pytest.raises(ckptvcs.InvalidInputError, match="gc_every"):
        CheckpointManager(small_repo, {"w": torch.zeros(1)}, gc_every=-1)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_preemption_without_a_step_boundary_takes_its_course_after_the_grace(repo) -> None:
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        model, opt, sched = make_run()
        mgr = manager(repo, model, opt, sched, save_on_preemption=True, preemption_grace=0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)  # no step(): the loop is busy elsewhere, or ended without close()
        assert calls == [signal.SIGTERM] and not mgr.preempted
        assert repo.head()[1] is None  # no consistent step to save: nothing saved
        assert mgr.step(1) is None
        mgr.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_automatic_gc_releases_only_what_this_manager_pruned(small_repo) -> None:
    repo = small_repo

    def data(seed: int) -> dict:
        return {"w": torch.randn(8192, generator=torch.Generator().manual_seed(seed))}

    other_old = repo.commit(data(101), "another run, step 1", branch="other", code_version=None)
    repo.commit(data(102), "another run, step 2", branch="other", code_version=None)
    repo.prune(other_old, "keep_last=1", "another run's retention")  # its own gc has not run yet
    deleted = repo.commit(data(103), "experiment", branch="exp", code_version=None)
    repo.delete_branch("exp", force=True)
    repo.checkout(repo.resolve("other"))
    detached = repo.commit(data(104), "detached work", code_version=None)
    repo.checkout("other")
    other_chunks = [bytes.fromhex(c) for b in repo.manifest(other_old).blobs for c in b["chunks"]]

    weights = torch.zeros(8192)
    with CheckpointManager(repo, {"w": weights}, branch="run", every_steps=1, keep_last=1,
                           code_version=None) as mgr:
        for step in range(1, 5):
            weights.copy_(data(step)["w"])
            mgr.step(step)
    mine = [c for c in repo.log("run") if c.step is not None and c.pruned is not None]
    assert len(mine) == 3 and all("collected" in c.pruned for c in mine)  # its own pruned data went
    assert all(repo.chunks.index.get(c) is not None for c in other_chunks)  # another run's did not
    assert "collected" not in repo.pruned_record(other_old)
    assert_tensor_identical(repo.load(deleted)["w"], data(103)["w"])
    assert_tensor_identical(repo.load(detached)["w"], data(104)["w"])
    assert repo.fsck().ok

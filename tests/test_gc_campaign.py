"""Campaigns: nothing acknowledged is lost across gc, retention, replays and repairs, and
gc runs beside busy writers.

1. A randomised campaign in one process: commits of an evolving training state (XOR
   deltas on the fast-changing tensor, a slow tensor that keeps packs mostly live),
   exact-resume replays (the states of earlier steps committed again), retention
   prunes, gc and ``repair index``. After every commit the new commit loads; after
   every gc and every repair each acknowledged commit that was not pruned loads
   bit-exact and fsck finds no error. Default: 4 seeds x 45 operations; --run-slow:
   30 seeds x 150.
2. A soak: writer processes commit continuously on their own branches while this
   process prunes, runs gc (default lock timeout) and fsck, round after round. Every
   gc must run; at the end every acknowledged commit that was not pruned loads
   bit-exact and ``fsck --read-data`` is clean. Default: 3 writers, 4 gc rounds;
   --run-slow: 5 writers, 25 rounds.
3. A CheckpointManager run (keep_last=3, keep_every_steps=10, gc_every=2) cut into
   cycles, each resuming exactly from a kept checkpoint and committing the following
   steps again; after each cycle every acknowledged commit that was not pruned loads
   bit-exact and fsck finds no error. Default: 6 cycles; --run-slow: 60.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptvcs import CheckpointManager, Repo
from crash_harness import context
from helpers import assert_array_identical, assert_tensor_identical

# -- 1. randomised gc / retention / commit / replay campaign ------------------------------------


def training_state(step: int, slow_period: int = 7) -> dict:
    """The state a deterministic run has at ``step``: the same step always gives the same bytes.

    ``fast`` changes a little every step (stored as XOR deltas against the parent),
    ``slow`` every ``slow_period`` steps (its chunks keep older packs mostly live),
    ``ids`` every 3 steps.
    """
    fast = torch.randn(3072, generator=torch.Generator().manual_seed(10_000))
    for k in range(3):
        fast[k * 1024 : k * 1024 + 48] = torch.randn(48, generator=torch.Generator().manual_seed(step * 3 + k))
    slow = torch.randn(8192, generator=torch.Generator().manual_seed(20_000 + step // slow_period))
    ids = np.arange(600, dtype=np.int64) * (step // 3 + 1)
    return {"model": {"fast": fast, "slow": slow}, "ids": ids, "step": step}


def assert_state(actual: dict, step: int, slow_period: int) -> None:
    expected = training_state(step, slow_period)
    assert actual["step"] == step
    assert_tensor_identical(actual["model"]["fast"], expected["model"]["fast"])
    assert_tensor_identical(actual["model"]["slow"], expected["model"]["slow"])
    assert_array_identical(actual["ids"], expected["ids"])


class Campaign:
    """One seeded run of random operations against a repository, checking as it goes."""

    def __init__(self, root: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.repo = Repo.init(root, chunk_size=4096, keyframe_interval=self.rng.choice([2, 3, 4, 8]))
        self.acked: dict[str, int] = {}  # acknowledged commit → its step
        self.pruned: set[str] = set()
        self.step = 0
        self.checks = 0
        # A manager's retention rules and the rhythm of the state, drawn per run.
        self.keep_last = self.rng.choice([1, 2, 3])
        self.keep_every = self.rng.choice([3, 4, 5, 10])
        self.slow_period = self.rng.choice([3, 4, 5, 7])

    def commit(self) -> None:
        self.step += 1
        state = training_state(self.step, self.slow_period)
        cid = self.repo.commit(state, f"step {self.step}", step=self.step, code_version=None)
        self.acked[cid] = self.step
        assert_state(self.repo.load(cid), self.step, self.slow_period)  # acknowledged means loadable, at once

    def replay(self) -> None:
        """The states of earlier steps come again: an exact resume from a kept checkpoint,
        or a revert to any earlier step (re-committing an old file, a reverted tensor)."""
        kept = sorted({s for c, s in self.acked.items() if c not in self.pruned})
        if kept and self.rng.random() < 0.5:
            self.step = self.rng.choice(kept)
        elif self.step > 1:
            self.step = self.rng.randrange(0, self.step - 1)

    def retention(self) -> None:
        """keep_last plus keep_every_steps, like a manager's rules (the tip is protected)."""
        tip = self.repo.resolve("HEAD")
        for commit in self.repo.log()[self.keep_last :]:
            cid = commit.id
            if cid != tip and cid not in self.pruned and self.acked[cid] % self.keep_every:
                self.repo.prune(cid, f"keep_last={self.keep_last},keep_every_steps={self.keep_every}")
                self.pruned.add(cid)

    def check_everything(self, what: str) -> None:
        for cid, step in self.acked.items():
            if cid not in self.pruned:
                assert_state(self.repo.load(cid), step, self.slow_period)
        report = self.repo.fsck()
        assert report.ok, f"after {what}: " + "; ".join(str(f) for f in report.errors)
        self.checks += 1

    def run(self, saves: int) -> None:
        """``saves`` manager-like saves: commit, retention, gc every ``gc_every`` saves;
        between saves, now and then a crash and exact resume, or a ``repair index``."""
        gc_every = self.rng.choice([1, 2, 3])
        for save in range(1, saves + 1):
            roll = self.rng.random()
            if roll < 0.2:
                self.replay()
            elif roll < 0.27:
                self.repo.repair_index()
                self.check_everything("repair index")
            self.commit()
            self.retention()
            if save % gc_every == 0:
                self.repo.gc()
                self.check_everything("gc")
        self.repo.gc()
        self.check_everything("the last gc")


@pytest.mark.parametrize(
    ("seed", "operations"),
    [*((s, 45) for s in range(4)), *(pytest.param(s, 150, marks=pytest.mark.slow) for s in range(100, 140))],
)
def test_random_gc_retention_replay_campaign(tmp_path: Path, seed: int, operations: int) -> None:
    campaign = Campaign(tmp_path / "store", seed)
    try:
        campaign.run(operations)
    finally:
        campaign.repo.close()
    assert campaign.checks >= 2


# -- 2. writers beside gc and fsck -------------------------------------------------------------


def writer_state(writer: int, i: int) -> dict:
    """Writer ``writer``'s ``i``-th state: a tensor shared by all writers, one of its own,
    and its own previous tensor again (dedup against data gc may be releasing)."""
    def own(j: int) -> torch.Tensor:
        return torch.randn(2048, generator=torch.Generator().manual_seed(writer * 100_000 + j))

    shared = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    return {"shared": shared, "new": own(i), "old": own(i - 1), "i": i}


def _soak_writer(store: str, writer: int, ack_path: str, stop_path: str) -> None:
    """Commit ``writer_state(writer, 1, 2, ...)`` on branch w<writer> until the stop file appears."""
    with Repo.open(store) as repo, open(ack_path, "a") as acks:
        i = 0
        while not Path(stop_path).exists():
            i += 1
            cid = repo.commit(writer_state(writer, i), f"w{writer} {i}", branch=f"w{writer}", code_version=None)
            acks.write(f"{cid} {i}\n")
            acks.flush()


def _read_acks(path: Path) -> dict[str, int]:
    lines = path.read_text().splitlines() if path.exists() else []
    return {cid: int(i) for cid, i in (line.split() for line in lines if line.count(" ") == 1)}


@pytest.mark.parametrize(("writers", "rounds"), [(3, 4), pytest.param(5, 25, marks=pytest.mark.slow)])
def test_soak_writers_with_gc_and_fsck(tmp_path: Path, writers: int, rounds: int) -> None:
    store = tmp_path / "store"
    Repo.init(store, chunk_size=4096).close()
    stop = tmp_path / "stop"
    ack_paths = [tmp_path / f"acks-{w}" for w in range(writers)]
    procs = [context().Process(target=_soak_writer, args=(str(store), w, str(ack_paths[w]), str(stop)))
             for w in range(writers)]
    for proc in procs:
        proc.start()
    gc_runs = 0
    pruned: set[str] = set()
    try:
        with Repo.open(store) as repo:
            while not all(_read_acks(p) for p in ack_paths):  # every writer is committing
                assert all(proc.is_alive() for proc in procs)
                time.sleep(0.05)
            for _ in range(rounds):
                for path in ack_paths:
                    acks = list(_read_acks(path))
                    for cid in acks[:-2]:  # keep each writer's last two acknowledged commits
                        if cid not in pruned:
                            repo.prune(cid, "keep_last=2")
                            pruned.add(cid)
                repo.gc()  # the default lock timeout: it must get the lock beside busy writers
                gc_runs += 1
                report = repo.fsck()
                assert report.ok, [str(f) for f in report.errors]
            stop.touch()
            for proc in procs:
                proc.join(120)
            assert [proc.exitcode for proc in procs] == [0] * writers
            repo.gc()
            for w, path in enumerate(ack_paths):
                acks = _read_acks(path)
                assert len(acks) >= 1
                for cid, i in acks.items():
                    if cid not in pruned:
                        loaded = repo.load(cid)
                        expected = writer_state(w, i)
                        for key in ("shared", "new", "old"):
                            assert_tensor_identical(loaded[key], expected[key])
            report = repo.fsck(read_data=True)
            assert report.ok, [str(f) for f in report.errors]
    finally:
        stop.touch()
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    assert gc_runs == rounds


# -- 3. a CheckpointManager run with crashes and exact resumes ----------------------------------


def _train_cycle(store: Path, rng: random.Random, acked: dict[str, dict[str, torch.Tensor]]) -> None:
    """One run of a manager (keep_last=3, keep_every_steps=10, gc_every=2) that resumes
    exactly from a kept checkpoint (the latest, or an earlier one) and trains a few steps:
    the steps after that checkpoint are committed again, byte for byte."""
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = torch.zeros(8192)  # changes every 4 steps: its chunks keep packs mostly live
    mgr = CheckpointManager(store, {"model": model, "optimizer": opt, "ema": ema}, every_steps=1,
                            keep_last=3, keep_every_steps=10, gc_every=2, code_version=None)
    try:
        repo = mgr.repo
        kept = [c.id for c in repo.log()[:12] if c.pruned is None] if repo.head()[1] else []
        start = (mgr.restore(rng.choice(kept)) if kept and rng.random() < 0.5 else mgr.restore()) or 0
        for step in range(start + 1, start + 1 + rng.randint(2, 7)):
            loss = model(torch.randn(16, 64)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 4 == 0:
                ema.copy_(torch.randn(8192, generator=torch.Generator().manual_seed(step)))
            mgr.step(step)
            acked[mgr.last_commit] = {k: v.clone() for k, v in model.state_dict().items()} | {"ema": ema.clone()}
    finally:
        mgr.close()


@pytest.mark.parametrize(("seed", "cycles"), [(0, 6), pytest.param(1, 60, marks=pytest.mark.slow)])
def test_manager_crash_and_exact_resume_cycles(tmp_path: Path, seed: int, cycles: int) -> None:
    store = tmp_path / "store"
    Repo.init(store, chunk_size=4096).close()
    rng = random.Random(seed)
    acked: dict[str, dict[str, torch.Tensor]] = {}
    for cycle in range(cycles):
        torch.manual_seed(1000 + cycle)  # a fresh process; restore() brings the run's RNG back
        _train_cycle(store, rng, acked)
        with Repo.open(store) as repo:
            for cid, expected in acked.items():
                if not repo.is_pruned(cid):
                    loaded = repo.load(cid)
                    for key, value in expected.items():
                        actual = loaded["ema"] if key == "ema" else loaded["model"][key]
                        assert_tensor_identical(actual, value)
            report = repo.fsck()
            assert report.ok, f"cycle {cycle}: " + "; ".join(str(f) for f in report.errors)

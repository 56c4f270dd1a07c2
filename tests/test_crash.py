"""Crash safety: a child doing durable work is SIGKILLed at random moments.

After every kill: fsck finds no damage (garbage from the interrupted operation is
allowed), every operation acknowledged before the kill is there and loads bit-exact,
HEAD names a complete commit, and the next operation succeeds. The default run makes
90 kills (50 during commits, 15 during init, 15 during tag, 10 during repair index),
plus 10 during gc once ``Repo.gc`` exists; ``--run-slow`` adds 800.
Scenarios live in crash_harness.py; a new one (kill during gc, gc racing a writer) is
one function there plus one test here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptvcs import Repo
from ckptvcs.fsck import FsckReport
from crash_harness import (
    CHUNK_SIZE,
    KillRound,
    make_drift_state,
    make_state,
    read_acks,
    run_kill_rounds,
    scenario_commit,
    scenario_gc,
    scenario_init,
    scenario_repack,
    scenario_repair,
    scenario_slow,
    scenario_stage_publish,
    scenario_tag,
    seed_of,
)
from helpers import assert_array_identical, assert_tensor_identical


def assert_state_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in ("w", "b", "frozen"):
        assert_tensor_identical(actual["model"][name], expected["model"][name])
    assert_tensor_identical(actual["optimizer"]["exp_avg"], expected["optimizer"]["exp_avg"])
    assert actual["optimizer"]["step"] == expected["optimizer"]["step"]
    assert_array_identical(actual["ids"], expected["ids"])
    assert actual["seed"] == expected["seed"]


def assert_no_damage(report: FsckReport, context: str) -> None:
    assert report.ok, f"{context}: " + "; ".join(str(f) for f in report.errors)
    assert all(f.kind in ("garbage", "dangling", "unreachable") for f in report.garbage)


class CommitCrashChecker:
    """Verifier of the commit scenario: remembers every acknowledged commit across rounds."""

    def __init__(self, store: Path, read_data_every: int = 5) -> None:
        self.store = store
        self.acknowledged: dict[str, int] = {}  # commit id → seed of its state
        self.read_data_every = read_data_every
        self.kills_after_commit_point = 0

    def __call__(self, kill: KillRound) -> None:
        context = f"round {kill.number} (killed after {kill.delay * 1000:.1f} ms)"
        for cid, seed, _branch in read_acks(kill.ack_path):
            self.acknowledged[cid] = int(seed)
        with Repo.open(self.store) as repo:
            assert_no_damage(repo.fsck(read_data=kill.number % self.read_data_every == 0), context)
            for cid, seed in self.acknowledged.items():
                assert_state_identical(repo.load(cid), make_state(seed))
            # HEAD names a complete commit: it loads, bit-exact, acknowledged or not.
            head = repo.resolve("HEAD")
            head_seed = seed_of(repo.show(head).message)
            assert_state_identical(repo.load(head), make_state(head_seed))
            if head not in self.acknowledged:
                self.kills_after_commit_point += 1  # killed between the ref update and the ack
            # The next commit succeeds (breaking a ref lock the dead child may hold).
            next_seed = kill.first_seed + 500
            cid = repo.commit(make_state(next_seed), f"seed {next_seed}", code_version=None)
            self.acknowledged[cid] = next_seed
            assert repo.show(cid).parents == (head,)
            assert_state_identical(repo.load(cid), make_state(next_seed))


def _new_store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    with Repo.init(store, chunk_size=CHUNK_SIZE) as repo:
        repo.commit(make_state(1), "seed 1", code_version=None)
    return store


def test_kill_rounds_keep_pace_with_a_slow_child(tmp_path: Path) -> None:
    """However slow the child (here 0.3 s an operation, as on a busy machine), every other
    round has acknowledged operations before its kill, and the kill delays follow the
    child's pace instead of a fixed bound."""
    acked_rounds = []

    def verify(kill: KillRound) -> None:
        if read_acks(kill.ack_path):
            acked_rounds.append(kill.number)

    kills = run_kill_rounds(scenario_slow, lambda: str(tmp_path), verify, rounds=4, workdir=tmp_path, seed=7)
    assert kills == 4
    assert {0, 2} <= set(acked_rounds)


def _kill_during_commits(tmp_path: Path, rounds: int, seed: int) -> None:
    store = _new_store(tmp_path)
    checker = CommitCrashChecker(store)
    kills = run_kill_rounds(scenario_commit, lambda: str(store), checker, rounds=rounds, workdir=tmp_path, seed=seed)
    assert kills == rounds
    assert len(checker.acknowledged) > rounds  # the children did commit between kills
    with Repo.open(store) as repo:
        report = repo.fsck(read_data=True)
        assert_no_damage(report, "final")
    # The kills landed in different phases of a commit: their leftovers say where.
    phases = {
        "writing a pack": any(o.startswith("tmp/") for f in report.garbage for o in f.objects),
        "after sealing a pack, before the ref": any(f.message.startswith("pack ") for f in report.garbage),
        "writing objects, before the ref": any(f.kind in ("dangling", "unreachable") or
                                               any(o.startswith("objects/") for o in f.objects)
                                               for f in report.garbage),
        "after the ref update, before the acknowledgement": checker.kills_after_commit_point > 0,
    }
    assert sum(phases.values()) >= 2, phases


@pytest.mark.parametrize("seed", [11, 12])
def test_kill_during_commits(tmp_path: Path, seed: int) -> None:
    _kill_during_commits(tmp_path, rounds=25, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_kill_during_commits_many(tmp_path: Path, seed: int) -> None:
    _kill_during_commits(tmp_path, rounds=80, seed=100 + seed)


def _kill_during_init(tmp_path: Path, rounds: int, seed: int) -> None:
    parent = tmp_path / "repos"
    parent.mkdir()
    acknowledged: set[str] = set()

    def verify(kill: KillRound) -> None:
        acknowledged.update(line[0] for line in read_acks(kill.ack_path))
        for path in parent.iterdir():
            if path.name.startswith("."):
                continue  # a hidden staging directory of an interrupted init: never a repository
            with Repo.open(path) as repo:  # anything visible is a complete repository
                assert path.name.startswith("after-") or repo.head() == ("main", None)
                assert_no_damage(repo.fsck(), f"round {kill.number}: {path.name}")
        for name in acknowledged:
            assert (parent / name / "config.json").is_file()
        # The next init succeeds, and so does a commit in it.
        fresh = parent / f"after-{kill.number}"
        with Repo.init(fresh, chunk_size=CHUNK_SIZE) as repo:
            repo.commit({"x": torch.ones(3)}, code_version=None)

    kills = run_kill_rounds(scenario_init, lambda: str(parent), verify, rounds=rounds, workdir=tmp_path,
                            seed=seed)
    assert kills == rounds
    assert acknowledged


def test_kill_during_stage_and_publish(tmp_path: Path) -> None:
    """Kills land in stage, between stage and publish, and in publish: only garbage (and
    staged records, garbage too) is ever left; acknowledged commits load; the next commit works."""
    store = _new_store(tmp_path)
    checker = CommitCrashChecker(store)
    kills = run_kill_rounds(scenario_stage_publish, lambda: str(store), checker, rounds=10, workdir=tmp_path, seed=21)
    assert kills == 10 and len(checker.acknowledged) > 10
    with Repo.open(store) as repo:
        assert_no_damage(repo.fsck(read_data=True), "final")
        repo.gc(staged_expire="now")
        assert_no_damage(repo.fsck(read_data=True), "after gc")
        for cid, seed in checker.acknowledged.items():
            assert_state_identical(repo.load(cid), make_state(seed))


def test_kill_during_init(tmp_path: Path) -> None:
    _kill_during_init(tmp_path, rounds=15, seed=21)


@pytest.mark.slow
def test_kill_during_init_many(tmp_path: Path) -> None:
    _kill_during_init(tmp_path, rounds=100, seed=121)


def _kill_during_tag(tmp_path: Path, rounds: int, seed: int) -> None:
    store = _new_store(tmp_path)
    with Repo.open(store) as repo:
        head = repo.resolve("HEAD")
    acknowledged: dict[str, str] = {}

    def verify(kill: KillRound) -> None:
        acknowledged.update({name: target for name, target in read_acks(kill.ack_path)})
        with Repo.open(store) as repo:
            assert_no_damage(repo.fsck(), f"round {kill.number}")
            tags = repo.tags()  # every tag ref names a complete tag object
            for name, target in acknowledged.items():
                assert tags[name].object == target == head
            for name, record in tags.items():
                assert record.object == head and record.name == name
            assert repo.tag(f"after-{kill.number}", message="next") == head

    kills = run_kill_rounds(scenario_tag, lambda: str(store), verify, rounds=rounds, workdir=tmp_path,
                            seed=seed)
    assert kills == rounds
    assert acknowledged


def test_kill_during_tag(tmp_path: Path) -> None:
    _kill_during_tag(tmp_path, rounds=15, seed=31)


@pytest.mark.slow
def test_kill_during_tag_many(tmp_path: Path) -> None:
    _kill_during_tag(tmp_path, rounds=100, seed=131)


def _kill_during_repair(tmp_path: Path, rounds: int, seed: int) -> None:
    store = _new_store(tmp_path)
    with Repo.open(store) as repo:
        commits = {repo.commit(make_state(s), f"seed {s}", code_version=None): s for s in range(2, 6)}
        commits[repo.resolve("HEAD~4")] = 1
        indexed = {"chunks": len(repo.chunks.index)}
    repairs: list[str] = []

    def verify(kill: KillRound) -> None:
        repairs.extend(line[0] for line in read_acks(kill.ack_path))
        with Repo.open(store) as repo:  # an interrupted swap is finished here, at open
            assert_no_damage(repo.fsck(read_data=kill.number % 3 == 0), f"round {kill.number}")
            assert len(repo.chunks.index) == indexed["chunks"]  # the old index or the new one, never a partial one
            for cid, s in commits.items():
                assert_state_identical(repo.load(cid), make_state(s))
            cid = repo.commit(make_state(kill.first_seed), f"seed {kill.first_seed}", code_version=None)
            commits[cid] = kill.first_seed
            indexed["chunks"] = len(repo.chunks.index)

    kills = run_kill_rounds(scenario_repair, lambda: str(store), verify, rounds=rounds, workdir=tmp_path,
                            seed=seed)
    assert kills == rounds
    assert repairs


def test_kill_during_repair_index(tmp_path: Path) -> None:
    _kill_during_repair(tmp_path, rounds=10, seed=41)


@pytest.mark.slow
def test_kill_during_repair_index_many(tmp_path: Path) -> None:
    _kill_during_repair(tmp_path, rounds=100, seed=141)


def _kill_during_gc(tmp_path: Path, rounds: int, seed: int) -> None:
    store = _new_store(tmp_path)
    live: dict[str, int] = {}
    with Repo.open(store) as repo:
        live[repo.resolve("HEAD")] = 1
    collected: list[str] = []

    def give_gc_work(repo: Repo, first_seed: int) -> None:
        """Two new commits, and the oldest live non-tip commit pruned: the next gc frees it."""
        for s in (first_seed, first_seed + 1):
            live[repo.commit(make_state(s), f"seed {s}", code_version=None)] = s
        tip = repo.resolve("HEAD")
        victim = next(c for c in live if c != tip)
        repo.prune(victim, rule="crash-test")
        del live[victim]

    with Repo.open(store) as repo:
        give_gc_work(repo, 10)

    def verify(kill: KillRound) -> None:
        collected.extend(line[0] for line in read_acks(kill.ack_path))
        with Repo.open(store) as repo:
            assert_no_damage(repo.fsck(read_data=kill.number % 3 == 0), f"round {kill.number}")
            for cid, s in live.items():  # every kept commit still loads, bit-exact
                assert_state_identical(repo.load(cid), make_state(s))
            give_gc_work(repo, kill.first_seed)  # the next commit (and prune) succeed

    kills = run_kill_rounds(scenario_gc, lambda: str(store), verify, rounds=rounds, workdir=tmp_path,
                            seed=seed)
    assert kills == rounds
    assert collected
    with Repo.open(store) as repo:
        repo.gc()
        assert repo.fsck(read_data=True).ok


def test_kill_during_gc(tmp_path: Path) -> None:
    _kill_during_gc(tmp_path, rounds=10, seed=51)


@pytest.mark.slow
def test_kill_during_gc_many(tmp_path: Path) -> None:
    _kill_during_gc(tmp_path, rounds=100, seed=151)


def _kill_during_repack(tmp_path: Path, rounds: int, seed: int) -> None:
    """Kills during repack: every commit keeps loading bit-exact, fsck finds no damage,
    and on every third round the index is rebuilt from the packs first (an interrupted
    repack leaves chunks in two packs with different bases; the rebuild must pick
    resolving, verifying copies)."""
    store = tmp_path / "store"
    live: dict[str, int] = {}
    with Repo.init(store, chunk_size=CHUNK_SIZE) as repo:
        for s in range(1, 7):
            live[repo.commit(make_drift_state(s), f"seed {s}", code_version=None)] = s
    repacked: list[str] = []

    def verify(kill: KillRound) -> None:
        repacked.extend(line[0] for line in read_acks(kill.ack_path))
        with Repo.open(store) as repo:
            if kill.number % 3 == 0:
                repo.repair_index()
            assert_no_damage(repo.fsck(read_data=kill.number % 2 == 0), f"round {kill.number}")
            for cid, s in live.items():
                loaded = repo.load(cid)
                assert loaded["seed"] == s
                assert_tensor_identical(loaded["w"], make_drift_state(s)["w"])
            for s in (kill.first_seed, kill.first_seed + 1):  # new delta tips: work for the next repack
                live[repo.commit(make_drift_state(s), f"seed {s}", code_version=None)] = s

    kills = run_kill_rounds(scenario_repack, lambda: str(store), verify, rounds=rounds, workdir=tmp_path, seed=seed)
    assert kills == rounds
    assert repacked
    with Repo.open(store) as repo:
        repo.repack()
        repo.gc()
        assert repo.fsck(read_data=True).ok
        for cid, s in live.items():
            assert_tensor_identical(repo.load(cid)["w"], make_drift_state(s)["w"])


def test_kill_during_repack(tmp_path: Path) -> None:
    _kill_during_repack(tmp_path, rounds=10, seed=61)


@pytest.mark.slow
def test_kill_during_repack_many(tmp_path: Path) -> None:
    _kill_during_repack(tmp_path, rounds=100, seed=161)

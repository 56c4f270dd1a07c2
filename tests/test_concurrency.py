"""Concurrency across processes: compare-and-swap races have exactly one winner and
losers get RefConflictError; readers and fsck run safely beside a committing writer.

(Many writers on different branches and on one branch with retry:
test_repo.py::test_concurrent_writers_lose_no_update; use after fork:
test_errors.py::test_use_after_fork_raises and the tests next to it.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ckptvcs import RefConflictError, Repo
from crash_harness import HANG_GUARD, context


def _race_one_commit(store: str, barrier, result_path: str, worker: int) -> None:  # type: ignore[no-untyped-def]
    """Read the branch, wait until every racer has read it, then commit on top of it."""
    with Repo.open(store) as repo:
        real_target = repo._commit_target

        def target_then_wait(branch):  # type: ignore[no-untyped-def]
            found = real_target(branch)
            barrier.wait(HANG_GUARD)  # everyone now expects the same parent (however slow the others start)
            return found

        repo._commit_target = target_then_wait  # type: ignore[method-assign]
        try:
            cid = repo.commit({"w": torch.full((2000,), float(worker)), "worker": worker}, f"racer {worker}",
                              branch="race", code_version=None)
            outcome = f"won {cid}"
        except RefConflictError as err:
            outcome = "conflict " + str(err).replace("\n", " ")
    Path(result_path).write_text(outcome)


def test_compare_and_swap_race_has_one_winner(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with Repo.init(store, chunk_size=4096) as repo:
        tip = repo.commit({"w": torch.zeros(2000)}, "base", branch="race", code_version=None)
    ctx = context()
    racers = 4
    for race in range(4):
        barrier = ctx.Barrier(racers)
        results = [tmp_path / f"race{race}-{w}.txt" for w in range(racers)]
        procs = [ctx.Process(target=_race_one_commit, args=(str(store), barrier, str(results[w]), w))
                 for w in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(HANG_GUARD)
        assert [p.exitcode for p in procs] == [0] * racers
        outcomes = [r.read_text() for r in results]
        winners = [o.split()[1] for o in outcomes if o.startswith("won ")]
        assert len(winners) == 1, outcomes
        losers = [o for o in outcomes if o.startswith("conflict ")]
        assert len(losers) == racers - 1 and all("refs/heads/race moved" in o for o in losers)
        with Repo.open(store) as repo:
            assert repo.resolve("race") == winners[0]
            assert repo.show(winners[0]).parents == (tip,)  # nothing lost: the winner built on the old tip
            assert [e.new for e in repo.reflog("race")][0] == winners[0]
            report = repo.fsck(read_data=True)
            assert report.ok, [str(f) for f in report.errors]
            dangling = [f for f in report.garbage if f.kind == "dangling"]
            assert len(dangling) == (racers - 1) * (race + 1)  # the losers' commits: garbage, not damage
        tip = winners[0]


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not Path(path).exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.001)


def _commit_counting(store: str, count: int, go: str, halfway: str) -> None:
    """Commit j = 1..count; after half of them, wait until the reader has checked some."""
    _wait_for(go)
    with Repo.open(store) as repo:
        for j in range(1, count + 1):
            repo.commit({"w": torch.full((3000,), float(j)), "j": j}, f"j={j}", code_version=None)
            if j == count // 2:
                _wait_for(halfway)  # a fast writer cannot finish before a slow reader starts


def test_reader_and_fsck_beside_a_committing_writer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with Repo.init(store, chunk_size=4096) as repo:
        first = repo.commit({"w": torch.zeros(3000), "j": 0}, "j=0", code_version=None)
    go, halfway = tmp_path / "go", tmp_path / "halfway"
    writer = context().Process(target=_commit_counting, args=(str(store), 30, str(go), str(halfway)))
    writer.start()
    seen: list[int] = []
    fsck_runs = 0
    with Repo.open(store) as repo:
        go.write_text("")
        while not seen or seen[-1] < 30:  # until the reader saw the last commit
            assert writer.is_alive() or writer.exitcode == 0, f"writer failed ({writer.exitcode})"
            state = repo.load("main")  # whatever main names is complete and self-consistent
            assert torch.equal(state["w"], torch.full((3000,), float(state["j"])))
            seen.append(state["j"])
            assert repo.load(first)["j"] == 0  # old commits keep loading
            if len(seen) % 5 == 0:
                report = repo.fsck()  # a commit in flight is garbage at worst, never damage
                assert report.ok, [str(f) for f in report.errors]
                fsck_runs += 1
                halfway.touch()
        writer.join(HANG_GUARD)
        assert writer.exitcode == 0
        assert seen == sorted(seen)  # main only moves forward
        assert repo.load("main")["j"] == 30
        assert len(repo.log()) == 31
        assert repo.fsck(read_data=True).findings == []
    assert len(set(seen)) >= 2 and fsck_runs >= 1


def _open_or_init(store: str, barrier, result_path: str) -> None:  # type: ignore[no-untyped-def]
    """What every rank of a job runs; the rename that publishes a new repository waits
    until every racer is about to make it, so all of them race for it."""
    import ckptvcs._fs as fs
    from ckptvcs import NotARepositoryError, RepositoryExistsError

    real = fs.durable_rename

    def rename_together(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst) == Path(store):
            barrier.wait(60)
        return real(src, dst)

    fs.durable_rename = rename_together
    try:
        try:
            repo = Repo.open(store)
        except NotARepositoryError:
            try:
                repo = Repo.init(store)
            except RepositoryExistsError:
                repo = Repo.open(store)
        with repo:
            outcome = repo.config["id"]
    except Exception as err:  # reported to the test, which names it
        outcome = f"{type(err).__name__}: {err}"
    Path(result_path).write_text(outcome)


def test_ranks_racing_open_or_init_all_get_one_repository(tmp_path: Path) -> None:
    ctx = context()
    racers = 4
    barrier = ctx.Barrier(racers)
    store = tmp_path / "shared"
    results = [tmp_path / f"rank{w}.txt" for w in range(racers)]
    procs = [ctx.Process(target=_open_or_init, args=(str(store), barrier, str(results[w]))) for w in range(racers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * racers
    ids = {r.read_text() for r in results}
    assert len(ids) == 1 and len(ids.pop()) == 32, [r.read_text() for r in results]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shared")) == []  # no staging left

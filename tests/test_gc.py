"""Garbage collection: reclaiming space, keeping every kept commit bit-exact, crash points, a racing writer."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
from click.testing import CliRunner
from gc_workers import chain_committer, chain_state
from helpers import assert_tensor_identical, store_snapshot, tree_size

from ckptvcs import CommitPrunedError, ProtectedCommitError, Repo, StorageError
from ckptvcs.cli import cli


def tensor(seed: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def build_history(repo: Repo) -> dict[str, dict]:
    """Four commits; each shares a small tensor with the others and has a large one of its own."""
    shared = tensor(0, 2048)
    states = {}
    for i in range(1, 5):
        state = {"shared": shared, "own": tensor(i, 32768), "i": i}
        states[repo.commit(state, f"c{i}", step=i, code_version=None)] = state
    return states


def assert_loads_exactly(repo: Repo, commit_id: str, state: dict) -> None:
    loaded = repo.load(commit_id)
    assert loaded["i"] == state["i"]
    for key in ("shared", "own"):
        assert_tensor_identical(loaded[key], state[key])


def test_gc_releases_pruned_data_and_kept_commits_load_bit_exact(small_repo) -> None:
    states = build_history(small_repo)
    ids = list(states)
    packs_before = tree_size(small_repo.root / "packs")
    for cid in ids[:2]:
        small_repo.prune(cid, "keep_last=2", "test")
    report = small_repo.gc()
    packs_after = tree_size(small_repo.root / "packs")
    assert report.bytes_reclaimed == packs_before - packs_after
    # two large tensors' worth of chunks (byte planes keep ~86% of randn float32)
    assert packs_before - packs_after >= 2 * 32768 * 4 * 0.8
    assert report.live_commits == 2 and report.pruned_commits == 2
    # c1's pack also held the shared tensor: it was rewritten, not kept whole or deleted.
    assert len(report.packs_rewritten) == 1 and len(report.packs_deleted) == 1
    for cid in ids[2:]:
        assert_loads_exactly(small_repo, cid, states[cid])
    for cid in ids[:2]:
        assert small_repo.show(cid).step == states[cid]["i"]  # history stays
        with pytest.raises(CommitPrunedError):
            small_repo.load(cid)
    again = small_repo.gc()
    assert again.bytes_reclaimed == 0 and not again.packs_deleted and not again.packs_rewritten


def test_gc_survives_reopening_and_new_commits_dedup_against_moved_chunks(small_repo, tmp_path) -> None:
    states = build_history(small_repo)
    ids = list(states)
    small_repo.prune(ids[0], "manual")
    small_repo.gc()
    small_repo.close()
    with Repo.open(small_repo.root) as repo:
        new = repo.commit({"shared": tensor(0, 2048), "own": tensor(1, 32768), "i": 1}, code_version=None)
        assert repo.show(new).stats["new_chunks"] == 32  # only c1's own tensor, released by gc, is new
        assert_loads_exactly(repo, new, states[ids[0]])
        for cid in ids[1:]:
            assert_loads_exactly(repo, cid, states[cid])


def test_dry_run_changes_nothing_and_predicts_the_real_run(small_repo) -> None:
    states = build_history(small_repo)
    for cid in list(states)[:3]:
        small_repo.prune(cid, "manual")
    (small_repo.root / "tmp" / "pack-leftover.tmp").write_bytes(b"x" * 1000)
    before = store_snapshot(small_repo.root)
    predicted = small_repo.gc(dry_run=True)
    assert store_snapshot(small_repo.root) == before
    actual = small_repo.gc()
    assert predicted.packs_deleted == actual.packs_deleted and predicted.packs_rewritten == actual.packs_rewritten
    # The real run also pays a header and footer per new pack.
    assert 0 <= predicted.bytes_reclaimed - actual.bytes_reclaimed <= 72 * len(actual.packs_written)
    assert actual.tmp_files_removed == 1 and not any((small_repo.root / "tmp").iterdir())


def test_unreachable_commits_are_collected_and_refs_protect(small_repo) -> None:
    small_repo.commit({"w": tensor(1, 8192)}, "base", code_version=None)
    small_repo.branch("side")
    small_repo.checkout("side")
    side = small_repo.commit({"w": tensor(2, 8192)}, "side", code_version=None)
    small_repo.tag("keep-me", side)
    small_repo.commit({"w": tensor(3, 8192)}, "side 2", code_version=None)
    small_repo.checkout("main")
    small_repo.delete_branch("side")
    report = small_repo.gc()
    assert report.live_commits == 2  # base, and the tagged commit; "side 2" is unreachable
    assert report.bytes_reclaimed > 8192 * 4 * 0.8  # byte planes keep ~86% of randn float32
    assert_tensor_identical(small_repo.load("keep-me")["w"], tensor(2, 8192))
    with pytest.raises(ProtectedCommitError):
        small_repo.prune("keep-me", "manual")


def test_crash_before_the_index_update_loses_nothing(small_repo, monkeypatch) -> None:
    states = build_history(small_repo)
    ids = list(states)
    small_repo.prune(ids[0], "manual")

    def crash(*args, **kwargs):
        raise StorageError("simulated crash before the index update")

    monkeypatch.setattr(small_repo.chunks.index, "update", crash)
    with pytest.raises(StorageError):
        small_repo.gc()
    monkeypatch.undo()
    for cid in ids[1:]:
        assert_loads_exactly(small_repo, cid, states[cid])
    report = small_repo.gc()  # the orphan copy written by the crashed gc is cleaned up now
    assert report.packs_rewritten and report.packs_deleted
    for cid in ids[1:]:
        assert_loads_exactly(small_repo, cid, states[cid])
    assert small_repo.gc().bytes_reclaimed == 0


def test_crash_before_deleting_old_packs_loses_nothing(small_repo, monkeypatch) -> None:
    states = build_history(small_repo)
    ids = list(states)
    small_repo.prune(ids[0], "manual")
    monkeypatch.setattr(small_repo.chunks.packs, "forget", lambda pack: (_ for _ in ()).throw(StorageError("crash")))
    with pytest.raises(StorageError):
        small_repo.gc()
    monkeypatch.undo()
    for cid in ids[1:]:
        assert_loads_exactly(small_repo, cid, states[cid])
    report = small_repo.gc()  # the old packs nothing indexes any more are deleted now
    assert len(report.packs_deleted) == 1 and not report.packs_rewritten
    for cid in ids[1:]:
        assert_loads_exactly(small_repo, cid, states[cid])


@pytest.mark.parametrize("count", [40, pytest.param(400, marks=pytest.mark.slow)])
def test_gc_concurrent_with_a_committing_process(small_repo, count) -> None:
    small_repo.commit(chain_state(0), "chain 0", branch="chain", step=0, code_version=None)
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=chain_committer, args=(str(small_repo.root), 1, count))
    writer.start()
    rounds = 0
    try:
        while writer.is_alive() or rounds == 0:
            for commit in small_repo.log("chain")[1:]:
                if not commit.pruned:
                    try:
                        small_repo.prune(commit.id, "keep_last=1")
                    except ProtectedCommitError:
                        pass
            small_repo.gc()
            rounds += 1
    finally:
        writer.join(120)
    assert writer.exitcode == 0
    assert rounds >= 2
    history = small_repo.log("chain")
    assert len(history) == count + 1
    kept = [c for c in history if c.pruned is None]
    assert kept, "the head is never pruned"
    for commit in kept:
        loaded = small_repo.load(commit.id)
        expected = chain_state(commit.step)
        assert_tensor_identical(loaded["new"], expected["new"])
        assert_tensor_identical(loaded["old"], expected["old"])
    small_repo.gc()
    head = small_repo.load("chain")
    assert_tensor_identical(head["old"], chain_state(count)["old"])


def test_cli_gc_reports_and_dry_run(small_repo) -> None:
    states = build_history(small_repo)
    small_repo.prune(list(states)[0], "manual")
    root = str(small_repo.root)
    runner = CliRunner()
    dry = runner.invoke(cli, ["--repo", root, "gc", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would reclaim" in dry.output and "(1 pruned)" in dry.output
    real = runner.invoke(cli, ["--repo", root, "gc", "--json"])
    assert real.exit_code == 0, real.output
    report = json.loads(real.output)
    assert report["bytes_reclaimed"] > 0 and report["dry_run"] is False
    assert runner.invoke(cli, ["--repo", root, "gc", "--help"]).exit_code == 0


def test_a_reader_holding_a_stale_location_follows_the_moved_chunk(small_repo) -> None:
    states = build_history(small_repo)
    ids = list(states)
    shared_chunk = bytes.fromhex(small_repo.manifest(ids[1]).blobs[0]["chunks"][0])
    stale = small_repo.chunks.index.get(shared_chunk)  # looked up before gc ...
    small_repo.prune(ids[0], "manual")
    report = small_repo.gc()
    assert stale.pack in report.packs_rewritten  # ... which moved it to a new pack
    out = bytearray(stale.raw_len)
    assert small_repo.chunks._read_chunk(stale, memoryview(out), lambda: "shared tensor") == stale.raw_len
    assert bytes(out) == states[ids[1]]["shared"].numpy().tobytes()[: stale.raw_len]


GC_CHILD = """
import sys, time
from ckptvcs import Repo, _fs
real_fsync = _fs._fsync
def slow_fsync(fd):  # stretch gc so the kill lands inside it, phase by phase
    time.sleep(0.02)
    real_fsync(fd)
_fs._fsync = slow_fsync
repo = Repo.open(sys.argv[1])
print("go", flush=True)
repo.gc()
print("done", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.015, 0.035, 0.06])
def test_sigkill_during_gc_loses_no_kept_commit(small_repo, delay) -> None:
    import signal
    import subprocess
    import sys
    import time

    shared = tensor(0, 2048)
    states = {}
    for i in range(1, 13):
        state = {"shared": shared, "own": tensor(i, 32768), "i": i}
        states[small_repo.commit(state, f"c{i}", step=i, code_version=None)] = state
    kept = list(states)[1::2]
    for cid in list(states)[0:-1:2]:
        small_repo.prune(cid, "manual")
    (small_repo.root / "tmp" / "pack-interrupted.tmp").write_bytes(b"x" * 4096)
    child = subprocess.Popen([sys.executable, "-c", GC_CHILD, str(small_repo.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "go"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        # Killed inside gc (each fsync takes 20 ms there: 4+ of them); a very slow parent
        # may kill it only after it finished, which must leave a good store too.
        assert child.wait(600) in (-signal.SIGKILL, 0)
    finally:
        child.kill()
    for cid in kept:
        assert_loads_exactly(small_repo, cid, states[cid])
    small_repo.gc()  # finishes what the killed gc started
    for cid in kept:
        assert_loads_exactly(small_repo, cid, states[cid])
    assert small_repo.gc(dry_run=True).bytes_reclaimed == 0

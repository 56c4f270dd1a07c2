"""Garbage collection: reclaiming space, keeping every kept commit bit-exact, crash points, a racing writer."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from datetime import timedelta

import pytest
import torch
from click.testing import CliRunner

from ckptvcs import (
    CommitCollectedError,
    CommitPrunedError,
    IntegrityError,
    InvalidInputError,
    ProtectedCommitError,
    Repo,
    StorageError,
)
from ckptvcs.cli import cli
from ckptvcs.expiry import parse_expiry
from ckptvcs.gc import COLLECTED_RULE
from gc_workers import chain_committer, chain_state
from helpers import assert_tensor_identical, store_snapshot, tree_size


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
    small_repo.delete_branch("side", force=True)
    report = small_repo.gc(prune_unreachable_after="now")
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


# -- what gc keeps: refs, and the reflog's grace (issue 10) ---------------------------------


def _leave_a_detached_commit_and_a_deleted_branch(repo: Repo) -> tuple[str, str]:
    """``(commit left behind by a checkout from a detached HEAD, tip of a force-deleted branch)``."""
    repo.commit({"w": tensor(1, 8192)}, "base", code_version=None)
    repo.checkout(repo.resolve("HEAD"))
    detached = repo.commit({"w": tensor(2, 8192)}, "detached work", code_version=None)
    repo.checkout("main")
    deleted = repo.commit({"w": tensor(3, 8192)}, "experiment", branch="exp", code_version=None)
    repo.delete_branch("exp", force=True)
    return detached, deleted


def test_gc_keeps_commits_a_young_reflog_entry_names(small_repo) -> None:
    detached, deleted = _leave_a_detached_commit_and_a_deleted_branch(small_repo)
    report = small_repo.gc()
    assert report.live_commits == 3 and not report.collected_commits and not report.packs_deleted
    assert_tensor_identical(small_repo.load(detached)["w"], tensor(2, 8192))
    assert_tensor_identical(small_repo.load(deleted)["w"], tensor(3, 8192))
    small_repo.branch("rescued", deleted)  # recoverable like git's `branch NAME <reflog id>`
    assert small_repo.fsck().ok


def test_a_deleted_tags_commit_gets_the_grace_too(small_repo) -> None:
    small_repo.commit({"w": tensor(1, 8192)}, "base", code_version=None)
    tagged = small_repo.commit({"w": tensor(2, 8192)}, "release", branch="rel", code_version=None)
    small_repo.tag("v1", tagged)
    small_repo.delete_branch("rel")  # the tag contains it
    small_repo.delete_tag("v1")  # the tag's reflog names the tag object: peeled to its commit
    small_repo.gc()
    assert_tensor_identical(small_repo.load(tagged)["w"], tensor(2, 8192))
    assert small_repo.gc(prune_unreachable_after="now").collected_commits == [tagged]


def test_reflog_grace_ends_at_the_expiry(small_repo, monkeypatch) -> None:
    detached, deleted = _leave_a_detached_commit_and_a_deleted_branch(small_repo)
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 31 * 86400 * 10**9)  # a month later
    assert small_repo.gc(prune_unreachable_after="never").live_commits == 3
    assert small_repo.gc(prune_unreachable_after="2.months", dry_run=True).live_commits == 3
    report = small_repo.gc()  # the default: 30 days
    assert sorted(report.collected_commits) == sorted([detached, deleted])
    assert report.live_commits == 1 and report.bytes_reclaimed > 2 * 8192 * 4 * 0.8


def test_reflog_expiry_comes_from_config_and_prune_now_overrides(tmp_path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096, reflog_expire="never") as repo:
        assert json.loads((repo.root / "config.json").read_text())["reflog_expire"] == "never"
        detached, deleted = _leave_a_detached_commit_and_a_deleted_branch(repo)
        assert repo.gc().live_commits == 3
        report = repo.gc(prune_unreachable_after="now")
        assert sorted(report.collected_commits) == sorted([detached, deleted]) and report.live_commits == 1
    with pytest.raises(InvalidInputError, match="2.fortnights"):
        Repo.init(tmp_path / "bad", reflog_expire="2.fortnights")


def test_a_repository_without_the_expiry_key_keeps_the_default(small_repo) -> None:
    config_path = small_repo.root / "config.json"
    config = json.loads(config_path.read_text())
    del config["reflog_expire"]
    config_path.write_text(json.dumps(config))
    with Repo.open(small_repo.root) as old:
        assert old.reflog_expire == 30 * 86400
        _leave_a_detached_commit_and_a_deleted_branch(old)
        assert old.gc().live_commits == 3


@pytest.mark.parametrize(("text", "seconds"), [
    ("now", 0), ("never", math.inf), ("90s", 90), ("30.minutes", 1800), ("12h", 43200), ("7d", 7 * 86400),
    ("2.weeks", 14 * 86400), ("1.week", 7 * 86400), ("3.months", 90 * 86400), ("1.year", 365 * 86400),
    (timedelta(hours=1), 3600), (5, 5),
])
def test_expiry_grammar(text, seconds) -> None:
    assert parse_expiry(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "1.5d", "2 weeks ago", "yesterday", None, True, -3])
def test_expiry_grammar_refuses_the_rest(text) -> None:
    with pytest.raises(InvalidInputError, match="invalid expiry"):
        parse_expiry(text)


# -- collected data is a state, not damage (issue 10, point 3) -----------------------------


def test_a_collected_commit_is_on_record_not_damaged(small_repo) -> None:
    detached, _ = _leave_a_detached_commit_and_a_deleted_branch(small_repo)
    small_repo.gc(prune_unreachable_after="now")
    record = small_repo.pruned_record(detached)
    assert record is not None and record["rule"] == "gc" and "collected" in record
    with pytest.raises(CommitCollectedError) as err:
        small_repo.load(detached)
    assert err.value.exit_code == 14 and not isinstance(err.value, IntegrityError)
    assert "collected by gc" in str(err.value)
    assert small_repo.show(detached).pruned["rule"] == "gc"  # history stays, and says so
    for make_ref in (lambda: small_repo.branch("x", detached), lambda: small_repo.tag("t", detached)):
        with pytest.raises(CommitCollectedError, match="cannot create"):
            make_ref()
    assert "x" not in small_repo.branches() and "t" not in small_repo.tags()
    small_repo.checkout(detached)  # looking at history is allowed; fsck then walks it
    report = small_repo.fsck(read_data=True)
    assert report.ok, report.errors
    small_repo.checkout("main")
    assert small_repo.gc().bytes_reclaimed == 0 and not small_repo.gc().collected_commits


def test_pruned_commits_get_their_collection_time_and_refuse_new_refs(small_repo) -> None:
    states = build_history(small_repo)
    first = list(states)[0]
    small_repo.prune(first, "keep_last=3", "test")
    with pytest.raises(CommitPrunedError, match="cannot create branch"):
        small_repo.branch("x", first)
    assert "collected" not in small_repo.pruned_record(first)
    small_repo.gc(dry_run=True)
    assert "collected" not in small_repo.pruned_record(first)
    small_repo.gc()
    record = small_repo.pruned_record(first)
    assert record["rule"] == "keep_last=3" and "collected" in record


def test_cli_marks_collected_commits_and_refuses_refs_to_them(small_repo) -> None:
    detached, _ = _leave_a_detached_commit_and_a_deleted_branch(small_repo)
    root = str(small_repo.root)
    runner = CliRunner()
    dry = runner.invoke(cli, ["--repo", root, "gc", "--prune=now", "--dry-run"])
    assert dry.exit_code == 0 and "2 unreachable commit(s) would lose their data" in dry.output
    assert small_repo.pruned_record(detached) is None
    real = runner.invoke(cli, ["--repo", root, "gc", "--prune", "now"])
    assert real.exit_code == 0 and "2 unreachable commit(s) lost their data" in real.output
    log = runner.invoke(cli, ["--repo", root, "log", "--oneline", detached])
    assert f"{detached[:12]} [collected by gc] detached work" in log.output
    show = runner.invoke(cli, ["--repo", root, "show", detached])
    assert show.exit_code == 0 and "Collected: by gc on" in show.output
    refused = runner.invoke(cli, ["--repo", root, "branch", "x", detached])
    assert refused.exit_code == 14 and "collected by gc" in refused.output
    bad = runner.invoke(cli, ["--repo", root, "gc", "--prune=soon"])
    assert bad.exit_code == 9 and "invalid expiry 'soon'" in bad.output


def test_pruning_an_already_pruned_or_collected_commit_keeps_its_first_record(small_repo) -> None:
    """A second prune (by hand, or another rule) must not overwrite a record, least of all one
    saying gc collected the data: the commit would then read as pruned with data on disk."""
    base = small_repo.commit({"w": tensor(1, 8192)}, "base", code_version=None)
    small_repo.checkout(base)
    lost = small_repo.commit({"w": tensor(2, 8192)}, "detached", code_version=None)
    small_repo.checkout("main")
    small_repo.gc(prune_unreachable_after="now")
    record = small_repo.pruned_record(lost)
    assert record is not None and record["rule"] == COLLECTED_RULE and "collected" in record
    assert small_repo.prune(lost, "manual", "by hand") == lost
    assert small_repo.pruned_record(lost) == record
    with pytest.raises(CommitCollectedError):
        small_repo.load(lost)
    older = small_repo.commit({"w": tensor(3, 8192)}, "next", code_version=None)
    small_repo.commit({"w": tensor(4, 8192)}, "head", code_version=None)
    small_repo.prune(older, "keep_last=1", "first")
    first = small_repo.pruned_record(older)
    small_repo.prune(older, "manual", "second")
    assert small_repo.pruned_record(older) == first

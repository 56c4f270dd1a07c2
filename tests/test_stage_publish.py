"""Commit as stage + publish: stage makes a state durable without moving a ref; publish
writes the commit and moves the ref by compare-and-swap; a stage never published is
garbage that gc reclaims after the staged grace, never damage."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from ckptvcs import (
    InvalidInputError,
    RefConflictError,
    Repo,
    Staged,
    StagedDataCollectedError,
    UnsupportedValueError,
)
from ckptvcs.objects import canonical_json
from crash_harness import CHUNK_SIZE, ack, kill_child_timed, make_state, read_acks
from helpers import assert_tensor_identical


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6000, generator=g), "b": torch.randn(300, generator=g).half(), "step": seed}


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert_tensor_identical(actual["w"], expected["w"])
    assert_tensor_identical(actual["b"], expected["b"])
    assert actual["step"] == expected["step"]


def _refs(repo: Repo) -> tuple:
    """Everything a ref move changes: branches, tags, HEAD and every reflog."""
    logs = {ref: len(repo.reflog(ref)) for ref in ["HEAD", *[f"refs/heads/{b}" for b in repo.branches()]]}
    return repo.branches(), repo.tags(), repo.head(), logs


def _commit_objects(repo: Repo) -> set[str]:
    return {oid for oid in repo.objects if repo.objects.kind(oid) == "commit"}


def _age_staged_record(repo: Repo, manifest_id: str, days: float) -> None:
    """Rewrite a staged record as if staged ``days`` ago (no sleeping on the clock)."""
    path = repo.root / "staged" / manifest_id
    record = json.loads(path.read_bytes())
    old = datetime.now(timezone.utc) - timedelta(days=days)
    record["time"] = old.isoformat(timespec="microseconds").replace("+00:00", "Z")
    path.write_bytes(canonical_json(record) + b"\n")


@pytest.fixture
def repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Repo.init(tmp_path / "store", chunk_size=CHUNK_SIZE) as r:
        yield r


def test_stage_then_publish_equals_commit(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "a", chunk_size=CHUNK_SIZE) as a, Repo.init(tmp_path / "b", chunk_size=CHUNK_SIZE) as b:
        meta = dict(step=2, epoch=1, metrics={"loss": 0.5}, config={"lr": 1e-3}, data_version="v1", code_version=None)
        a.commit(_state(1), "one", code_version=None)
        b.commit(_state(1), "one", code_version=None)
        via_commit = a.commit(_state(2), "two", **meta)
        staged = b.stage(_state(2))
        assert staged.parent == b.resolve("HEAD")
        via_publish = b.publish(staged, "two", **meta)
        ca, cb = a.show(via_commit), b.show(via_publish)
        # Content-addressed and deterministic: the same state makes the same manifest,
        # delta-encoded against the same parent chunks.
        assert ca.manifest == cb.manifest == staged.manifest
        assert a.manifest(via_commit).blobs == b.manifest(via_publish).blobs
        def sizes(stats: dict) -> dict:  # save_seconds is a measured time: it differs run to run
            return {k: v for k, v in stats.items() if k != "save_seconds"}

        assert sizes(ca.stats) == sizes(cb.stats) == sizes(staged.stats)
        assert ca.stats["save_seconds"] >= 0 and cb.stats == staged.stats
        for field in ("message", "step", "epoch", "metrics", "config", "data_version", "code_version"):
            assert getattr(ca, field) == getattr(cb, field), field
        assert cb.parents == (b.resolve("HEAD~1"),)
        assert b.resolve("HEAD") == via_publish
        assert [e.message for e in b.reflog("main")] == [e.message for e in a.reflog("main")]
        assert [e.message for e in b.reflog("HEAD")] == [e.message for e in a.reflog("HEAD")]
        _assert_same_state(b.load(via_publish), _state(2))
        assert not (b.root / "staged" / staged.manifest).exists()  # publish dropped the record
        assert not (a.root / "staged").exists()  # commit needs none: it holds the lock throughout
        assert b.fsck(read_data=True).ok


def test_stage_moves_no_ref_and_is_garbage_not_damage(repo: Repo) -> None:
    repo.commit(_state(1), "one", code_version=None)
    before = _refs(repo)
    staged = repo.stage(_state(2))
    assert isinstance(staged, Staged) and staged.new_chunks > 0 and staged.tensors == 2
    assert _refs(repo) == before
    assert (repo.root / "staged" / staged.manifest).is_file()
    report = repo.fsck(read_data=True)
    assert report.ok and not report.errors
    assert any(f"staged/{staged.manifest}" in f.objects for f in report.garbage)
    assert all(f.kind in ("garbage", "dangling", "unreachable") for f in report.garbage)


def test_gc_keeps_staged_data_within_the_grace(repo: Repo) -> None:
    repo.commit(_state(1), "one", code_version=None)
    staged = repo.stage(_state(2))
    report = repo.gc(prune_unreachable_after="now")
    assert report.staged_kept == 1 and report.staged_expired == []
    cid = repo.publish(staged, "two", code_version=None)
    _assert_same_state(repo.load(cid), _state(2))
    assert repo.fsck(read_data=True).ok



def test_gc_does_not_mark_collected_an_unreachable_commit_a_stage_keeps_whole(repo: Repo) -> None:
    """An unreachable commit whose every chunk a staged state holds keeps its data, so it
    loads and gets no ``gc`` record (found by tests/test_repo_model.py: gc judged "data
    goes" against the kept commits' chunks only, then kept the staged chunks anyway)."""
    repo.commit(_state(1), "one", code_version=None)
    lost = repo.commit(_state(2), "two", branch="dev", code_version=None)
    repo.stage(_state(2))  # the same bytes, staged onto main and not published
    repo.delete_branch("dev", force=True)
    report = repo.gc(prune_unreachable_after="now")
    assert lost not in report.collected_commits
    assert not repo.is_pruned(lost)
    _assert_same_state(repo.load(lost), _state(2))
    assert repo.fsck(read_data=True).ok

def test_restricted_gc_keeps_even_expired_staged_data(repo: Repo) -> None:
    repo.commit(_state(1), "one", code_version=None)
    staged = repo.stage(_state(2))
    _age_staged_record(repo, staged.manifest, days=30)
    repo.gc(only=[])
    _assert_same_state(repo.load(repo.publish(staged, "two", code_version=None)), _state(2))


@pytest.mark.parametrize("how", ["override", "aged", "config"])
def test_gc_reclaims_staged_data_after_the_grace(repo: Repo, how: str) -> None:
    first = repo.commit(_state(1), "one", code_version=None)
    staged = repo.stage(_state(2))
    if how == "override":
        report = repo.gc(staged_expire="now")
    elif how == "aged":
        _age_staged_record(repo, staged.manifest, days=2)  # default grace: one day
        report = repo.gc()
    else:
        repo.config["staged_expire"] = "1s"
        _age_staged_record(repo, staged.manifest, days=0.001)
        report = repo.gc()
    assert report.staged_expired == [staged.manifest] and report.staged_kept == 0
    assert report.bytes_reclaimed > 0
    assert not (repo.root / "staged" / staged.manifest).exists()
    assert repo.fsck(read_data=True).ok
    # Publishing what gc reclaimed fails with a typed error and moves nothing.
    before, commits = _refs(repo), _commit_objects(repo)
    with pytest.raises(StagedDataCollectedError) as err:
        repo.publish(staged, "two", code_version=None)
    assert err.value.manifest_id == staged.manifest and err.value.exit_code == 14
    assert "stage the state again" in str(err.value)
    assert _refs(repo) == before and _commit_objects(repo) == commits
    # Staging again works (the chunks are stored again).
    cid = repo.publish(repo.stage(_state(2)), "two", code_version=None)
    assert repo.show(cid).parents == (first,)
    _assert_same_state(repo.load(cid), _state(2))
    assert repo.fsck(read_data=True).ok


def test_two_stages_one_branch_one_wins(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with Repo.init(store, chunk_size=CHUNK_SIZE) as r:
        base = r.commit(_state(1), "base", code_version=None)
    with Repo.open(store) as one, Repo.open(store) as two:
        staged_one = one.stage(_state(2))
        staged_two = two.stage(_state(3))
        assert staged_one.parent == staged_two.parent == base
        winner = one.publish(staged_one, "one", code_version=None)
        before = _refs(two)
        with pytest.raises(RefConflictError):
            two.publish(staged_two, "two", code_version=None)
        assert _refs(two) == before and two.resolve("main") == winner
        # The loser may publish onto its own branch instead (it did not exist: expected None).
        side = two.publish(staged_two, "two", branch="side", code_version=None)
        assert two.resolve("side") == side and two.show(side).parents == (base,)
        assert two.resolve("main") == winner and two.head() == ("main", winner)
        _assert_same_state(two.load(side), _state(3))
        assert two.fsck(read_data=True).ok


def test_publish_expected_parent_and_explicit_parent(repo: Repo) -> None:
    c1 = repo.commit(_state(1), "one", code_version=None)
    c2 = repo.commit(_state(2), "two", code_version=None)
    staged = repo.stage(_state(3), parent=c1)  # encoded against c1, not HEAD
    assert staged.parent == c1
    with pytest.raises(RefConflictError):  # main is at c2, not at the staged parent
        repo.publish(staged, "three", code_version=None)
    cid = repo.publish(staged, "three", expected_parent=c2, code_version=None)
    assert repo.show(cid).parents == (c1,) and repo.resolve("main") == cid
    root = repo.publish(repo.stage(_state(4), parent=None), "root", branch="orphan", code_version=None)
    assert repo.show(root).parents == ()
    assert repo.resolve("main") == cid


def test_stage_refuses_bad_input_before_writing(repo: Repo) -> None:
    repo.commit(_state(1), "one", code_version=None)
    with pytest.raises(UnsupportedValueError):
        repo.stage({"x": object()})
    assert not (repo.root / "staged").exists()
    staged = repo.stage(_state(2))
    before = _refs(repo)
    with pytest.raises(UnsupportedValueError):
        repo.publish(staged, "bad", metrics={"loss": "high"}, code_version=None)
    with pytest.raises(InvalidInputError):
        repo.publish("not staged", "bad")  # type: ignore[arg-type]
    assert _refs(repo) == before and (repo.root / "staged" / staged.manifest).is_file()


def test_damaged_staged_record_is_garbage_and_expires_by_file_time(repo: Repo) -> None:
    repo.commit(_state(1), "one", code_version=None)
    staged = repo.stage(_state(2))
    (repo.root / "staged" / staged.manifest).write_bytes(b"{not json")
    report = repo.fsck()
    assert report.ok
    assert any(f"staged/{staged.manifest}" in f.objects for f in report.garbage)
    assert repo.gc().staged_kept == 1  # the file is new: within the grace
    assert repo.gc(staged_expire="now").staged_expired == [staged.manifest]
    assert repo.fsck(read_data=True).ok


# -- a SIGKILL between stage and publish -------------------------------------------------


def scenario_stage_and_wait(store: str, ack_path: str, first_seed: int) -> None:
    """Stage a state, acknowledge it, then wait forever (the parent kills us before publish)."""
    import time

    with Repo.open(store) as repo:
        ack(ack_path, "ready")
        staged = repo.stage(make_state(first_seed))
        ack(ack_path, f"{staged.manifest} {staged.parent}")
        while True:
            time.sleep(60)


def test_sigkill_between_stage_and_publish(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with Repo.init(store, chunk_size=CHUNK_SIZE) as r:
        head = r.commit(make_state(1), "seed 1", code_version=None)
    ack_path = tmp_path / "acks.txt"
    code, _, _ = kill_child_timed(scenario_stage_and_wait, (str(store), str(ack_path), 7), 0.0, pace=0.0,
                                  after_acks=1)
    assert code == -9
    [(manifest, parent)] = read_acks(ack_path)
    assert parent == head
    with Repo.open(store) as repo:
        assert repo.resolve("HEAD") == head
        report = repo.fsck(read_data=True)
        assert report.ok and any(f"staged/{manifest}" in f.objects for f in report.garbage)
        cid = repo.commit(make_state(2), "seed 2", code_version=None)  # the next commit works
        assert repo.show(cid).parents == (head,)
        assert repo.gc().staged_kept == 1
        assert repo.gc(staged_expire="now").staged_expired == [manifest]
        final = repo.fsck(read_data=True)
        assert final.ok and not any(o.startswith("staged/") for f in final.garbage for o in f.objects)
        assert repo.load(cid)["seed"] == 2

"""torch.distributed.checkpoint into a repository: real gloo processes on CPU (tests/dcp_workers.py).

One world-size-4 job saves twice (FSDP2 model + AdamW, DTensors sharded and replicated,
a replicated plain tensor, non-tensor values; the second save through ``async_save``);
the other tests load it back at world size 2 and 1, kill a rank mid-save, and check
that nothing is ever unpickled.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptvcs

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from ckptvcs.integrations.dcp import (  # noqa: E402
    METADATA_KEY,
    RepoLoadPlanner,
    RepoReader,
    RepoWriter,
    is_dcp_commit,
    load_consolidated,
)
from dcp_workers import digest, full_tensors  # noqa: E402
from helpers import wait_for_ranks  # noqa: E402

WORKER = Path(__file__).with_name("dcp_workers.py")

JOB_TIMEOUT = 300  # seconds for a whole job on a busy machine; a hang fails instead of blocking CI


def run_job(tmp: Path, scenario: str, world: int, repo: Path, *extra: str) -> list[dict[str, Any]]:
    """Run ``world`` ranks of ``scenario`` to completion; their JSON results, by rank."""
    out = tmp / f"{scenario}-{world}-out"
    out.mkdir()
    store = tmp / f"{scenario}-{world}-store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(r), str(world), str(store), str(repo), str(out), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    return [result if result is not None else {"returncode": code, "log": log}
            for result, code, log in wait_for_ranks(procs, out, JOB_TIMEOUT)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A repository holding two world-size-4 saves (the second by async_save)."""
    tmp = tmp_path_factory.mktemp("dcp")
    repo_path = tmp / "repo"
    ckptvcs.Repo.init(repo_path).close()
    results = run_job(tmp, "save", 4, repo_path)
    for r in results:
        assert "first" in r, r
    return repo_path, results


def test_each_save_is_one_commit_with_history(saved: Any) -> None:
    repo_path, results = saved
    with ckptvcs.Repo.open(repo_path) as repo:
        log = repo.log()
        assert [c.message for c in log] == ["second", "first"]
        # every rank got the commit id from dcp.save / async_save's Metadata
        assert {r["second"] for r in results} == {log[0].id} and {r["first"] for r in results} == {log[1].id}
        assert log[0].parents == (log[1].id,)
        assert log[1].step == 1 and log[1].metrics["loss"] == pytest.approx(results[0]["losses"][1])
        assert is_dcp_commit(repo)
        assert not os.listdir(repo_path / "staged")  # published: no staged record left behind
        assert repo.fsck(read_data=True).ok


def test_replicated_bytes_stored_once_and_second_save_dedups(saved: Any) -> None:
    repo_path, _ = saved
    full = full_tensors(1)
    with ckptvcs.Repo.open(repo_path) as repo:
        first, second = repo.log()[1], repo.log()[0]
        unique = sum(t.numel() * t.element_size() for t in full.values())
        # every logical tensor once, though 4 ranks hold the replicated ones
        assert unique <= first.stats["logical_bytes"] < unique + 64 * 1024
        # the second save changed one row of `sharded` and the small model: a fraction is new
        assert second.stats["new_stored_bytes"] < first.stats["new_stored_bytes"] / 3
        replicated = [k for k in repo.manifest().root["dict"] if k[0].startswith("extra.replicated@")]
        assert len(replicated) == 1  # DCP's planner wrote it on one rank; content addressing keeps one copy


def test_load_at_same_world_size_is_bit_exact(saved: Any) -> None:
    _, results = saved  # the save job reloaded its first commit into a fresh model on its 4 ranks
    for rank in range(4):
        assert results[rank]["reloaded1"] == results[rank]["state1"]
        assert results[rank]["resumed_losses"] == results[rank]["losses"][2:3]  # training resumes identically


@pytest.mark.slow
def test_load_head_in_a_new_job_at_same_world_size(saved: Any, tmp_path: Path) -> None:
    repo_path, results = saved
    loaded = run_job(tmp_path, "load", 4, repo_path, results[0]["second"])
    for rank in range(4):
        assert loaded[rank].get("state") == results[rank]["state2"], loaded[rank].get("log", "")
        assert loaded[rank]["losses_after"] == results[rank]["losses_after"]  # training resumes identically


def test_reshard_4_to_2(saved: Any, tmp_path: Path) -> None:
    repo_path, results = saved
    loaded = run_job(tmp_path, "load", 2, repo_path, results[0]["second"])
    for rank in range(2):
        state = loaded[rank].get("state")
        assert state is not None, loaded[rank].get("log", "")
        assert state["step"] == 2 and state["meta"] == {"name": "run-a", "lr": 0.01}
        assert state["extra"]["dt_replicated"] == digest(full_tensors(2)["dt_replicated"])
        rows = full_tensors(2)["sharded"].chunk(2)[rank]
        assert state["extra"]["sharded"] == digest(rows)
        assert loaded[rank]["losses_after"] == pytest.approx(results[0]["losses_after"], rel=1e-5)


def test_reshard_4_to_1_and_consolidated(saved: Any) -> None:
    repo_path, _ = saved
    with ckptvcs.Repo.open(repo_path) as repo:
        full = load_consolidated(repo, "HEAD")
        expected = full_tensors(2)
        for name, tensor in expected.items():
            assert torch.equal(full["extra"][name], tensor)
        assert full["step"] == 2 and full["meta"] == {"name": "run-a", "lr": 0.01}
        assert full["model"]["0.weight"].shape == (32, 16)
        # one process, no process group: DCP's own planner maps the shards onto full tensors
        target = {"extra": {name: torch.zeros_like(t) for name, t in expected.items()}, "step": 0}
        dcp.load(target, storage_reader=RepoReader(repo, "HEAD~1"), planner=RepoLoadPlanner(allow_partial_load=True),
                 no_dist=True)
        for name, tensor in full_tensors(1).items():
            assert torch.equal(target["extra"][name], tensor)
        assert target["step"] == 1


def test_rank_killed_mid_save_leaves_no_commit(saved: Any, tmp_path: Path) -> None:
    src, _ = saved
    repo_path = tmp_path / "repo"
    with ckptvcs.Repo.open(src) as repo:
        repo.branch("copy")  # a second repository would cost another save job: copy this one's files
    import shutil

    shutil.copytree(src, repo_path)
    with ckptvcs.Repo.open(repo_path) as repo:
        head = repo.head()[1]
    results = run_job(tmp_path, "die", 2, repo_path)
    assert results[1]["returncode"] == 17
    assert "saved" not in results[0]
    with ckptvcs.Repo.open(repo_path) as repo:
        assert repo.head()[1] == head
        assert [c.message for c in repo.log()][:1] == ["second"]
        report = repo.fsck()
        assert report.ok, report.errors
        assert any("staged" in f.message for f in report.garbage)  # the dead save's data: garbage, reclaimable
        repo.gc(staged_expire="now")
        assert repo.fsck(read_data=True).ok


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickled while loading")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def _single_process_save(repo: ckptvcs.Repo) -> dict[str, Any]:
    state = {"w": torch.randn(300, 7), "i": torch.arange(5), "step": 3, "cfg": {"name": "x", "betas": (0.9, 0.99)}}
    writer = RepoWriter(repo, message="one", step=3)
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert writer.commit_id == repo.head()[1]
    return state


def test_loading_never_unpickles(tmp_path: Path, no_unpickling: None) -> None:
    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        state = _single_process_save(repo)
        for planner in (RepoLoadPlanner(), dcp.DefaultLoadPlanner(), None):
            target = {"w": torch.zeros(300, 7), "i": torch.zeros(5, dtype=torch.long), "step": 0,
                      "cfg": {"name": "", "betas": (0.0, 0.0)}}
            dcp.load(target, storage_reader=RepoReader(repo), planner=planner, no_dist=True)
            assert torch.equal(target["w"], state["w"]) and torch.equal(target["i"], state["i"])
            assert target["step"] == 3 and target["cfg"] == {"name": "x", "betas": (0.9, 0.99)}
        assert set(load_consolidated(repo)) == {"w", "i", "step", "cfg"}
        # the metadata is plain values in the commit, readable without torch.distributed
        meta = repo.load(keys=[METADATA_KEY])[METADATA_KEY]
        assert meta["tensors"]["w"]["size"] == [300, 7] and meta["objects"] == {"step": "step@", "cfg.name": "cfg.name@",
                                                                            "cfg.betas": "cfg.betas@"}


def test_planner_that_would_unpickle_is_refused(tmp_path: Path) -> None:
    class Pickling(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise AssertionError("must not be called")

    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        _single_process_save(repo)
        with pytest.raises(CheckpointException) as caught:
            dcp.load({"step": 0}, storage_reader=RepoReader(repo), planner=Pickling(allow_partial_load=True),
                     no_dist=True)
        ((error, _trace),) = caught.value.failures.values()
        assert isinstance(error, ckptvcs.UsageError) and "overrides load_bytes" in str(error)


def test_ranged_reads_touch_only_the_needed_chunks(tmp_path: Path) -> None:
    with ckptvcs.Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        big = torch.randn(256, 64)  # 64 KiB: 16 chunks
        dcp.save({"big": big}, storage_writer=RepoWriter(repo), no_dist=True)
        reads: list[bytes] = []
        original = repo.chunks.read_into

        def counting(chunk_ids: Any, out: Any, **kw: Any) -> Any:
            reads.extend(chunk_ids)
            return original(chunk_ids, out, **kw)

        repo.chunks.read_into = counting  # type: ignore[method-assign]
        reader = RepoReader(repo)
        reader.read_metadata()
        shards = __import__("ckptvcs.integrations.dcp", fromlist=["_Shards"])._Shards(repo, repo.head()[1])
        rows = shards.read("big@0,0", [64, 0], [16, 64])  # rows 64..80: 4 KiB, one chunk
        assert torch.equal(rows, big[64:80])
        assert len(reads) == 1
        col = shards.read("big@0,0", [8, 3], [2, 5])
        assert torch.equal(col, big[8:10, 3:8])
        tail = shards.read("big@0,0", [200, 0], [56, 64])  # crosses chunk edges, ends at the blob's end
        assert torch.equal(tail, big[200:]) and len(reads) == 1 + 1 + 4


def test_combine_staged_refuses_overlapping_parts(tmp_path: Path) -> None:
    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        a = repo.stage({"x": torch.ones(3)})
        b = repo.stage({"x": torch.zeros(3)})
        with pytest.raises(ckptvcs.InvalidInputError, match="share the top-level key"):
            repo.combine_staged([a, b])
        c = repo.stage({"y": torch.zeros(3), "n": {"m": torch.arange(4)}})
        combined = repo.combine_staged([a, c])
        cid = repo.publish(combined, "both")
        state = repo.load(cid)
        assert torch.equal(state["x"], torch.ones(3)) and torch.equal(state["n"]["m"], torch.arange(4))
        assert repo.fsck(read_data=True).ok


def test_use_collectives_false_is_refused(tmp_path: Path) -> None:
    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        with pytest.raises(ckptvcs.UsageError, match="use_collectives"):
            dcp.save({"w": torch.ones(2)}, storage_writer=RepoWriter(repo), no_dist=True, use_collectives=False)
        assert repo.head()[1] is None


def test_combine_staged_needs_one_parent_and_survives_gc(tmp_path: Path) -> None:
    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        first = repo.commit({"x": torch.ones(3)})
        a = repo.stage({"x": torch.ones(3) * 2})
        b = repo.stage({"y": torch.arange(3)}, parent=None)
        with pytest.raises(ckptvcs.InvalidInputError, match="different parents"):
            repo.combine_staged([a, b])
        c = repo.stage({"y": torch.arange(3)})
        combined = repo.combine_staged([a, c])
        assert sorted(os.listdir(tmp_path / "r" / "staged")) == [combined.manifest]  # the parts' records went
        repo.gc()  # within the staged grace: the combined record keeps every part's chunks
        cid = repo.publish(combined, "combined")
        assert repo.show(cid).parents == (first,)
        assert torch.equal(repo.load(cid)["x"], torch.ones(3) * 2)
        assert not os.listdir(tmp_path / "r" / "staged")
        late = repo.combine_staged([repo.stage({"z": torch.zeros(2)})])
        repo.gc(staged_expire="now")
        with pytest.raises(ckptvcs.StagedDataCollectedError):
            repo.publish(late, "too late")
        assert repo.head()[1] == cid and repo.fsck(read_data=True).ok


def test_a_shard_is_delta_coded_against_the_parents_same_shard(tmp_path: Path) -> None:
    base = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    nudged = base + 1e-4 * torch.randn(512, 256, generator=torch.Generator().manual_seed(1))  # no chunk equal
    stored = {}
    for keyframe_interval in (1, 4):  # 1: deltas off
        with ckptvcs.Repo.init(tmp_path / str(keyframe_interval), keyframe_interval=keyframe_interval) as repo:
            for t in (base, nudged):
                dcp.save({"w": t.clone()}, storage_writer=RepoWriter(repo), no_dist=True)
            stored[keyframe_interval] = repo.show().stats["new_stored_bytes"]
            assert torch.equal(load_consolidated(repo)["w"], nudged)
    assert stored[4] < 0.8 * stored[1]


def test_identical_bytes_under_several_keys_are_stored_once(tmp_path: Path) -> None:
    """What DCP's planner does not dedup (the same bytes under different names, e.g. each rank's
    copy of a buffer under a rank-specific key), content addressing does."""
    t = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))  # 256 KiB
    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        dcp.save({f"copy{r}": t.clone() for r in range(4)}, storage_writer=RepoWriter(repo), no_dist=True)
        stats = repo.show().stats
        assert stats["logical_bytes"] == 4 * t.numel() * 4
        assert stats["new_stored_bytes"] < 1.2 * t.numel() * 4

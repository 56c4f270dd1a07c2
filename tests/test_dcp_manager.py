"""DistributedCheckpointManager and multi-host DCP saves, with real gloo ranks (tests/dcp_manager_workers.py).

Local: 2 ranks train an FSDP2 model with AdamW, saving every 2 steps with keep_last=2; every
rank is SIGKILLed mid-run; fresh processes restore and the continued losses equal an
uninterrupted run's bit for bit. Object storage: 2 ranks that share no directory (each its
own working and temporary directory) save to a SeaweedFS bucket; the commit loads back at
world size 2 and 1 bit-exactly; a rank killed before the commit leaves none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptvcs

pytest.importorskip("torch.distributed.checkpoint")
from ckptvcs.integrations.dcp import RepoWriter, load_consolidated  # noqa: E402
from ckptvcs.integrations.dcp_manager import DistributedCheckpointManager  # noqa: E402
from helpers import wait_for_ranks  # noqa: E402

WORKER = Path(__file__).with_name("dcp_manager_workers.py")
JOB_TIMEOUT = 300  # a whole job on a busy machine; a hang fails instead of blocking CI


def run_job(tmp: Path, name: str, scenario: str, repo: str, *args: str, env: dict[str, str] | None = None,
            hosts: bool = False) -> list[dict[str, Any]]:
    """Run 2 ranks of ``scenario``; their JSON results by rank (or their exit code and log).

    ``hosts``: every rank gets its own working and temporary directory, nothing shared.
    """
    out = tmp / f"{name}-out"
    out.mkdir()
    procs = []
    for rank in range(2):
        home = tmp / f"{name}-host{rank}"
        (home / "tmp").mkdir(parents=True)
        rank_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
        if hosts:
            rank_env["TMPDIR"] = str(home / "tmp")
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(rank), "2", str(tmp / f"{name}-store"), repo, str(out), *args],
            env=rank_env, cwd=home if hosts else None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return [{**(result or {}), "returncode": code, "log": log}
            for result, code, log in wait_for_ranks(procs, out, JOB_TIMEOUT)]


@pytest.mark.parametrize("total, kill_after, every", [
    (8, 5, 2),
    pytest.param(20, 13, 3, marks=pytest.mark.slow),
])
def test_killed_and_resumed_run_gives_identical_losses(tmp_path: Path, total: int, kill_after: int, every: int) -> None:
    repo_path = tmp_path / "repo"
    ckptvcs.Repo.init(repo_path).close()
    killed = run_job(tmp_path, "killed", "train", str(repo_path), str(total), str(kill_after), str(every))
    for r in killed:
        assert r["returncode"] == -9 and r.get("resumed_at") is None, r["log"]
    saved_at = list(range(every, total + 1, every))
    last = max(s for s in saved_at if s <= kill_after)
    with ckptvcs.Repo.open(repo_path) as repo:
        assert repo.show().step == last
        kept = [c.step for c in repo.log() if not repo.is_pruned(c.id)]
        assert kept == [last, last - every]  # keep_last=2: the coordinator pruned the older ones
    resumed = run_job(tmp_path, "resumed", "train", str(repo_path), str(total), "0", str(every))
    for rank in range(2):
        r = resumed[rank]
        assert r.get("resumed_at") == last, r["log"]
        reference = r["reference"]  # uninterrupted steps 1..total in the same processes
        assert killed[rank]["losses"] == {k: reference[k] for k in killed[rank]["losses"]}
        # bit-exact: == on the floats, every rank (its own data and dropout from its restored RNG)
        assert r["losses"] == {str(s): reference[str(s)] for s in range(last + 1, total + 1)}
    with ckptvcs.Repo.open(repo_path) as repo:
        log = repo.log()
        assert [c.step for c in log] == saved_at[::-1]
        # the newest two are kept; so is the commit this run resumed from (protected, like CheckpointManager's)
        expected = sorted({saved_at[-1], saved_at[-2], last}, reverse=True)
        assert [c.step for c in log if not repo.is_pruned(c.id)] == expected
        assert log[0].metrics["loss"] == resumed[0]["losses"][str(saved_at[-1])]
        report = repo.fsck(read_data=True)
        assert report.ok, report.errors
        assert {k for k in load_consolidated(repo) if "rng" in k} == {"ckptvcs.rng.0", "ckptvcs.rng.1"}


def test_manager_refuses_an_open_repo(tmp_path: Path) -> None:
    with ckptvcs.Repo.init(tmp_path / "r") as repo:
        with pytest.raises(ckptvcs.InvalidInputError, match="path or URL"):
            DistributedCheckpointManager(repo, torch.nn.Linear(2, 2))


# -- object storage: ranks on separate "hosts" ------------------------------------------------


@pytest.fixture
def s3_repo(s3_server: Any) -> tuple[str, dict[str, Any], dict[str, str]]:
    """An empty repository in a fresh bucket: its URL, storage options and the AWS_* env for ranks."""
    from ckptvcs.backends.fsspec_backend import FsspecBackend
    from s3server import make_bucket

    bucket = f"ckptvcs-{uuid.uuid4().hex[:16]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/team/run"
    options = s3_server.storage_options()
    ckptvcs.Repo.init(None, backend=FsspecBackend(url, **options)).close()
    return url, options, s3_server.env()


def test_ranks_on_separate_hosts_save_to_object_storage(tmp_path: Path, s3_repo: Any) -> None:
    url, options, env = s3_repo
    results = run_job(tmp_path, "s3", "s3", url, env=env, hosts=True)
    for rank, r in enumerate(results):
        assert r["returncode"] == 0, r["log"]
        assert r["cwd"] == str(tmp_path / f"s3-host{rank}")  # nothing shared but the bucket
        assert r["restored_step"] == 2
        assert r["restored"] == r["saved"]  # world size 2: every rank's own shards, bit-exact
        assert r["restored_next"] == r["next"]
    assert results[0]["commit2"] == results[1]["commit2"]
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    with ckptvcs.Repo.open(backend=FsspecBackend(url, **options)) as repo:
        assert [c.step for c in repo.log()] == [2, 1] and repo.head()[1] == results[0]["commit2"]
        assert repo.fsck(read_data=True).ok
    # world size 1, one process on a third "host": the full tensors, bit-exact
    full = load_consolidated(url, storage_options=options)
    flat = {f"model.{k}": v for k, v in full["model"].items()}
    flat.update({f"optim.state.{p}.{k}": v for p, s in full["optim"]["state"].items() for k, v in s.items()})
    expected = results[0]["full"]
    for key, hexdata in expected.items():
        if key.startswith("optim.param_groups"):
            continue
        assert flat[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex() == hexdata, key


def test_rank_killed_before_the_commit_leaves_none_on_object_storage(tmp_path: Path, s3_repo: Any) -> None:
    url, options, env = s3_repo
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    with ckptvcs.Repo.open(backend=FsspecBackend(url, **options)) as repo:
        first = repo.commit({"w": torch.ones(3)}, message="before")
    results = run_job(tmp_path, "die", "die", url, env=env, hosts=True)
    assert results[1]["returncode"] == 17, results[1]["log"]
    assert "saved" not in results[0]
    with ckptvcs.Repo.open(backend=FsspecBackend(url, **options)) as repo:
        assert repo.head()[1] == first and len(repo.log()) == 1
        report = repo.fsck()
        assert report.ok, report.errors
        assert report.garbage  # rank 1's staged shards: garbage until gc's staged grace
        repo.gc(staged_expire="now")
        assert repo.fsck(read_data=True).ok


def test_writer_takes_a_url_with_storage_options(tmp_path: Path) -> None:
    with pytest.raises(ckptvcs.InvalidInputError, match="storage_options"):
        RepoWriter(tmp_path / "r", storage_options={"key": "x"})
    writer = RepoWriter("memory://ckptvcs-url-test/repo")
    assert writer._handle._url == "memory://ckptvcs-url-test/repo"

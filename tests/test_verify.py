"""Recovery readiness: `verify` restores a commit in a fresh process, re-hashes it, runs a check, records it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptvcs import CommitPrunedError, Repo, VerifyFailedError
from helpers import flip_payload_byte

CHECK_MODULE = """
import numpy as np

def holdout(state):
    w = state["w"]
    return {"mean": float(np.asarray(w).mean()), "n": len(w), "step": state["step"]}

def failing(state):
    raise AssertionError("accuracy 0.12 below the release bar 0.9")

def not_metrics(state):
    return ["not", "a", "dict"]
"""


@pytest.fixture
def check_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of user checks (on this process's path, so on the child's too)."""
    folder = tmp_path / "checks"
    folder.mkdir()
    (folder / "release_checks.py").write_text(textwrap.dedent(CHECK_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    return "release_checks"


def _commit(repo: Repo, seed: int = 0) -> str:
    w = np.random.default_rng(seed).standard_normal(3000).astype(np.float32)
    return repo.commit({"w": w, "step": 7 + seed}, f"state {seed}", step=7 + seed)


def test_verify_ok_is_recorded(repo: Repo) -> None:
    commit_id = _commit(repo)
    record = repo.verify()
    assert record["ok"] is True and record["commit"] == commit_id and record["error"] is None
    assert record["bytes"] >= 3000 * 4
    assert record["chunks"] >= 1 and record["restore_seconds"] >= 0 and record["seconds"] >= record["restore_seconds"]
    assert repo.last_verification(commit_id) == record
    stored = json.loads((repo.root / "verified" / commit_id).read_bytes())
    assert stored == record
    assert repo.verifications() == {commit_id: record}
    events = [e for e in repo.audit_events() if e.event == "verify"]
    assert events and events[-1].data["ok"] is True and events[-1].data["commit"] == commit_id


def test_verify_runs_a_user_check_and_records_its_metrics(repo: Repo, check_module: str) -> None:
    _commit(repo)
    record = repo.verify("HEAD", check=f"{check_module}:holdout")
    assert record["ok"] and record["check"] == f"{check_module}:holdout"
    assert record["metrics"]["n"] == 3000.0 and record["metrics"]["step"] == 7.0
    assert isinstance(record["metrics"]["mean"], float) and record["check_seconds"] >= 0


def test_failing_check_fails_and_is_recorded(repo: Repo, check_module: str) -> None:
    commit_id = _commit(repo)
    with pytest.raises(VerifyFailedError, match="release bar") as err:
        repo.verify(check=f"{check_module}:failing")
    assert err.value.exit_code == 17 and err.value.commit_id == commit_id and err.value.chunk_id is None
    assert repo.last_verification()["ok"] is False
    with pytest.raises(VerifyFailedError, match="not a dict of metrics"):
        repo.verify(check=f"{check_module}:not_metrics")
    with pytest.raises(VerifyFailedError, match="cannot import the check"):
        repo.verify(check="no_such_module_here:run")


def test_bit_rot_fails_with_the_chunk_named_and_is_recorded(repo: Repo) -> None:
    good = _commit(repo, 0)
    bad = _commit(repo, 1)
    chunk = repo.manifest(bad).blobs[0]["chunks"][0]
    flip_payload_byte(repo, repo.chunks.index.get(bytes.fromhex(chunk)))
    with pytest.raises(VerifyFailedError) as err:
        repo.verify(bad)
    assert err.value.chunk_id == chunk and chunk in str(err.value)
    record = repo.last_verification(bad)
    assert record["ok"] is False and record["chunk_id"] == chunk and record["error_type"] == "IntegrityError"
    assert repo.verify(good)["ok"]  # the other commit's data is intact
    assert {c: r["ok"] for c, r in repo.verifications().items()} == {good: True, bad: False}


def test_verify_restores_torch_state_in_a_fresh_process(repo: Repo) -> None:
    model = torch.nn.Linear(8, 4)
    repo.commit({"model": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}, "m")
    record = repo.verify()
    assert record["ok"] and record["bytes"] >= (8 * 4 + 4) * 4


def test_verify_of_a_pruned_commit_is_refused(repo: Repo) -> None:
    old = _commit(repo, 0)
    _commit(repo, 1)
    repo.prune(old, "keep_last=1")
    with pytest.raises(CommitPrunedError):
        repo.verify(old)


def test_damaged_record_reads_as_corrupt(repo: Repo) -> None:
    commit_id = _commit(repo)
    repo.verify()
    (repo.root / "verified" / commit_id).write_bytes(b"{not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert repo.verifications() == {}


def test_cli_verify(repo: Repo, check_module: str, tmp_path: Path) -> None:
    commit_id = _commit(repo)
    cli = [str(Path(sys.executable).parent / "ckptvcs"), "--repo", str(repo.root)]  # the installed script
    env_path = str(tmp_path / "checks")  # the user's project folder, holding the check module
    ok = subprocess.run([*cli, "verify", "HEAD", "--check", f"{check_module}:holdout", "--json"], capture_output=True,
                        text=True, cwd=env_path, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["metrics"]["n"] == 3000.0
    shown = subprocess.run([*cli, "show", commit_id[:12]], capture_output=True, text=True, check=False)
    assert "Verified:" in shown.stdout and "ok" in shown.stdout
    failed = subprocess.run([*cli, "verify", "--check", f"{check_module}:failing"], capture_output=True, text=True,
                            cwd=env_path, check=False)
    assert failed.returncode == 17
    assert failed.stderr.strip().startswith("error:") and len(failed.stderr.strip().splitlines()) == 1
    assert "Traceback" not in failed.stderr

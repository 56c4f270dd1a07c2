"""CheckpointManager(verify_every=N): background verification of every N-th save."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptvcs import CheckpointManager, InvalidInputError, Repo

CHECKS = """
import os
import time
from pathlib import Path

def weights(state):
    return {"w_sum": float(state["model"]["weight"].sum())}

def failing(state):
    raise AssertionError("holdout accuracy 0.1 below the bar")

def gated(state):
    # Says it started, then waits for the test to open the gate (a readiness signal, not a race).
    Path(os.environ["CKPTVCS_TEST_GATE"] + ".started").touch()
    deadline = time.monotonic() + 300
    while not Path(os.environ["CKPTVCS_TEST_GATE"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.02)
    return {"step": float(state["ckptvcs.manager"]["step"])}
"""


@pytest.fixture
def checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "checkmods"
    folder.mkdir()
    (folder / "mgr_checks.py").write_text(textwrap.dedent(CHECKS))
    monkeypatch.syspath_prepend(str(folder))
    return "mgr_checks"


def _manager(repo: Repo, **kwargs: object) -> tuple[CheckpointManager, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return CheckpointManager(repo, {"model": model}, code_version=None, **kwargs), model  # type: ignore[arg-type]


def _bump(model: nn.Linear) -> None:
    with torch.no_grad():
        model.weight += 1.0


def _wait_for(path: Path, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_verify_every_two_saves_records_those_commits(repo: Repo, checks: str) -> None:
    mgr, model = _manager(repo, every_steps=1, verify_every=2, verify_check=f"{checks}:weights")
    saved = []
    for step in range(1, 5):
        _bump(model)
        saved.append(mgr.step(step))
    mgr.close()
    expected = {saved[1], saved[3]}
    assert set(mgr.verifications) == expected
    records = repo.verifications()
    assert set(records) == expected
    for commit_id in expected:
        record = records[commit_id]
        assert record["ok"] is True and record["check"] == f"{checks}:weights"
        weight = repo.load(commit_id, keys=["model"])["model"]["weight"]
        assert record["metrics"]["w_sum"] == pytest.approx(float(weight.sum()), rel=1e-6)
    audited = [e.data["commit"] for e in repo.audit_events() if e.event == "verify"]
    assert sorted(audited) == sorted(expected)


def test_failing_check_is_recorded_and_training_goes_on(repo: Repo, checks: str) -> None:
    mgr, model = _manager(repo, every_steps=1, verify_every=1, verify_check=f"{checks}:failing")
    first = mgr.step(1)
    with pytest.warns(RuntimeWarning, match="holdout accuracy 0.1 below the bar"):
        mgr.wait()
    _bump(model)
    second = mgr.step(2)  # the loop goes on after a failed verification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mgr.close()
    assert second is not None and second != first
    record = repo.last_verification(first)
    assert record is not None and record["ok"] is False and "below the bar" in record["error"]
    assert mgr.verifications[first]["ok"] is False
    events = [e for e in repo.audit_events() if e.event == "verify"]
    assert events[0].data["commit"] == first and events[0].data["ok"] is False


def test_retention_does_not_release_a_commit_being_verified(repo: Repo, checks: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "gate"
    monkeypatch.setenv("CKPTVCS_TEST_GATE", str(gate))
    mgr, model = _manager(repo, every_steps=1, keep_last=1, gc_every=1, verify_every=1,
                          verify_check=f"{checks}:gated")
    first = mgr.step(1)
    _wait_for(Path(str(gate) + ".started"))  # its verification is now reading the commit
    later = []
    for step in (2, 3, 4):
        _bump(model)
        later.append(mgr.step(step))
    # keep_last=1 and gc after every save: without the hold, `first` would be pruned and collected by now.
    assert not repo.is_pruned(first)
    assert repo.is_pruned(later[0])  # replaced in the queue by step 3 before its turn, so not held
    gate.touch()
    mgr.wait()
    assert repo.last_verification(first)["ok"] is True
    assert repo.last_verification(first)["metrics"] == {"step": 1.0}
    assert later[0] in mgr._verifier.skipped  # type: ignore[union-attr]
    assert repo.last_verification(later[2])["ok"] is True
    _bump(model)
    mgr.step(5)  # verified: an ordinary commit again, which retention now prunes
    mgr.close()
    assert repo.is_pruned(first)
    assert repo.fsck().ok


def test_verify_every_is_validated(repo: Repo) -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidInputError, match="verify_every"):
            _manager(repo, verify_every=bad)
    with pytest.raises(Exception, match="module:function"):
        _manager(repo, verify_every=1, verify_check="not a check")
    with pytest.raises(InvalidInputError, match="need verify_every"):
        _manager(repo, verify_check="checks:run")

"""The code version is captured with git once per working-tree state, not on every commit
(issue 10, point 7): a loop of commits runs git once, and a commit, a checkout, staging or
an edit of a tracked file is still seen on the next call."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ckptvcs import provenance

GIT = ["git", "-c", "user.name=T", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def age(path: Path, seconds: float = 3600) -> None:
    """Date a file back, so the "modified just now" rule (racy timestamps) does not apply."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in provenance._GIT_LOCATION_VARS:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    git(root, "init", "-q")
    for name in ("train.py", "pkg/model.py"):
        (root / name).write_text(f"# {name}\n")
        age(root / name)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "one")
    return root


@pytest.fixture
def git_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = subprocess.run

    def counting(args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        if args and args[0] == "git":
            calls.append(list(args))
        return real(args, *rest, **kwargs)

    monkeypatch.setattr(provenance.subprocess, "run", counting)
    return calls


def test_repeated_calls_run_git_once(checkout: Path, git_runs: list[list[str]]) -> None:
    first = provenance.code_version(str(checkout / "pkg"))
    assert first == {"git_commit": git(checkout, "rev-parse", "HEAD"), "dirty": False, "path": str(checkout)}
    runs = len(git_runs)
    for _ in range(5):
        assert provenance.code_version(str(checkout / "pkg")) == first
    assert len(git_runs) == runs


def test_an_edit_of_a_tracked_file_is_seen(checkout: Path, git_runs: list[list[str]]) -> None:
    assert provenance.code_version(str(checkout))["dirty"] is False
    (checkout / "pkg" / "model.py").write_text("# edited\n")
    age(checkout / "pkg" / "model.py", 1800)  # not "just now": only the stat change can tell
    assert provenance.code_version(str(checkout))["dirty"] is True
    (checkout / "pkg" / "model.py").write_text("# pkg/model.py\n")  # edited back: clean again
    age(checkout / "pkg" / "model.py", 900)
    assert provenance.code_version(str(checkout))["dirty"] is False


def test_a_commit_and_a_checkout_are_seen(checkout: Path) -> None:
    before = provenance.code_version(str(checkout))["git_commit"]
    (checkout / "train.py").write_text("# two\n")
    git(checkout, "commit", "-q", "-am", "two")
    after = provenance.code_version(str(checkout))
    assert after["git_commit"] == git(checkout, "rev-parse", "HEAD") != before and after["dirty"] is False
    git(checkout, "checkout", "-q", before)
    assert provenance.code_version(str(checkout))["git_commit"] == before


def test_a_file_modified_just_now_makes_git_run_again(checkout: Path, git_runs: list[list[str]]) -> None:
    (checkout / "train.py").write_text("# changed in the same clock tick\n")  # mtime: now
    provenance.code_version(str(checkout))
    runs = len(git_runs)
    provenance.code_version(str(checkout))
    assert len(git_runs) > runs  # not trusted: a same-tick edit could hide behind the timestamp


def test_outside_a_checkout_is_none_and_cached(tmp_path: Path, git_runs: list[list[str]]) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    if any((folder / ".git").exists() for folder in (plain, *plain.parents)):
        pytest.skip("the temporary directory lies inside a git checkout")
    assert provenance.code_version(str(plain)) is None
    runs = len(git_runs)
    assert provenance.code_version(str(plain)) is None
    assert len(git_runs) == runs
    git(plain, "init", "-q")
    (plain / "f").write_text("x")
    git(plain, "add", "f")
    git(plain, "commit", "-q", "-m", "first")
    assert provenance.code_version(str(plain))["git_commit"] == git(plain, "rev-parse", "HEAD")


def test_a_large_checkout_runs_only_git_status_while_head_is_unchanged(
    checkout: Path, git_runs: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provenance, "_STAT_LIMIT", 1)  # "too many files to stat"
    assert provenance.code_version(str(checkout))["dirty"] is False
    runs = len(git_runs)
    (checkout / "train.py").write_text("# edited\n")
    assert provenance.code_version(str(checkout))["dirty"] is True
    assert [args[1] for args in git_runs[runs:]] == ["status"]

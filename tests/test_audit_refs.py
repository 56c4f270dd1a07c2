"""The ref log (audit/refs.jsonl): every ref move chained, printed by `ckptvcs audit`, checked by fsck."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest

import ckptvcs._fs
from ckptvcs import Repo, StorageError
from ckptvcs.refs import ZERO_ID


def _history(repo: Repo) -> tuple[str, str]:
    first = repo.commit({"w": np.arange(10)}, "first")
    second = repo.commit({"w": np.arange(11)}, "second")
    repo.branch("side", first)
    repo.tag("v1", second)
    repo.delete_branch("side")
    return first, second


def _log(repo: Repo) -> list[bytes]:
    return (repo.root / "audit" / "refs.jsonl").read_bytes().splitlines(keepends=True)


def test_every_ref_move_is_logged_with_who_when_old_new_why(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTVCS_AUTHOR", "trainer@cluster")
    first, second = _history(repo)
    moves = [(e.data["ref"], e.data["old"], e.data["new"]) for e in repo.ref_events()]
    assert moves == [
        ("refs/heads/main", ZERO_ID, first),
        ("refs/heads/main", first, second),
        ("refs/heads/side", ZERO_ID, first),
        ("refs/tags/v1", ZERO_ID, repo.tags()["v1"].id),
        ("refs/heads/side", first, ZERO_ID),
    ]  # HEAD follows main: its mirror moves are not logged twice
    events = repo.ref_events()
    assert all(e.who == "trainer@cluster" and e.time.endswith("Z") and e.event == "ref.update" for e in events)
    assert events[1].data["why"] == "commit: second"
    check = repo.check_audit()
    assert check.ok and check.ref_events == 5 and check.ref_head == events[-1].hash
    assert repo.fsck().ok


def test_detached_head_moves_are_logged(repo: Repo) -> None:
    first, _ = _history(repo)
    repo.checkout(first)
    detached = repo.commit({"w": np.arange(3)}, "detached")
    last = repo.ref_events()[-1]
    assert (last.data["ref"], last.data["new"]) == ("HEAD", detached)
    assert repo.check_audit().ok


def test_cli_audit_prints_ref_moves(repo: Repo) -> None:
    first, second = _history(repo)
    cli = [sys.executable, "-m", "ckptvcs", "--repo", str(repo.root)]
    out = subprocess.run([*cli, "audit"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "refs/heads/main" in x and f"new={second[:12]}" in x)
    assert "ref.update" in line and f"old={first[:12]}" in line and "why=commit: second" in line
    assert "tag.create" in out  # merged with the event log, by time
    data = json.loads(subprocess.run([*cli, "audit", "--json"], capture_output=True, text=True, check=True).stdout)
    assert len(data["ref_events"]) == 5 and data["check"]["ref_events"] == 5
    ok = subprocess.run([*cli, "audit", "--check"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "5 ref moves" in ok.stdout


def test_an_edited_ref_move_is_detected(repo: Repo) -> None:
    _, second = _history(repo)
    lines = _log(repo)
    record = json.loads(lines[1])
    record["data"]["new"] = "f" * 64  # claim main moved elsewhere
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    (repo.root / "audit" / "refs.jsonl").write_bytes(b"".join(lines))
    check = repo.check_audit()
    assert not check.ok and "refs.jsonl" in check.problems[0] and "line 3" in check.problems[0]
    report = repo.fsck()
    assert not report.ok and any("refs.jsonl" in f.message for f in report.errors)
    cli = [sys.executable, "-m", "ckptvcs", "--repo", str(repo.root), "audit", "--check"]
    bad = subprocess.run(cli, capture_output=True, text=True, check=False)
    assert bad.returncode == 10 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_a_ref_changed_outside_ckptvcs_is_detected(repo: Repo) -> None:
    first, _ = _history(repo)
    (repo.root / "refs" / "heads" / "main").write_text(first + "\n")  # rewound by hand: no reflog, no log line
    check = repo.check_audit()
    assert not check.ok and "refs/heads/main" in check.problems[0] and "outside ckptvcs" in check.problems[0]
    assert not repo.fsck().ok


def test_moves_missing_from_the_log_are_notes_and_a_rewind_is_damage(repo: Repo) -> None:
    first, second = _history(repo)
    third = repo.commit({"w": np.arange(12)}, "third")
    path = repo.root / "audit" / "refs.jsonl"
    lines = _log(repo)
    path.write_bytes(b"".join(lines[:-1]))  # what a crash between the ref update and its log line leaves
    check = repo.check_audit()
    assert check.ok and any("last 1 move (to " + third[:12] in n for n in check.notes)
    assert repo.fsck().ok
    path.write_bytes(b"".join(lines[:1]))  # main's later moves gone: its reflog still leads there
    check = repo.check_audit()
    assert check.ok and any("refs/heads/main: its last 2 moves" in n for n in check.notes)
    path.write_bytes(b"".join(lines))
    (repo.root / "refs" / "heads" / "main").write_text(second + "\n")  # rewound by hand
    check = repo.check_audit()
    assert not check.ok and "refs/heads/main holds " + second[:12] in check.problems[0]


def test_a_failed_ref_log_write_fails_like_a_reflog_write_and_leaves_a_consistent_store(
        repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    first = repo.commit({"w": np.arange(10)}, "first")

    real = ckptvcs._fs.append_durably

    def disk_full_for_the_ref_log(path: object, data: bytes) -> None:
        if str(path).endswith("refs.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)  # type: ignore[arg-type]

    monkeypatch.setattr(ckptvcs._fs, "append_durably", disk_full_for_the_ref_log)
    with pytest.raises(StorageError, match="disk full while appending to the audit log"):
        repo.commit({"w": np.arange(11)}, "second")
    monkeypatch.undo()
    second = repo.resolve("main")
    assert second != first  # the ref update was the commit point: the commit stands
    check = repo.check_audit()
    assert check.ok and any("failed write between a ref update" in n for n in check.notes)


def test_a_damaged_ref_log_does_not_stop_commits(repo: Repo) -> None:
    repo.commit({"w": np.arange(10)}, "first")
    path = repo.root / "audit" / "refs.jsonl"
    path.unlink()
    path.mkdir()  # not a regular file: the log cannot be continued
    with pytest.warns(RuntimeWarning, match="could not be written"):
        repo.commit({"w": np.arange(11)}, "second")
    assert repo.resolve("main") == repo.log()[0].id
    assert not repo.check_audit().ok

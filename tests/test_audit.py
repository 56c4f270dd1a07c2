"""The audit log: appended durably, chained by hash, and tampering detected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckptvcs import Repo
from ckptvcs.audit import ZERO_HASH, AuditLog


def _events(repo: Repo, n: int = 4) -> None:
    repo.commit({"w": np.arange(10)}, "c")
    for i in range(n):
        repo.tag(f"t{i}")


def _lines(repo: Repo) -> list[bytes]:
    return (repo.root / "audit" / "log.jsonl").read_bytes().splitlines(keepends=True)


def _write(repo: Repo, lines: list[bytes]) -> None:
    (repo.root / "audit" / "log.jsonl").write_bytes(b"".join(lines))


def test_events_are_chained_and_name_who_and_when(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTVCS_AUTHOR", "auditor@example")
    _events(repo, 3)
    events = repo.audit_events()
    assert [e.event for e in events] == ["tag.create"] * 3 and [e.seq for e in events] == [0, 1, 2]
    assert events[0].prev == ZERO_HASH and all(b.prev == a.hash for a, b in zip(events, events[1:]))
    assert all(e.who == "auditor@example" and e.time.endswith("Z") for e in events)
    assert events[1].data["ref"] == "refs/tags/t1" and events[1].data["old"] is None
    check = repo.check_audit()
    assert check.ok and check.events == 3 and check.head == events[-1].hash


def test_edited_line_is_detected(repo: Repo) -> None:
    _events(repo)
    lines = _lines(repo)
    record = json.loads(lines[1])
    record["data"]["ref"] = "refs/tags/other"
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    _write(repo, lines)
    check = repo.check_audit()
    assert not check.ok and "line 3" in check.problems[0]


def test_removed_line_is_detected(repo: Repo) -> None:
    _events(repo)
    lines = _lines(repo)
    _write(repo, lines[:1] + lines[2:])
    assert "line 2" in repo.check_audit().problems[0]


def test_truncated_tail_is_detected(repo: Repo) -> None:
    _events(repo)
    _write(repo, _lines(repo)[:2])
    check = repo.check_audit()
    assert not check.ok and "truncated" in check.problems[0]


def test_truncated_head_is_detected(repo: Repo) -> None:
    _events(repo)
    _write(repo, _lines(repo)[1:])
    assert not repo.check_audit().ok


def test_torn_last_line_is_a_crash_not_damage(repo: Repo) -> None:
    _events(repo, 2)
    with open(repo.root / "audit" / "log.jsonl", "ab") as f:
        f.write(b'{"data":{"ref":"refs/ta')  # a crash in the middle of an append
    assert repo.check_audit().ok
    repo.tag("after-crash")
    check = repo.check_audit()
    assert check.ok and check.events == 3 and any("torn" in note for note in check.notes)
    assert [e.event for e in repo.audit_events()] == ["tag.create"] * 3


def test_fsck_reports_a_broken_chain(repo: Repo) -> None:
    _events(repo)
    assert repo.fsck().ok
    lines = _lines(repo)
    _write(repo, lines[:1] + lines[2:])
    report = repo.fsck()
    assert not report.ok and any("audit" in f.message for f in report.errors)


def test_concurrent_appends_keep_the_chain(repo: Repo, tmp_path: Path) -> None:
    script = ("import sys; from ckptvcs.audit import AuditLog; from pathlib import Path\n"
              "log = AuditLog(Path(sys.argv[1]))\n"
              "for i in range(25): log.append('test.event', 'w@h', {'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(repo.root)]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    check = AuditLog(repo.root).check()
    assert check.ok and check.events == 75


def test_cli_audit(repo: Repo) -> None:
    _events(repo, 2)
    cli = [sys.executable, "-m", "ckptvcs", "--repo", str(repo.root)]
    out = subprocess.run([*cli, "audit"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "tag.create" in out.stdout and "refs/tags/t1" in out.stdout
    as_json = json.loads(subprocess.run([*cli, "audit", "--json"], capture_output=True, text=True, check=True).stdout)
    assert [e["seq"] for e in as_json["events"]] == [0, 1] and as_json["check"]["ok"] is True
    ok = subprocess.run([*cli, "audit", "--check"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "intact" in ok.stdout
    _write(repo, _lines(repo)[1:])
    bad = subprocess.run([*cli, "audit", "--check"], capture_output=True, text=True, check=False)
    assert bad.returncode == 10 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_repeated_crashes_mid_append_keep_the_chain(repo: Repo) -> None:
    _events(repo, 1)
    log = repo.root / "audit" / "log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"data":{"ref":"refs/ta')
    AuditLog(repo.root).append("test.event", "w@h", {"i": 1})
    with open(log, "r+b") as f:  # the recovery append itself torn: cut its line short
        f.truncate(len(log.read_bytes()) - 20)
    repo.tag("after-two-crashes")
    check = repo.check_audit()
    assert check.ok, check.problems
    assert [e.event for e in repo.audit_events()] == ["tag.create", "tag.create"]
    assert repo.audit_events()[-1].seq == 1


def test_hostile_lines_are_damage_not_crashes(repo: Repo) -> None:
    _events(repo, 2)
    lines = _lines(repo)
    _write(repo, [lines[0], b"[" * 10_000 + b"\n", lines[1]])
    check = repo.check_audit()
    assert not check.ok and "line 2" in check.problems[0]
    (repo.root / "audit" / "head.json").write_bytes(b"[" * 3000)
    assert not repo.check_audit().ok


def test_fsck_names_a_leftover_head_temp_file_as_garbage(repo: Repo) -> None:
    _events(repo, 1)
    (repo.root / "audit" / ".head.json.1234.tmp").write_bytes(b'{"seq"')
    report = repo.fsck()
    assert report.ok and any(".head.json.1234.tmp" in f.message for f in report.garbage)

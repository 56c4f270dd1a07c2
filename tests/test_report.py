"""The report: records it needs (gc runs, restores, commit timings and sizes), its JSON summary,
its HTML page, and what it does with old, damaged and hostile repositories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import report_repo
from ckptvcs import Repo
from ckptvcs.records import MAX_READ_BYTES, append, read
from ckptvcs.report import build_summary, metric_mode, render_html

FIXTURE = Path(__file__).resolve().parent / "data" / "v1-repo"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "repo"
    report_repo.build(path).close()
    return path


@pytest.fixture(scope="module")
def summary(built: Path) -> dict[str, Any]:
    with Repo.open(built) as repo:
        return build_summary(repo)


def _by_step(summary: dict[str, Any], branch: str) -> dict[int, dict[str, Any]]:
    rows = {c["id"]: c for c in summary["commits"]}
    return {rows[oid]["step"]: rows[oid] for oid in summary["branches"][branch]["chain"]}


def test_summary_is_strict_json(summary: dict[str, Any]) -> None:
    json.dumps(summary, allow_nan=False)  # NaN or a bytes key would fail here
    assert summary["format"] == "ckptvcs-report" and summary["version"] == 1


def test_branches_side_by_side_with_shared_history(summary: dict[str, Any]) -> None:
    assert set(summary["branches"]) == {"main", "lr-sweep"}
    main, sweep = _by_step(summary, "main"), _by_step(summary, "lr-sweep")
    assert sorted(main) == list(range(1, 9))
    assert sorted(sweep) == list(range(1, 12))  # forked at the tag (step 6): shares steps 1-6
    assert main[6]["id"] == sweep[6]["id"] and main[7]["id"] != sweep[7]["id"]
    assert sweep[9]["metrics"]["val_loss"] == pytest.approx(0.1)


def test_tag_best_and_pruned_commits(summary: dict[str, Any]) -> None:
    main, sweep = _by_step(summary, "main"), _by_step(summary, "lr-sweep")
    assert [t["name"] for t in summary["tags"]] == ["v1.0"]
    assert main[6]["tags"] == ["v1.0"] and summary["tags"][0]["commit"] == main[6]["id"]
    assert summary["best"]["val_loss"]["mode"] == "min" and summary["best"]["accuracy"]["mode"] == "max"
    assert summary["best"]["val_loss"]["commit"] == sweep[11]["id"]  # 0.9/11: the lowest kept value
    # Pruned commits are still plotted from their records, with the rule that pruned them.
    assert main[1]["pruned"]["rule"] == "keep_last=3,keep_best=1" and main[1]["pruned"]["collected"]
    assert main[1]["metrics"]["val_loss"] == pytest.approx(1.0 + 0.05 * 0.8414709848)
    assert sweep[9]["pruned"]["rule"] == "manual"
    retention = summary["retention"]
    assert retention["pruned_by_rule"] == {"keep_last=3,keep_best=1": 4, "manual": 1}
    why = {k["commit"]: k["why"] for k in retention["kept"]}
    assert "tagged v1.0" in why[main[6]["id"]]
    assert "tip of branch main" in why[main[8]["id"]]
    assert {"tip of branch lr-sweep", "best val_loss"} <= set(why[sweep[11]["id"]])


def test_commit_timings_and_sizes_recorded(summary: dict[str, Any]) -> None:
    for c in summary["commits"]:
        assert c["save_seconds"] is not None and c["save_seconds"] >= 0
        assert c["logical_bytes"] > 0
        parts = c["components"]
        assert set(parts) == {"weights", "optimizer", "other"}
        assert sum(p["logical_bytes"] for p in parts.values()) == c["logical_bytes"]
        assert sum(p["new_stored_bytes"] for p in parts.values()) == c["new_stored_bytes"]
    first = summary["commits"][0]
    # AdamW keeps two buffers per parameter: the optimizer holds about twice the weights.
    assert first["components"]["optimizer"]["logical_bytes"] > 1.5 * first["components"]["weights"]["logical_bytes"]


def test_restore_gc_and_fsck_records(summary: dict[str, Any]) -> None:
    tag_commit = summary["tags"][0]["commit"]
    restores = summary["restores"]["records"]
    assert [r["commit"] for r in restores] == [tag_commit]
    assert restores[0]["step"] == 6 and restores[0]["branch"] == "lr-sweep" and restores[0]["restore_seconds"] >= 0
    assert next(c for c in summary["commits"] if c["id"] == tag_commit)["restore_seconds"] is not None
    gcs = summary["gc"]["records"]
    assert summary["gc"]["recorded"] and gcs
    assert any(g["restricted"] for g in gcs)  # the manager's automatic gcs
    full = [g for g in gcs if not g["restricted"]]
    assert len(full) == 1 and full[0]["chunks_freed"] > 0 and full[0]["pack_bytes_after"] <= full[0]["pack_bytes_before"]
    assert summary["storage"]["disk_after_gc"][-1]["pack_bytes"] == full[0]["pack_bytes_after"]
    assert summary["fsck"]["ok"] is True


def test_storage_split_ratios_and_branch_cost(summary: dict[str, Any]) -> None:
    storage = summary["storage"]
    assert storage["dedup_ratio"] > 1 and storage["compression_ratio"] > 1
    comps = storage["components"]
    assert comps["optimizer"]["logical_bytes"] > comps["weights"]["logical_bytes"] > 0
    assert sum(c["stored_bytes"] for c in comps.values()) <= storage["stored_bytes"]
    assert storage["branch_own_bytes"]["lr-sweep"] > 0  # its steps 7-11 share no chunk with main's
    assert storage["timeline"][-1]["cumulative_new_stored_bytes"] >= storage["stored_bytes"]


def test_attention_in_plain_words(summary: dict[str, Any]) -> None:
    texts = [a["text"] for a in summary["attention"]]
    assert any("no restore was ever verified" in t for t in texts)
    assert all(a["level"] in ("error", "warning", "info") for a in summary["attention"])


def test_html_is_self_contained_and_has_every_section(summary: dict[str, Any]) -> None:
    page = render_html(summary)
    for section in ("attention", "overview", "metrics", "storage", "latency", "retention", "health"):
        assert f'<section id="{section}"' in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "never verified" in page
    assert page.count("<svg") >= 7 and "<title>" in page


def test_metric_mode_guess() -> None:
    assert [metric_mode(m) for m in ("val_loss", "accuracy", "eval/f1", "top1_acc", "perplexity", "reward")] == \
        ["min", "max", "max", "max", "min", "max"]


def test_untrusted_text_is_escaped(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.ones(4)}, "<script>alert(1)</script>", step=1,
                    metrics={"<img src=x onerror=alert(1)>": 1.0}, code_version=None)
        repo.tag("v1", message="</title><script>x</script>")
        page = render_html(build_summary(repo))
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_old_repository_without_records(tmp_path: Path) -> None:
    """A repository an older ckptvcs wrote: no records, no timings, no last fsck: all 'not recorded'."""
    copy = tmp_path / "v1"
    shutil.copytree(FIXTURE, copy)
    (copy / "tmp").mkdir(exist_ok=True)
    with Repo.open(copy) as repo:
        summary = build_summary(repo)
    assert summary["commits"] and all(c["save_seconds"] is None for c in summary["commits"])
    assert summary["gc"] == {"recorded": False, "records": [], "damaged_lines": 0, "truncated": False}
    assert summary["fsck"] is None and summary["restores"]["records"] == []
    texts = " ".join(a["text"] for a in summary["attention"])
    assert "fsck has never run" in texts and "gc history not recorded" in texts
    # Component sizes come from the manifests when the commit did not record them.
    assert any(c["components"] for c in summary["commits"] if not c["pruned"])
    page = render_html(summary)
    assert "not recorded" in page and "never run" in page and "never verified" in page


def test_gc_appends_one_record_per_run_and_dry_run_none(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.ones(4096)}, "a", code_version=None)
        repo.gc(dry_run=True)
        assert repo.read_records("gc").records == []
        repo.gc()
        repo.gc()
        log = repo.read_records("gc")
    assert len(log.records) == 2 and not log.damaged_lines
    assert {"time", "seconds", "pack_bytes_before", "pack_bytes_after", "bytes_reclaimed", "chunks_freed",
            "packs_deleted"} <= set(log.records[0])


def test_damaged_and_hostile_records_are_one_clear_line(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.ones(4)}, "a", code_version=None)
        repo.gc()
        gc_log = repo.root / "records" / "gc.jsonl"
        with open(gc_log, "ab") as f:
            f.write(b"not json\n" + b"[" * 100_000 + b"\n" + b'["a list"]\n' + b'{"deep":' * 40 + b"1" + b"}" * 40
                    + b"\n" + b'{"time": "2026-01-01T00:00:00Z", "pack_bytes_after": "x"}\n' + b'{"torn')
        (repo.root / "records" / "restore.jsonl").symlink_to("/etc/passwd")
        (repo.root / "verified").mkdir()
        (repo.root / "verified" / ("ab" * 32)).write_bytes(b"\xff\xfe garbage")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing may escape as a warning either
            summary = build_summary(repo)
        page = render_html(summary)
    json.dumps(summary, allow_nan=False)
    assert summary["gc"]["damaged_lines"] == 4 and len(summary["gc"]["records"]) == 2
    texts = [a["text"] for a in summary["attention"]]
    assert any("records/gc.jsonl has 4 damaged line(s)" in t for t in texts)
    assert any("records/restore.jsonl is unreadable" in t and "symbolic link" in t for t in texts)
    assert any(f"verified/{'ab' * 32} is unreadable" in t for t in texts)
    assert "root:" not in page  # the link's target was never read


def test_record_reader_limits(tmp_path: Path) -> None:
    for i in range(3):
        assert append(tmp_path, "gc", {"n": i, "pad": "x" * 100})
    assert [r["n"] for r in read(tmp_path, "gc").records] == [0, 1, 2]
    log = read(tmp_path, "gc", limit=150)  # lines of ~118 bytes: only the tail is read; the cut first line is dropped
    assert log.truncated and [r["n"] for r in log.records] == [2] and log.damaged_lines == 0
    fifo = tmp_path / "records" / "restore.jsonl"
    os.mkfifo(fifo)
    assert "unreadable" in (read(tmp_path, "restore").error or "")  # never blocks on a FIFO
    assert MAX_READ_BYTES >= 1 << 20


def test_read_only_store_goes_without_a_record(tmp_path: Path) -> None:
    root = tmp_path / "r"
    with Repo.init(root, chunk_size=4096) as repo:
        repo.commit({"w": torch.ones(4)}, "a", code_version=None)
        (root / "records").mkdir()
        (root / "records" / "gc.jsonl").mkdir()  # a folder where the file belongs: the append fails
        with pytest.warns(RuntimeWarning, match="could not record this gc"):
            repo.gc()  # the gc itself succeeds


def test_report_imports_no_torch(built: Path) -> None:
    code = ("import sys; from ckptvcs import Repo; from ckptvcs.report import build_summary, render_html; "
            f"r = Repo.open({str(built)!r}); render_html(build_summary(r)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


_AUDIT = ("import atexit, sys\n"
          "atexit.register(lambda: sys.stderr.write(f\"\\nTORCH-IMPORTED={'torch' in sys.modules}\\n\"))\n"
          "from ckptvcs.cli import main\nsys.argv = ['ckptvcs', *sys.argv[1:]]\nmain()\n")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _AUDIT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_report_html_and_json_without_torch(built: Path, tmp_path: Path) -> None:
    done = _cli("--repo", str(built), "report", "-o", "out/r.html", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "TORCH-IMPORTED=False" in done.stderr
    assert done.stdout.startswith("wrote out/r.html (13 commits, 2 branches;")
    assert "no restore was ever verified" in done.stdout
    assert (tmp_path / "out" / "r.html").read_text().startswith("<!DOCTYPE html>")
    shown = _cli("--repo", str(built), "report", "--json", cwd=tmp_path)
    assert shown.returncode == 0 and "TORCH-IMPORTED=False" in shown.stderr
    assert json.loads(shown.stdout)["branches"].keys() == {"main", "lr-sweep"}
    written = _cli("--repo", str(built), "report", "--json", "-o", "s.json", cwd=tmp_path)
    assert written.returncode == 0 and json.loads((tmp_path / "s.json").read_text())["format"] == "ckptvcs-report"


def test_cli_report_errors_are_one_line(tmp_path: Path) -> None:
    done = _cli("--repo", str(tmp_path / "none"), "report", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("error: ") and "not a ckptvcs repository" in done.stderr
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.ones(4)}, "a", code_version=None)
    (tmp_path / "r" / "records").mkdir()
    (tmp_path / "r" / "records" / "gc.jsonl").write_bytes(b"\x00garbage\n")
    damaged = _cli("--repo", str(tmp_path / "r"), "report", "-o", "r.html", cwd=tmp_path)
    assert damaged.returncode == 0 and "Traceback" not in damaged.stderr
    assert "warning: records/gc.jsonl has 1 damaged line(s), left out" in damaged.stdout


def test_verified_restores_shown(tmp_path: Path) -> None:
    """`ckptvcs verify` keeps the last verification of a commit in verified/<commit id>."""
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        good = repo.commit({"w": torch.ones(4)}, "a", step=1, code_version=None)
        bad = repo.commit({"w": torch.zeros(4)}, "b", step=2, code_version=None)
        (repo.root / "verified").mkdir()
        for commit, ok, when in ((good, True, "2026-01-01T00:00:00Z"), (bad, False, "2026-01-02T00:00:00Z")):
            record = {"version": 1, "commit": commit, "time": when, "ok": ok, "restore_seconds": 0.25,
                      "metrics": {"holdout": 0.9}, "error": None if ok else "chunk 12ab... does not match its id"}
            (repo.root / "verified" / commit).write_text(json.dumps(record))
        summary = build_summary(repo)
    rows = {c["id"]: c for c in summary["commits"]}
    assert rows[good]["verified"]["ok"] is True and rows[bad]["verified"]["ok"] is False
    assert [v["commit"] for v in summary["verifications"]["records"]] == [good, bad]  # oldest first
    assert any(a["level"] == "error" and "FAILED" in a["text"] and "does not match" in a["text"]
               for a in summary["attention"])
    page = render_html(summary)
    assert "verified restore of" in page and "never verified" not in page


def test_empty_and_damaged_ref_repositories(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        empty = build_summary(repo)
        assert empty["commits"] == [] and "nothing recorded yet" in render_html(empty)
        repo.commit({"w": torch.ones(4)}, "a", code_version=None)
        repo.branch("x")
        (repo.root / "refs" / "heads" / "x").write_text("zzzz\n")
        damaged = build_summary(repo)
    assert list(damaged["branches"]) == ["main"]
    assert any(a["level"] == "error" and a["text"].startswith("branch x is damaged") for a in damaged["attention"])
    render_html(damaged)

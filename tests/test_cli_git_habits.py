"""The CLI speaks git and starts fast (issue 10, points 8-11), through the installed command.

- history, refs, status, gc, fsck, help and completion never import torch;
- discovery finds a repository made by the library, from inside it and below it, and
  ``init`` keeps the repository out of an enclosing git checkout's ``git status``;
- the verbs people type first: status, log -N / -n N / A..B, checkout -b, diff --stat,
  prune REV, completion of branch and tag names;
- error texts that name the way out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptvcs import CheckpointManager, Repo
from ckptvcs.errors import CommitPrunedError, InvalidInputError, RevisionNotFoundError, UnsupportedValueError
from ckptvcs.exchange import read_state_file
from ckptvcs.state import DTYPE_ITEMSIZE, TORCH_DTYPES
from test_cli import assert_one_line_error, ok, run

# Runs the CLI in-process and reports at exit whether torch was imported.
_AUDIT = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write(f\"\\nTORCH-IMPORTED={'torch' in sys.modules}\\n\"))\n"
    "from ckptvcs.cli import main\n"
    "sys.argv[0] = 'ckptvcs'\n"
    "main()\n"
)


def audited(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run the CLI with ``args``; returns the process and whether torch was imported."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTVCS_", "_CKPTVCS_"))}
    full_env.update({"CKPTVCS_AUTHOR": "Tester <t@example.com>", "NO_COLOR": "1"}, **(env or {}))
    result = subprocess.run([sys.executable, "-c", _AUDIT, *args], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=120)
    marker = [line for line in result.stderr.splitlines() if line.startswith("TORCH-IMPORTED=")]
    assert marker, result.stderr
    return result, marker[-1] == "TORCH-IMPORTED=True"


def weights(seed: int, n: int = 4096) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(8, generator=g)}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.ckptvcs`` store with main (c0..c3, tag v1 at c2) and branch exp at c1."""
    root = tmp_path_factory.mktemp("habits")
    with Repo.init(root / ".ckptvcs", chunk_size=4096) as repo:
        for i in range(4):
            repo.commit(weights(i), message=f"c{i}", step=i * 10, metrics={"loss": 1.0 / (i + 1)})
        repo.tag("v1", "HEAD~1")
        repo.branch("exp", "HEAD~2")
    return root


def commit_ids(project: Path) -> list[str]:
    with Repo.open(project / ".ckptvcs") as repo:
        return [c.id for c in repo.log("main")]  # newest first: c3, c2, c1, c0


# -- 8. start-up without torch -------------------------------------------------------------------

TORCH_FREE = [
    ["--help"], ["--version"], ["log"], ["log", "--oneline", "-2"], ["log", "v1..main"], ["branch"], ["tag"],
    ["status"], ["reflog"], ["fsck"], ["show", "v1"], ["stats"], ["gc", "--dry-run"], ["diff", "--stat", "exp"],
    ["verify", "v1"], ["audit"], ["protect"],  # verify restores in a child process: the command stays torch-free
]


@pytest.mark.parametrize("args", TORCH_FREE, ids=" ".join)
def test_commands_that_touch_no_tensor_value_do_not_import_torch(project: Path, args: list[str]) -> None:
    result, imported = audited(*args, cwd=project)
    assert result.returncode == 0, result.stderr
    assert not imported, f"ckptvcs {' '.join(args)} imported torch"


def test_a_command_that_compares_tensor_values_does_import_torch(project: Path) -> None:
    result, imported = audited("diff", "exp", cwd=project)  # the audit itself can see torch
    assert result.returncode == 0 and "elements changed" in result.stdout, result.stderr
    assert imported


def test_completion_does_not_import_torch(project: Path) -> None:
    env = {"_CKPTVCS_COMPLETE": "bash_complete", "COMP_WORDS": "ckptvcs log ", "COMP_CWORD": "2"}
    result, imported = audited(cwd=project, env=env)
    assert "plain,main" in result.stdout.splitlines() and not imported


def test_importing_the_package_leaves_torch_alone_until_needed() -> None:
    code = ("import sys, ckptvcs; from ckptvcs import Repo; assert 'torch' not in sys.modules; "
            "ckptvcs.CheckpointManager; assert 'torch' in sys.modules; "
            "from ckptvcs import CheckpointManager; print(CheckpointManager.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ckptvcs.training.manager", result.stderr


def test_dtype_sizes_known_without_torch_match_torch() -> None:
    assert set(TORCH_DTYPES) <= set(DTYPE_ITEMSIZE)
    for name, dtype in TORCH_DTYPES.items():
        assert torch.empty(0, dtype=dtype).element_size() == DTYPE_ITEMSIZE[name], name


# -- 9. discovery and git ----------------------------------------------------------------------------


def test_discovery_finds_repositories_made_by_the_library(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "checkpoints") as repo:
        repo.commit(weights(0, 16), message="by Repo.init")
    with CheckpointManager(tmp_path / "managed", state={"w": torch.zeros(4)}) as manager:
        manager.save(1)
    for inside, needle in [(tmp_path / "checkpoints", "by Repo.init"), (tmp_path / "managed", "step=1")]:
        for cwd in (inside, inside / "refs" / "heads"):
            assert needle in ok("log", "--oneline", cwd=cwd)
            assert Repo.discover(cwd).root == inside


def test_discovery_skips_a_plain_config_json_and_finds_the_enclosing_store(project: Path) -> None:
    model_dir = project / "hf-model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert "c3" in ok("log", "--oneline", "-1", cwd=model_dir)


def test_repositories_do_not_show_up_in_git_status(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    ok("init", cwd=tmp_path)
    with Repo.init(tmp_path / "checkpoints") as repo:
        repo.commit(weights(0, 16))
    with Repo.open(tmp_path / ".ckptvcs") as repo:
        repo.commit(weights(1, 16))
        repo.fsck()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path,
                            capture_output=True, text=True, check=True, timeout=60).stdout
    assert status == ""


# -- 10. verbs -------------------------------------------------------------------------------------


def test_log_counts_like_git(project: Path) -> None:
    assert len(ok("log", "--oneline", "-2", cwd=project).splitlines()) == 2
    assert len(ok("log", "-3", "--oneline", cwd=project).splitlines()) == 3
    assert len(ok("log", "-n", "1", "--oneline", cwd=project).splitlines()) == 1


def test_log_ranges(project: Path) -> None:
    c3, c2, c1, _ = commit_ids(project)
    with Repo.open(project / ".ckptvcs") as repo:
        assert [c.id for c in repo.log("exp..main")] == [c3, c2]
        assert [c.id for c in repo.log("exp..")] == [c3, c2]
        assert [c.id for c in repo.log("main..exp")] == []
        assert [c.id for c in repo.log("exp..main", n=1)] == [c3]
        with pytest.raises(InvalidInputError, match="A..B"):
            repo.log("exp...main")
    lines = ok("log", "--oneline", "exp..v1", cwd=project).splitlines()
    assert [line.split()[0] for line in lines] == [c2[:12]]


def test_checkout_b_creates_a_branch_and_switches_to_it(tmp_path: Path) -> None:
    with Repo.init(tmp_path / ".ckptvcs") as repo:
        first = repo.commit(weights(0, 16))
        second = repo.commit(weights(1, 16))
    assert f"Switched to a new branch 'fix' ({second[:12]})" in ok("checkout", "-b", "fix", cwd=tmp_path)
    assert f"({first[:12]})" in ok("checkout", "-b", "old", "HEAD~1", cwd=tmp_path)
    with Repo.open(tmp_path / ".ckptvcs") as repo:
        assert repo.head() == ("old", first) and repo.branches()["fix"] == second
    assert_one_line_error(run("checkout", "-b", "fix", cwd=tmp_path), 6, "ckptvcs checkout fix", "branch -f fix")
    result = run("checkout", cwd=tmp_path)
    assert result.returncode == 2 and "-b NAME" in result.stderr


def test_diff_stat_counts_changed_chunks_without_reading_data(tmp_path: Path) -> None:
    with Repo.init(tmp_path / ".ckptvcs", chunk_size=4096) as repo:
        w = torch.zeros(4096)  # 16 KiB: four chunks
        base = repo.commit({"w": w, "gone": torch.ones(4), "lr": 0.1})
        changed = w.clone()
        changed[1500] = 1.0  # inside the second chunk only
        head = repo.commit({"w": changed, "new": torch.ones(2), "lr": 0.2})
        stats = {s.path: s for s in repo.diff_stat(base, head)}
        assert (stats["w"].status, stats["w"].nbytes, stats["w"].changed_bytes) == ("changed", 16384, 4096)
        assert (stats["gone"].status, stats["gone"].changed_bytes) == ("removed", 16)
        assert (stats["new"].status, stats["new"].changed_bytes) == ("added", 8)
        assert (stats["lr"].kind, stats["lr"].status) == ("value", "changed")
        repo.prune(base, rule="test")
        assert len(repo.diff_stat(base, head)) == 4  # manifests only: a pruned commit still compares
    out = ok("diff", "--stat", "HEAD~1", cwd=tmp_path)
    assert re.search(r"^ M w +\| +4\.1 KB of +16\.4 KB #####$", out, re.M), out
    assert "1 tensor(s) changed, 1 added, 1 removed" in out and "1 value(s) differ" in out
    as_json = json.loads(ok("diff", "--stat", "--json", "HEAD~1", cwd=tmp_path))
    assert {e["path"]: e["changed_bytes"] for e in as_json}["w"] == 4096


def test_prune_keeps_the_history_record_and_releases_the_data(tmp_path: Path) -> None:
    with Repo.init(tmp_path / ".ckptvcs") as repo:
        old = repo.commit(weights(0), message="old", step=1, metrics={"loss": 2.0})
        repo.commit(weights(1), message="new", step=2)
    assert_one_line_error(run("prune", "HEAD", cwd=tmp_path), 16, "tip")
    assert f"Pruned {old[:12]}" in ok("prune", "HEAD~1", "--reason", "diverged", cwd=tmp_path)
    assert "would reclaim" in ok("status", "--gc", cwd=tmp_path)
    ok("gc", cwd=tmp_path)
    log = ok("log", cwd=tmp_path)
    assert "old" in log and "Step:   1" in log and "diverged" in log
    with Repo.open(tmp_path / ".ckptvcs") as repo:
        assert repo.show(old).metrics == {"loss": 2.0} and repo.pruned_record(old)["rule"] == "manual"
        with pytest.raises(CommitPrunedError):
            repo.load(old)


def test_status_reports_head_gc_and_the_last_fsck(tmp_path: Path) -> None:
    ok("init", cwd=tmp_path)
    out = ok("status", cwd=tmp_path)
    assert "On branch main" in out and "No commits yet" in out and "never run" in out
    with Repo.open(tmp_path / ".ckptvcs") as repo:
        repo.commit(weights(0), message="first")
        repo.commit(weights(1), message="second", step=7, metrics={"loss": 0.5})
        repo.prune("HEAD~1", rule="test")
        assert repo.last_fsck() is None
        assert repo.fsck().ok and repo.last_fsck()["ok"] is True
    out = ok("status", cwd=tmp_path)
    assert "step 7" in out and "loss=0.5" in out and "second" in out
    assert "not checked" in out and "status --gc" in out and "fsck:    clean" in out
    out = ok("status", "--gc", cwd=tmp_path)
    assert "would reclaim" in out and "1 pruned commit" in out and "fsck:    clean" in out
    status = json.loads(ok("status", "--json", cwd=tmp_path))
    assert status["branch"] == "main" and status["step"] == 7 and status["metrics"] == {"loss": 0.5}
    assert status["gc"] is None and status["fsck"]["ok"] is True
    status = json.loads(ok("status", "--json", "--gc", cwd=tmp_path))
    assert status["gc"]["reclaimable_bytes"] > 0
    for pack in (tmp_path / ".ckptvcs" / "packs").glob("*.pack"):
        pack.unlink()  # damage: fsck fails, and status says so afterwards
    assert run("fsck", cwd=tmp_path).returncode != 0
    status = json.loads(ok("status", "--json", cwd=tmp_path))
    assert status["fsck"]["ok"] is False and status["fsck"]["errors"] > 0
    assert "problem(s)" in ok("status", cwd=tmp_path)


def complete(project: Path, *words: str) -> list[str]:
    env = {"_CKPTVCS_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["ckptvcs", *words]),
           "COMP_CWORD": str(len(words))}
    result = run(cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines()]


def test_completion_offers_branch_and_tag_names(project: Path) -> None:
    assert complete(project, "checkout", "") == ["HEAD", "exp", "main", "v1"]
    assert complete(project, "log", "e") == ["exp"]
    assert complete(project, "log", "exp..m") == ["exp..main"]
    assert complete(project, "tag", "-d", "") == ["v1"]
    assert complete(project, "branch", "-d", "") == ["exp", "main"]
    elsewhere = project.parent
    assert complete(elsewhere, "--repo", str(project / ".ckptvcs"), "show", "v") == ["v1"]
    script = run(cwd=project, env={"_CKPTVCS_COMPLETE": "bash_source"}).stdout
    assert "_CKPTVCS_COMPLETE=bash_complete" in script


# -- 11. error texts ------------------------------------------------------------------------------


def test_a_short_revision_prefix_says_it_is_too_short(project: Path) -> None:
    assert_one_line_error(run("show", commit_ids(project)[0][:3], cwd=project), 5, "at least 4 hex digits")
    with Repo.open(project / ".ckptvcs") as repo, pytest.raises(RevisionNotFoundError, match="at least 4"):
        repo.resolve("ab")


def test_a_file_of_neither_format_says_what_it_is_not(project: Path, tmp_path: Path) -> None:
    for name in ("notes.pt", "notes.safetensors", "notes.txt"):
        (tmp_path / name).write_text("just some text")
        with pytest.raises(InvalidInputError) as caught:
            read_state_file(tmp_path / name)
        for needle in (name, "neither a PyTorch checkpoint", "nor a safetensors file", "b'just some t"):
            assert needle in str(caught.value)
    torch.save(weights(0, 4), tmp_path / "real.safetensors")
    save_file(weights(0, 4), str(tmp_path / "real.pt"))
    with pytest.raises(InvalidInputError, match="looks like a PyTorch checkpoint.*--format pt"):
        read_state_file(tmp_path / "real.safetensors")
    with pytest.raises(InvalidInputError, match="looks like a safetensors file.*--format safetensors"):
        read_state_file(tmp_path / "real.pt")
    (project / "notes.txt").write_text("just some text")
    assert_one_line_error(run("commit", "notes.txt", cwd=project), 9, "notes.txt", "neither a PyTorch checkpoint")


def test_an_unknown_extension_is_read_by_its_content(tmp_path: Path) -> None:
    torch.save(weights(0, 4), tmp_path / "ckpt.backup")
    save_file(weights(1, 4), str(tmp_path / "weights.bin2"))
    assert torch.equal(read_state_file(tmp_path / "ckpt.backup")[0]["w"], weights(0, 4)["w"])
    assert torch.equal(read_state_file(tmp_path / "weights.bin2")[0]["w"], weights(1, 4)["w"])


def test_an_existing_tag_or_branch_names_minus_f(project: Path) -> None:
    assert_one_line_error(run("tag", "v1", cwd=project), 6, "v1", "-f", "ckptvcs tag -f v1 HEAD")
    assert_one_line_error(run("branch", "exp", cwd=project), 6, "exp", "ckptvcs branch -f exp HEAD")


def test_a_refused_python_object_names_the_fix(tmp_path: Path) -> None:
    class Sampler:
        pass

    with Repo.init(tmp_path / "r") as repo, pytest.raises(UnsupportedValueError) as caught:
        repo.commit({"sampler": Sampler()})
    message = str(caught.value)
    assert "sampler" in message and "Sampler" in message
    assert "dict of plain values" in message and "state_dict()" in message and "register it" in message


def test_an_index_write_that_hits_a_full_disk_says_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LMDB reports a short write on a full disk as EIO; the message must still say disk full
    (found when init's .gitignore moved where a real full tmpfs ran out of space)."""
    import lmdb

    from ckptvcs import index

    eio = lmdb.Error("mdb_txn_commit: Input/output error")
    assert index._write_failure(eio, tmp_path) == str(eio)  # plenty of space: a real I/O error
    assert "disk full" in index._write_failure(lmdb.DiskError("mdb_put: No space left on device"), tmp_path)
    monkeypatch.setattr(index, "_NEARLY_FULL_BYTES", 1 << 62)
    assert "disk full" in index._write_failure(eio, tmp_path)

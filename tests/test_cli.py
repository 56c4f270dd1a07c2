"""The ``ckptvcs`` command, run as a user runs it: the installed script in a subprocess.

One scenario walks the whole porcelain (init, commit of .pt and .safetensors files,
branch, tag, log, show, diff, checkout, export, reflog, stats) and checks what each
command printed and wrote. The error cases check the CLI contract: one ``error:`` line
on stderr, no traceback, the documented exit code, and a store left byte-for-byte as
it was. ``--help`` of every command is checked in-process (it is the same code path
and spawning a process per command would only cost time).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptvcs import Repo
from ckptvcs.cli import cli
from helpers import assert_tensor_identical, store_snapshot

CKPTVCS = Path(sys.executable).with_name("ckptvcs")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``ckptvcs`` command; never inherits a CKPTVCS_REPO from the caller."""
    full_env = {k: v for k, v in os.environ.items() if k != "CKPTVCS_REPO"}
    full_env.update({"CKPTVCS_AUTHOR": "Tester <t@example.com>", "NO_COLOR": "1"}, **(env or {}))
    return subprocess.run([str(CKPTVCS), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)


def ok(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = run(*args, cwd=cwd, env=env)
    assert result.returncode == 0, f"ckptvcs {' '.join(args)} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(64, 32, generator=g), "layer.bias": torch.randn(64, generator=g)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


def test_installed_command_exists() -> None:
    assert CKPTVCS.exists(), f"the console script is not installed next to {sys.executable}"


def test_scenario_through_the_installed_command(workdir: Path) -> None:
    project = workdir / "project"
    sub = project / "src" / "deep"
    sub.mkdir(parents=True)
    state1 = model_state(1)
    torch.save({"model": state1, "step": 100, "lr": 0.1}, project / "ckpt1.pt")
    state2 = model_state(2)
    save_file(state2, str(project / "ckpt2.safetensors"))
    (project / "config.json").write_text(json.dumps({"lr": 0.1, "batch": 32}))

    assert "Initialized empty ckptvcs repository" in ok("init", cwd=project)
    assert (project / ".ckptvcs" / "config.json").is_file()

    # commit from a subdirectory: the store is discovered in a parent
    out = ok("commit", "../../ckpt1.pt", "-m", "first", "--step", "100", "--metric", "loss=1.5",
             "--metric", "acc=0.25", "--config", "../../config.json", "--data-version", "v7", cwd=sub)
    assert out.startswith("[main ") and "first" in out and "3 tensors" not in out
    c1 = out.split()[1].rstrip("]")
    out = ok("commit", "ckpt2.safetensors", "-m", "second", "--step", "200", "--metric", "loss=0.5", cwd=project)
    c2 = out.split()[1].rstrip("]")

    with Repo.open(project / ".ckptvcs") as repo:
        first = repo.show(c1)
        assert (first.step, first.metrics, first.data_version) == (100, {"loss": 1.5, "acc": 0.25}, "v7")
        assert first.config == {"lr": 0.1, "batch": 32}
        assert first.author == "Tester <t@example.com>"
        loaded = repo.load(c1)
        assert loaded["step"] == 100 and loaded["lr"] == 0.1
        for name, tensor in state1.items():
            assert_tensor_identical(loaded["model"][name], tensor)
        for name, tensor in state2.items():
            assert_tensor_identical(repo.load(c2)[name], tensor)

    assert "Branch exp at" in ok("branch", "exp", c1, cwd=project)
    assert "Tagged" in ok("tag", "v1", c2, "-m", "release one", cwd=project)
    branches = ok("branch", cwd=project)
    assert "* main" in branches and "exp" in branches
    assert "release one" in ok("tag", cwd=project)

    oneline = ok("log", "--oneline", cwd=project).splitlines()
    assert len(oneline) == 2 and "HEAD -> main" in oneline[0] and "tag: v1" in oneline[0] and "exp" in oneline[1]
    assert "loss=0.5" in oneline[0] and "step=200" in oneline[0]
    assert len(ok("log", "-n", "1", "--oneline", cwd=project).splitlines()) == 1
    graph = ok("log", "--graph", "--oneline", "--all", cwd=project)
    assert graph.startswith("* ") and "second" in graph
    assert "Step:   100" in ok("log", c1, cwd=project)

    shown = ok("show", "v1", "--tensors", cwd=project)
    assert "layer.weight" in shown and "float32[64, 32]" in shown
    as_json = json.loads(ok("show", "HEAD~1", "--json", cwd=project))
    assert as_json["id"].startswith(c1) and as_json["metrics"] == {"loss": 1.5, "acc": 0.25}

    diff = json.loads(ok("diff", c1, c2, "--json", cwd=project))
    statuses = {entry["path"]: entry["status"] for entry in diff}
    assert statuses["model/layer.weight"] == "removed" and statuses["step"] == "removed" and statuses["layer.weight"] == "added"
    assert "differ" in ok("diff", "HEAD~1", cwd=project)

    # checkout -o / export write files that round-trip
    ok("checkout", c1, "-o", "out.pt", cwd=project)
    exported = torch.load(project / "out.pt", weights_only=True)
    assert exported["step"] == 100
    assert_tensor_identical(exported["model"]["layer.bias"], state1["layer.bias"])
    ok("export", "v1", "out.safetensors", cwd=project)
    with Repo.open(project / ".ckptvcs") as scratch_check:
        assert scratch_check.head()[0] == "main"  # export and checkout -o leave HEAD alone

    # CKPTVCS_REPO and --repo find the store from anywhere
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    assert "second" in ok("log", "--oneline", cwd=elsewhere, env={"CKPTVCS_REPO": str(project / ".ckptvcs")})
    assert "second" in ok("--repo", str(project / ".ckptvcs"), "log", "--oneline", cwd=elsewhere)

    assert "Switched to branch 'exp'" in ok("checkout", "exp", cwd=project)
    assert "detached" in ok("checkout", c2, cwd=project)
    reflog = ok("reflog", cwd=project).splitlines()
    assert reflog[0].startswith(c2[:12]) and reflog[1].startswith(c1[:12])

    stats = json.loads(ok("stats", "--json", cwd=project))
    assert stats["commits"] == 2 and stats["tags"] == 1 and stats["branches"] == 2
    assert stats["logical_bytes"] > 0 and stats["stored_bytes"] > 0
    assert "dedup ratio" in ok("stats", cwd=project)

    assert "Deleted tag v1" in ok("tag", "-d", "v1", cwd=project)
    assert "Deleted branch exp" in ok("branch", "-d", "exp", cwd=project)
    assert "exp" not in ok("branch", cwd=project)


def test_python_dash_m_runs_the_same_cli(workdir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ckptvcs", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ckptvcs, version" in result.stdout


@pytest.fixture(scope="module")
def populated(workdir: Path) -> Path:
    """A store with one commit on main and a tag, for the error cases."""
    project = workdir / "errors"
    project.mkdir()
    with Repo.init(project / ".ckptvcs") as repo:
        repo.commit(model_state(3), message="base", step=1)
        repo.tag("v1")
    return project


class _Evil:
    """Unpickling this runs ``touch <marker>``: a .pt must never be unpickled freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def error_cases(project: Path) -> list[tuple[list[str], int, str]]:
    (project / "truncated.pt").write_bytes((project / "good.pt").read_bytes()[:100])
    (project / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (project / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    (project / "bad.json").write_text("{not json")
    with open(project / "evil.pt", "wb") as f:
        pickle.dump({"x": _Evil(project / "PWNED")}, f)
    torch.save({"x": _Evil(project / "PWNED")}, project / "evil_zip.pt")
    return [
        (["log", "nosuchrev"], 5, "nosuchrev"),
        (["show", "HEAD~5"], 5, "HEAD~5"),
        (["commit", "truncated.pt"], 9, "truncated.pt"),
        (["commit", "garbage.pt"], 9, "garbage.pt"),
        (["commit", "evil.pt"], 9, "never unpickles"),
        (["commit", "evil_zip.pt"], 9, "never unpickles"),
        (["commit", "bad.safetensors"], 9, "bad.safetensors"),
        (["commit", "missing.pt"], 9, "missing.pt"),
        (["commit", "good.pt", "--metric", "loss"], 9, "NAME=NUMBER"),
        (["commit", "good.pt", "--config", "bad.json"], 9, "bad.json"),
        (["branch", "bad..name"], 6, "bad..name"),
        (["tag", "v1"], 6, "v1"),
        (["branch", "-d", "nosuch"], 5, "nosuch"),
    ]


def test_every_error_is_one_line_with_its_exit_code_and_leaves_the_store_alone(populated: Path) -> None:
    torch.save(model_state(4), populated / "good.pt")
    cases = error_cases(populated)
    before = store_snapshot(populated / ".ckptvcs")
    for args, code, needle in cases:
        assert_one_line_error(run(*args, cwd=populated), code, needle)
    assert store_snapshot(populated / ".ckptvcs") == before
    assert not (populated / "PWNED").exists(), "a pickled object was executed"


def test_outside_a_repository(workdir: Path) -> None:
    nowhere = workdir / "nowhere"
    nowhere.mkdir()
    assert_one_line_error(run("log", cwd=nowhere), 3, "no ckptvcs repository")
    assert_one_line_error(run("--repo", str(nowhere), "stats", cwd=nowhere), 3)
    assert list(nowhere.iterdir()) == []


def test_newer_format_is_refused(workdir: Path) -> None:
    project = workdir / "future"
    Repo.init(project / ".ckptvcs").close()
    config_path = project / ".ckptvcs" / "config.json"
    config = json.loads(config_path.read_text())
    config["version"] = 99
    config_path.write_text(json.dumps(config))
    assert_one_line_error(run("log", cwd=project), 4, "newer")


def test_init_refuses_an_existing_repository(populated: Path) -> None:
    assert_one_line_error(run("init", cwd=populated), 3)


COMMANDS = sorted(cli.commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {command}") or f" {command} " in result.output.splitlines()[0]
    assert cli.commands[command].help, f"{command} has no help text"


def test_top_level_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command}" in result.output


def test_git_habits_never_lose_data(workdir: Path) -> None:
    """branch -d refuses unmerged work (-D forces); checkout from a detached HEAD says how to keep
    its commits; gc --prune=now collects them, and loading one is exit 14, not bit rot."""
    project = workdir / "habits"
    with Repo.init(project / ".ckptvcs") as repo:
        repo.commit(model_state(5), message="base")
        exp = repo.commit(model_state(6), message="experiment", branch="exp")
        repo.checkout(repo.resolve("HEAD"))
        detached = repo.commit(model_state(7), message="detached work")
    assert_one_line_error(run("branch", "-d", "exp", cwd=project), 6, "not contained", "-D")
    assert f"Deleted branch exp (was {exp[:12]})" in ok("branch", "-D", "exp", cwd=project)
    result = run("checkout", "main", cwd=project)
    assert result.returncode == 0 and "Switched to branch 'main'" in result.stdout
    assert "leaving 1 commit(s) behind" in result.stderr and f"{detached[:12]} detached work" in result.stderr
    assert f"ckptvcs branch NAME {detached[:12]}" in result.stderr and "30 days" in result.stderr
    assert "2 unreachable commit(s) lost their data" in ok("gc", "--prune=now", cwd=project)
    # (the grace itself, and what follows a collection, are in test_gc.py, in-process)
    assert_one_line_error(run("export", detached, "out.pt", cwd=project), 14, "collected by gc")

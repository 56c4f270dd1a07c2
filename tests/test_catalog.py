"""Catalog queries: the FIELD OP VALUE grammar, Repo.find / Repo.best, and the CLI's
``log --where``, ``best`` and ``--json`` through the installed command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckptvcs import Repo
from ckptvcs.catalog import matches, parse_all, parse_where, shown_parents
from ckptvcs.errors import RevisionNotFoundError, UsageError
from ckptvcs.objects import Commit

CKPTVCS = Path(sys.executable).with_name("ckptvcs")


def record(**fields: object) -> Commit:
    body: dict = {"manifest": "0" * 64, "parents": (), "message": "warmup run", "author": "Ada <a@x>",
                  "time": "2026-10-05T12:00:00.000000Z", "step": 100, "epoch": 2,
                  "metrics": {"val_loss": 0.25, "acc": 0.9}, "config": {"optim": {"lr": 0.001}, "amp": True, "x": None},
                  "data_version": "wiki-2026-10"}
    body.update(fields)
    return Commit(**body)  # type: ignore[arg-type]


@pytest.mark.parametrize("expr, expected", [
    ("val_loss < 0.3", True), ("val_loss < 0.25", False), ("val_loss <= 0.25", True),
    ("metrics.acc > 0.5", True), ("acc >= 0.95", False), ("val_loss == 0.25", True), ("val_loss != 0.25", False),
    ("step == 100", True), ("step > 100", False), ("epoch != 3", True),
    ("data_version == 'wiki-2026-10'", True), ('data_version == "wiki-2026-09"', False),
    ("data_version ~ 'wiki-2026'", True), ("message ~ '^warm'", True), ("message ~ 'cold'", False),
    ("author ~ 'Ada'", True), ("message == 'warmup run'", True),
    ("config.optim.lr == 0.001", True), ("config.optim.lr < 0.0001", False), ("config.amp == true", True),
    ("config.amp == 1", False), ("config.x == null", True), ("config.optim.momentum == 0.9", False),
    ("config.optim == 3", False),
    ("time >= '2026-10-05'", True), ("time < '2026-10-05T12:00:00Z'", False),
    ("time < '2026-10-05T13:00:00+01:00'", False), ("time <= '2026-10-05T13:00:00+01:00'", True),
    ("missing_metric < 1", False), ("missing_metric != 1", False), ("data_version < 3", False),
])
def test_every_operator_and_field_kind(expr: str, expected: bool) -> None:
    assert parse_where(expr).matches(record()) is expected


def test_a_commit_lacking_the_field_does_not_match() -> None:
    bare = record(step=None, epoch=None, data_version=None, metrics={}, config=None)
    for expr in ("step >= 0", "epoch != 1", "data_version ~ ''", "val_loss > -1", "config.optim.lr > 0", "step == null"):
        assert not parse_where(expr).matches(bare), expr


def test_conditions_and_together() -> None:
    assert matches(record(), parse_all(["val_loss < 0.3", "data_version == 'wiki-2026-10'"]))
    assert not matches(record(), parse_all(["val_loss < 0.3", "step > 1000"]))


@pytest.mark.parametrize("expr", [
    "", "val_loss", "val_loss <", "val_loss << 3", "< 3", "val_loss < abc", "val_loss < '0.3",
    "metrics. < 1", "config < 1", "a..b == 1", "message ~ 3", "message ~ '('", "time > 5", "time > 'yesterday'",
    "__import__('os') == 1",
])
def test_malformed_expressions_raise_one_usage_error(expr: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_where(expr)
    assert "\n" not in str(info.value) and info.value.exit_code == 9


# -- Repo.find / Repo.best -------------------------------------------------------------------


def _commit(repo: Repo, i: int, **kw: object) -> str:
    return repo.commit({"w": np.full(4, i, dtype=np.float32)}, code_version=None, **kw)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo.init(tmp_path / "repo")
    losses = [0.9, 0.5, 0.3, 0.5, 0.2]
    for i, loss in enumerate(losses):
        _commit(r, i, message=f"c{i}", step=i * 10, metrics={"val_loss": loss},
                data_version="v1" if i < 3 else "v2")
    r.branch("side", "HEAD~2")
    _commit(r, 9, branch="side", message="side", step=99, metrics={"val_loss": 0.1})
    _commit(r, 10, message="no metric", step=50)
    return r


def test_find_filters_newest_first_with_ranges_n_and_all_refs(repo: Repo) -> None:
    assert [c.message for c in repo.find("val_loss <= 0.5")] == ["c4", "c3", "c2", "c1"]
    assert [c.message for c in repo.find("val_loss <= 0.5", n=2)] == ["c4", "c3"]
    assert [c.message for c in repo.find("val_loss < 0.6", "data_version == 'v2'")] == ["c4", "c3"]
    assert [c.message for c in repo.find("step >= 0", rev="HEAD~3..HEAD")] == ["no metric", "c4", "c3"]
    assert [c.message for c in repo.find("val_loss < 0.2")] == []
    assert [c.message for c in repo.find("val_loss < 0.2", all_refs=True)] == ["side"]
    assert [c.message for c in repo.find("val_loss < 0.2", rev="side")] == ["side"]
    assert len(repo.find()) == len(repo.log())


def test_find_refuses_a_malformed_expression(repo: Repo) -> None:
    with pytest.raises(UsageError):
        repo.find("val_loss <")


def test_best_min_max_k_branch_where(repo: Repo) -> None:
    assert [c.message for c in repo.best("val_loss")] == ["c4"]
    assert [c.message for c in repo.best("val_loss", k=3)] == ["c4", "c2", "c3"]  # tie 0.5: newer c3 before c1
    assert [c.message for c in repo.best("val_loss", k=4)][-1] == "c1"
    assert [c.message for c in repo.best("val_loss", mode="max", k=2)] == ["c0", "c3"]
    assert [c.message for c in repo.best("metrics.val_loss", branch="side")] == ["side"]
    assert [c.message for c in repo.best("val_loss", where=["data_version == 'v1'"])] == ["c2"]
    assert len(repo.best("val_loss", k=100)) == 5  # the commit without the metric is skipped
    assert repo.best("nonexistent") == []
    with pytest.raises(RevisionNotFoundError, match="no branch named 'nope'"):
        repo.best("val_loss", branch="nope")


def test_best_skips_pruned_commits_unless_asked(repo: Repo) -> None:
    best = repo.best("val_loss")[0]
    repo.prune(best.id, "manual", "bad eval")
    assert [c.message for c in repo.best("val_loss")] == ["c2"]
    with_pruned = repo.best("val_loss", include_pruned=True)
    assert with_pruned[0].id == best.id and with_pruned[0].pruned is not None


@pytest.mark.parametrize("kwargs", [{"mode": "median"}, {"k": 0}, {"k": True}, {"metric": ""}])
def test_best_refuses_bad_arguments(repo: Repo, kwargs: dict) -> None:
    args = {"metric": "val_loss", **kwargs}
    with pytest.raises(UsageError):
        repo.best(**args)


# -- the installed command -------------------------------------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CKPTVCS_REPO"}
    env["NO_COLOR"] = "1"
    return subprocess.run([str(CKPTVCS), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_log_where_best_and_json(repo: Repo) -> None:
    cwd = repo.root
    out = run("log", "--oneline", "--where", "val_loss <= 0.5", "--where", "data_version == 'v2'", cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert [line.split()[-1] for line in out.stdout.splitlines()] == ["c4", "c3"]
    out = run("log", "--json", "--where", "val_loss < 0.2", "--all", cwd=cwd)
    docs = json.loads(out.stdout)
    assert [d["message"] for d in docs] == ["side"] and len(docs[0]["id"]) == 64 and docs[0]["pruned"] is None
    assert len(json.loads(run("log", "--json", "-n", "2", cwd=cwd).stdout)) == 2
    out = run("best", "--metric", "val_loss", "-k", "2", "--json", cwd=cwd)
    assert [d["message"] for d in json.loads(out.stdout)] == ["c4", "c2"]
    out = run("best", "--metric", "val_loss", "--mode", "max", cwd=cwd)
    assert out.returncode == 0 and out.stdout.strip().endswith("c0")
    out = run("best", "--metric", "val_loss", "--branch", "side", "--json", cwd=cwd)
    assert [d["message"] for d in json.loads(out.stdout)] == ["side"]
    for command in (["show", "--json"], ["status", "--json"], ["stats", "--json"], ["diff", "--json", "HEAD~1"]):
        result = run(*command, cwd=cwd)
        assert result.returncode == 0, (command, result.stderr)
        json.loads(result.stdout)


@pytest.mark.parametrize("args", [
    ["log", "--where", "val_loss <"], ["log", "--where", "x ~ '('"], ["best", "--metric", "val_loss", "--where", "bad"],
])
def test_cli_malformed_where_is_one_line_exit_9(repo: Repo, args: list[str]) -> None:
    result = run(*args, cwd=repo.root)
    assert result.returncode == 9, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: where")


def test_a_filtered_graph_joins_commits_to_their_nearest_shown_ancestors(repo: Repo) -> None:
    out = run("log", "--graph", "--oneline", "--all", "--where", "step >= 0", "--where", "step != 40",
              "--where", "step != 20", cwd=repo.root)
    assert out.returncode == 0, out.stderr
    # side (off c2, hidden) joins c1; "no metric" (off c4, hidden) joins c3; nothing dangles.
    shown = {c.id: c for c in repo.find("step >= 0", "step != 40", "step != 20", all_refs=True)}
    edges = dict(shown_parents(list(shown.values()), repo.all_commits()))
    by_message = {c.message: c.id for c in shown.values()}
    assert edges[by_message["side"]] == (by_message["c1"],)
    assert edges[by_message["no metric"]] == (by_message["c3"],)
    assert edges[by_message["c0"]] == ()
    assert out.stdout.count("*") == len(shown)

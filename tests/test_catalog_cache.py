"""find / best / log --where answer from the commit-summary cache (catalog-cache.jsonl) what a
walk over the commit objects answers, whatever happened to the history or to the cache."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import blake3
import numpy as np
import pytest
from click.testing import CliRunner

from ckptvcs import Repo, catalog, layout
from ckptvcs.cli import cli


def _history(repo: Repo, commits: int, branch: str = "main", start: int = 1) -> list[str]:
    """``commits`` commit objects written directly on top of ``branch`` (fast: one ref move)."""
    tip = repo.resolve(branch)
    base = repo.objects.read_commit(tip)
    when = datetime.fromisoformat(base.time.replace("Z", "+00:00"))
    ids, parent = [], tip
    for i in range(start, start + commits):
        loss = float("nan") if i % 17 == 0 else 1.0 / (1 + i % 13)
        record = replace(base, parents=(parent,), message=f"c{i}", step=i, epoch=i // 10,
                         time=(when + timedelta(seconds=i)).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                         metrics={"val_loss": loss, "acc": (i % 7) / 7}, data_version="v1" if i % 2 else "v2",
                         config={"lr": 10.0 ** -(i % 3)})
        parent = repo.objects.put("commit", record.to_json())
        ids.append(parent)
    repo.refs.set_if_equals(f"refs/heads/{branch}", tip, parent, who="test", message="test: history")
    return ids


@pytest.fixture
def hist(repo: Repo) -> Repo:
    repo.commit({"w": np.zeros(4, dtype=np.float32)}, "c0", step=0, metrics={"val_loss": 1.0}, code_version=None)
    _history(repo, 60)
    return repo


def _walk_find(repo: Repo, *where: str, rev: str = "HEAD", all_refs: bool = False) -> list[str]:
    """What find answered before the cache: every commit of the walk read and tested."""
    conditions = catalog.parse_all(where)
    commits = repo.all_commits() if all_refs else repo.log(rev)
    return [c.id for c in commits if catalog.matches(c, conditions)]


def _walk_best(repo: Repo, metric: str, mode: str = "min", k: int = 1, where: tuple[str, ...] = (),
               include_pruned: bool = False) -> list[str]:
    scored = []
    for commit in repo.log("HEAD"):
        if not catalog.matches(commit, catalog.parse_all(where)):
            continue
        value = catalog.metric_value(commit, metric)
        if value is not None and (include_pruned or commit.pruned is None):
            scored.append((value if mode == "min" else -value, commit.id))
    scored.sort(key=lambda pair: pair[0])
    return [oid for _, oid in scored[:k]]


QUERIES = [("val_loss < 0.3",), ("val_loss < 0.3", "data_version == 'v2'"), ("message ~ 'c1.'",),
           ("step >= 40", "epoch == 4"), ("time > '2000-01-01'",), ("val_loss == null",), ("acc > 0.5",)]


def _check_all(repo: Repo) -> None:
    for where in QUERIES:
        assert [c.id for c in repo.find(*where)] == _walk_find(repo, *where), where
        assert [c.id for c in repo.find(*where, all_refs=True)] == _walk_find(repo, *where, all_refs=True), where
    for mode in ("min", "max"):
        for metric in ("val_loss", "acc"):
            assert [c.id for c in repo.best(metric, mode=mode, k=5)] == _walk_best(repo, metric, mode, 5)
    assert [c.id for c in repo.best("val_loss", k=3, where=("data_version == 'v1'",))] == \
        _walk_best(repo, "val_loss", k=3, where=("data_version == 'v1'",))


def test_queries_equal_a_walk_of_the_objects_as_the_history_changes(hist: Repo) -> None:
    _check_all(hist)
    assert (Path(hist.root) / layout.CATALOG_CACHE).is_file()
    _check_all(hist)  # from the cache
    _history(hist, 10, start=100)  # new commits
    _check_all(hist)
    hist.branch("side", "HEAD~30")
    _history(hist, 8, branch="side", start=200)
    hist.tag("t1", "side~2")
    _check_all(hist)
    hist.delete_branch("side", force=True)
    _check_all(hist)
    hist.prune("HEAD~3", rule="test")
    _check_all(hist)
    assert [c.id for c in hist.best("val_loss", k=60, include_pruned=True)] == \
        _walk_best(hist, "val_loss", k=60, include_pruned=True)
    hist.gc(prune_unreachable_after="now")
    _check_all(hist)
    assert [c.id for c in hist.find("step > 50", rev="HEAD~20..HEAD")] == \
        _walk_find(hist, "step > 50", rev="HEAD~20..HEAD")


def test_a_warm_query_reads_only_the_commits_it_returns(hist: Repo, reads: list[str]) -> None:
    hist.find("val_loss < 0.3")
    reads.clear()
    best = hist.best("val_loss", k=2)
    assert sorted(reads) == sorted(c.id for c in best)
    reads.clear()
    found = hist.find("step > 55")
    assert sorted(reads) == sorted(c.id for c in found)
    new = _history(hist, 2, start=300)
    reads.clear()
    found = hist.find("step >= 300")
    assert [c.id for c in found] == new[::-1]
    assert sorted(reads) == sorted(new + new)  # the new summaries, then the commits returned


def test_a_config_condition_reads_the_objects(hist: Repo) -> None:
    assert [c.id for c in hist.find("config.lr == 0.1")] == _walk_find(hist, "config.lr == 0.1")


def _forge(repo: Repo, oid: str, **fields: object) -> None:
    """Rewrite the cache line of ``oid`` with other values and a matching checksum."""
    cache = Path(repo.root) / layout.CATALOG_CACHE
    lines = []
    for line in cache.read_bytes().splitlines():
        tag, digest, body = line.split(b" ", 2)
        item = json.loads(body)
        if item[0] == oid:
            for name, value in fields.items():
                item[{"metrics": 7, "step": 5, "parents": 1}[name]] = value
            body = json.dumps(item, separators=(",", ":"), sort_keys=True).encode()
            digest = blake3.blake3(body).hexdigest(length=16).encode()
        lines.append(tag + b" " + digest + b" " + body)
    cache.write_bytes(b"\n".join(lines) + b"\n")


def test_a_forged_summary_never_changes_a_returned_commit(hist: Repo) -> None:
    want = _walk_best(hist, "val_loss", k=1)
    worst = _walk_best(hist, "val_loss", mode="max", k=1)[0]
    hist.best("val_loss")  # the cache is written
    _forge(hist, worst, metrics={"val_loss": -1.0, "acc": 0.0})
    assert [c.id for c in hist.best("val_loss")] == want  # checked against the object, cache dropped
    assert [c.id for c in hist.best("val_loss")] == want  # from the cache rebuilt from the objects
    hist.find("step > 0")
    _forge(hist, hist.resolve("HEAD~5"), step=10_000)
    assert [c.id for c in hist.find("step > 1000")] == []  # the forged match is read and refused


@pytest.mark.parametrize("damage", [b"garbage\n", b"c1 0000 [1]\n", b"c1 ", b"\xff\xfe\n"])
def test_damaged_lines_are_skipped(hist: Repo, damage: bytes, reads: list[str]) -> None:
    hist.find("step > 0")
    cache = Path(hist.root) / layout.CATALOG_CACHE
    data = cache.read_bytes()
    cache.write_bytes(data[:200] + damage + data[200:])  # the first line is damaged too
    _check_all(hist)


def test_a_deleted_cache_or_an_old_repository(hist: Repo) -> None:
    assert not (Path(hist.root) / layout.CATALOG_CACHE).exists()  # before any query: an old repository
    _check_all(hist)
    (Path(hist.root) / layout.CATALOG_CACHE).unlink()
    _check_all(hist)
    assert hist.fsck().ok


def test_cli_log_where_and_best(hist: Repo) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["--repo", str(hist.root), "log", "--where", "val_loss < 0.1", "--json"])
    assert out.exit_code == 0, out.output
    assert out.output.count('"id"') == len(_walk_find(hist, "val_loss < 0.1"))
    out = runner.invoke(cli, ["--repo", str(hist.root), "best", "--metric", "val_loss", "-k", "2"])
    assert out.exit_code == 0, out.output
    for oid in _walk_best(hist, "val_loss", k=2):
        assert oid[:12] in out.output

"""A version-1 repository written by older code (commit 288fd07) still reads, checks and loads.

tests/data/v1-repo was made by tests/data/make_v1_repo.py run against that commit; the
golden files next to it are what `fsck --json`, `fsck --read-data --json` and
`log --oneline --all` printed for it. Each test works on a copy (fsck records its verdict
in the repository). The index is derived data: the copy without it must read the same.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptvcs import CommitPrunedError, Repo

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "v1-repo"


def _generator():  # type: ignore[no-untyped-def]
    """The generator script as a module, for its describe()."""
    spec = importlib.util.spec_from_file_location("make_v1_repo", DATA / "make_v1_repo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["with-index", "without-index"])
def v1_copy(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh copy of the fixture; ``without-index`` drops the LMDB index (rebuilt on open)."""
    copy = tmp_path / "v1-repo"
    shutil.copytree(FIXTURE, copy)
    # git keeps no empty folder: put back what the old code left empty (without tmp/ a
    # commit cannot stage its pack; reading needs neither it nor the `lock` file).
    (copy / "tmp").mkdir(exist_ok=True)
    if request.param == "without-index":
        shutil.rmtree(copy / "index")
    return copy


def ckptvcs(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptvcs", "--repo", str(repo), *args],
                          capture_output=True, text=True, timeout=300)


def test_fixture_is_version_1_and_small() -> None:
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["version"] == 1
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 1 << 20


@pytest.mark.parametrize("args, golden", [
    (("fsck", "--json"), "v1-repo.fsck.json"),
    (("fsck", "--read-data", "--json"), "v1-repo.fsck-read-data.json"),
    (("log", "--oneline", "--all"), "v1-repo.log.txt"),
])
def test_cli_output_matches_golden(v1_copy: Path, args: tuple[str, ...], golden: str) -> None:
    result = ckptvcs(v1_copy, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DATA / golden).read_text()


def test_every_commit_loads_as_committed(v1_copy: Path) -> None:
    describe = _generator().describe
    expected = json.loads((DATA / "v1-repo.values.json").read_text())
    with Repo.open(v1_copy) as repo:
        assert set(repo.branches()) == {"main", "exp"} and set(repo.tags()) == {"v1.0"}
        pruned = set(repo.pruned())
        assert len(pruned) == 1
        ids = {c.id for c in repo.log("main")} | {c.id for c in repo.log("exp")}
        assert ids == set(expected)
        for cid, values in expected.items():
            if cid in pruned:
                with pytest.raises(CommitPrunedError):
                    repo.load(cid)
                continue
            assert describe(repo.load(cid)) == values, cid
        assert describe(repo.load("v1.0", keys=["model"])) == {
            k: v for k, v in expected[repo.resolve("v1.0")].items() if k.startswith("model/")}


def test_today_commits_on_top_of_a_v1_repository(v1_copy: Path) -> None:
    """Old repositories stay writable: a new commit on top, then fsck finds nothing wrong."""
    import torch

    with Repo.open(v1_copy) as repo:
        parent = repo.resolve("main")
        cid = repo.commit({"model": {"weight": torch.ones(64, 64)}, "step": 6}, message="today", step=6)
        assert list(repo.show(cid).parents) == [parent]
        assert torch.equal(repo.load(cid)["model"]["weight"], torch.ones(64, 64))
        report = repo.fsck(read_data=True)
        assert report.ok and not report.findings, report.summary()


def test_a_v1_repository_repacks_and_every_commit_still_loads(v1_copy: Path) -> None:
    """Repack works on a repository written before it existed; every commit loads after it."""
    describe = _generator().describe
    expected = json.loads((DATA / "v1-repo.values.json").read_text())
    with Repo.open(v1_copy) as repo:
        pruned = set(repo.pruned())
        repo.repack()
        for cid, values in expected.items():
            if cid not in pruned:
                assert describe(repo.load(cid)) == values, cid
        assert repo.fsck(read_data=True).ok

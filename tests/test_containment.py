"""Containment (issue 9, point 10): one damaged unrelated item (a tag object, another
branch, a pruned record) does not stop work on healthy branches. Listing and log go on
with a warning; gc and prune refuse, naming the item and its fix; a manager saving onto a
healthy branch keeps saving and defers retention."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptvcs import CheckpointManager, Repo, RepositoryDamagedError
from ckptvcs.cli import cli
from helpers import flip_byte


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(256, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture
def history(repo: Repo) -> dict[str, str]:
    """main: c1 (pruned) ← c2 (tagged v1) ← c3; branch other at o1."""
    ids = {f"c{i}": repo.commit(_state(i), f"c{i}", code_version=None) for i in (1, 2, 3)}
    repo.tag("v1", ids["c2"], message="release")
    ids["o1"] = repo.commit(_state(9), "o1", branch="other", code_version=None)
    repo.prune(ids["c1"], "keep_last=2", "test")
    return ids


def _damage(repo: Repo, ids: dict[str, str], what: str) -> str:
    """Damage one item; returns the text a message about it must contain."""
    if what == "tag object":
        tag_id = repo.refs.read_raw("refs/tags/v1")
        flip_byte(repo.objects.path(tag_id), 12)
        return "v1"
    if what == "other branch":
        (repo.root / "refs/heads/other").write_text("garbage, not an id\n")
        return "other"
    path = repo.root / "pruned" / ids["c1"]
    os.truncate(path, path.stat().st_size // 2)
    return f"pruned/{ids['c1']}"


KINDS = ["tag object", "other branch", "pruned record"]


@pytest.mark.parametrize("what", KINDS)
def test_listing_and_log_go_on_gc_and_prune_refuse(repo: Repo, history: dict[str, str], what: str) -> None:
    name = _damage(repo, history, what)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = [c.id for c in repo.log("main")]
        branches = repo.branches()
        tags = repo.tags()
    assert log == [history["c3"], history["c2"], history["c1"]]
    assert branches["main"] == history["c3"]
    assert ("other" in branches) == (what != "other branch")
    assert ("v1" in tags) == (what != "tag object")
    assert any(name in str(w.message) for w in caught), [str(w.message) for w in caught]
    with pytest.raises(RepositoryDamagedError, match=name.replace("/", ".")) as err:
        repo.gc()
    assert "delete" in str(err.value)  # the fix is named
    assert any(name in str(f) for f in repo.fsck().errors)
    if what != "pruned record":
        with pytest.raises(RepositoryDamagedError, match=name):
            repo.prune(history["c2"], "keep_last=1")
    assert repo.load("main")["w"].shape == (256,)


@pytest.mark.parametrize("what", KINDS)
def test_cli_log_branch_and_tag_warn_and_succeed(repo: Repo, history: dict[str, str], what: str) -> None:
    name = _damage(repo, history, what)
    runner = CliRunner()
    for args in (["log", "main"], ["branch"], ["tag"]):
        result = runner.invoke(cli, ["--repo", str(repo.root), *args])
        assert result.exit_code == 0, (args, result.output, result.stderr)
        assert "Traceback" not in result.stderr
    log = runner.invoke(cli, ["--repo", str(repo.root), "log", "main"])
    assert history["c3"][:12] in log.stdout
    listing = runner.invoke(cli, ["--repo", str(repo.root), "branch" if what == "other branch" else "tag"])
    if what != "pruned record":
        assert f"warning: {'branch' if what == 'other branch' else 'tag'} {name} is damaged" in listing.stderr
    gc = runner.invoke(cli, ["--repo", str(repo.root), "gc"])
    assert gc.exit_code == 10 and gc.stderr.startswith("error: cannot collect garbage") and name in gc.stderr


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("what", KINDS)
def test_manager_keeps_saving_onto_a_healthy_branch(tmp_path: Path, what: str) -> None:
    root = tmp_path / "store"
    with Repo.init(root) as repo:
        ids = {f"c{i}": repo.commit(_state(i), f"c{i}", code_version=None) for i in (1, 2, 3)}
        repo.tag("v1", ids["c2"], message="release")
        ids["o1"] = repo.commit(_state(9), "o1", branch="other", code_version=None)
        repo.prune(ids["c1"], "keep_last=2", "test")
        name = _damage(repo, ids, what)
    state = {"w": torch.zeros(256)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(str(root), state, keep_last=1, gc_every=1, code_version=None) as manager:
            saved = []
            for step in range(3):
                state["w"].fill_(step)
                saved.append(manager.save(step=step))
    with Repo.open(root) as repo:
        assert [c.id for c in repo.log("main", n=3)] == saved[::-1]
        assert not set(saved) & set(repo._pruned_records()[0])  # retention waited for the fix
        assert repo.load(saved[0])["w"].eq(0).all()
    skipped = [str(w.message) for w in caught if "retention and gc are skipped" in str(w.message)]
    assert skipped and all(name in text for text in skipped), skipped


def test_a_damaged_reflog_line_stops_gc_but_no_save(tmp_path: Path) -> None:
    """gc keeps what unexpired reflog entries name (git's grace): an unparseable line
    could name the only holder of some data, so gc refuses instead of skipping it, while
    a manager's saves go on with its automatic gc skipped and a warning."""
    repo = Repo.init(tmp_path / "store")
    kept = repo.commit(_state(1), "left behind", code_version=None)
    repo.commit(_state(2), "head", code_version=None)
    log = repo.root / "logs" / "refs" / "heads" / "main"
    lines = log.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b" ", b"#", 1)  # the line that created main at `kept`
    log.write_bytes(b"\n".join(lines))
    with pytest.raises(RepositoryDamagedError, match="logs/refs/heads/main"):
        repo.gc(prune_unreachable_after="never")
    assert repo.load(kept)["w"].equal(_state(1)["w"])
    model = torch.nn.Linear(4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(repo, {"model": model}, keep_last=1) as mgr:
            for step in (1, 2, 3):
                assert mgr.save(step) is not None
    assert any("automatic gc skipped" in str(w.message) for w in caught)
    assert len(repo.log("main")) == 5
    repo.close()

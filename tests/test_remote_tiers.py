"""Tier policy in config, gc on a remote (with prune records), and retention across tiers.

Against memory:// (fast logic) and the real SeaweedFS server (``s3_server``). The push/gc
races are forced deterministically through hooks: the test backend's ``before_swap`` (runs
just before a push's ref compare-and-swap) and ``gc_remote(before_delete=...)`` (runs after
gc has read the refs again and chosen what to delete).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptvcs import CheckpointManager, Repo
from ckptvcs.errors import CkptvcsError, CommitPrunedError, InvalidInputError, UsageError
from ckptvcs.remotes import add_remote, archive, clone, push, remove_remote, where
from ckptvcs.remotes.check import check_remote
from ckptvcs.remotes.policy import TierPolicy, clear_policy, get_policy, set_policy
from ckptvcs.remotes.remote_gc import gc_remote, prune_on_remote
from test_remote import Spy, _assert_state, _open, _state


def _remote_keys(url: str, prefix: str) -> set[str]:
    return set(_open(url).list(prefix))


# -- the tier policy in config -------------------------------------------------------------------


def test_tier_policy_round_trips_and_drives_archive(origin: Repo, memory_url: str) -> None:
    ids = [origin.commit(_state(i), f"step {i}") for i in range(4)]
    add_remote(origin, "origin", memory_url)
    with pytest.raises(InvalidInputError):
        set_policy(origin, "origin", 0)
    with pytest.raises(InvalidInputError):
        TierPolicy("origin", 2, prune_remote="yes")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no tier policy"):
        archive(origin)  # neither a policy nor keep_last
    policy = set_policy(origin, "origin", 2)
    with Repo.open(origin.root) as again:  # stored in config.json, read by a fresh handle
        assert get_policy(again) == policy == TierPolicy("origin", 2, False)
        assert "keep the last 2" in where(again).line() and where(again).as_dict()["policy"]["keep_local_last"] == 2
    push(origin, "origin")
    report = archive(origin)  # no arguments: the policy's remote and keep_local_last
    assert set(report.archived) == {ids[0], ids[1]}
    assert where(origin).counts["remote_only"] == 2
    assert archive(origin, keep_last=1).archived == [ids[2]]  # an explicit argument overrides it
    remove_remote(origin, "origin")  # a policy naming a removed remote goes with it
    assert get_policy(origin) is None and not clear_policy(origin)


def test_cli_tier_policy_and_gc_remote(origin: Repo, tmp_path: Path) -> None:
    """The installed command: `remote add --keep-local-last`, `remote -v`, `tier`, `archive`, `gc --remote`."""
    from test_cli import assert_one_line_error, ok, run

    store = str(origin.root)
    folder = str(tmp_path / "remote-folder")
    for i in range(3):
        origin.commit(_state(i), f"step {i}")
    assert_one_line_error(run("--repo", store, "remote", "add", "origin", folder, "--keep-local-last", "0",
                              cwd=tmp_path), 9, "keep_local_last must be a positive integer")
    assert "keep the last 1 (and tagged) local" in ok("--repo", store, "remote", "add", "origin", folder,
                                                      "--keep-local-last", "1", cwd=tmp_path)
    assert "[tier policy: keep the last 1" in ok("--repo", store, "remote", "-v", cwd=tmp_path)
    assert "prune" in ok("--repo", store, "tier", "set", "origin", "--keep-local-last", "2", "--prune-remote",
                         cwd=tmp_path)
    assert "keep the last 2" in ok("--repo", store, "status", cwd=tmp_path)
    ok("--repo", store, "push", cwd=tmp_path)
    assert "archived 1 commit(s)" in ok("--repo", store, "archive", cwd=tmp_path)
    assert "Pruned" in ok("--repo", store, "prune", "--remote", "origin", "HEAD~2", cwd=tmp_path)
    out = ok("--repo", store, "gc", "--remote", "origin", "--grace", "now", cwd=tmp_path)
    assert "live commits (1 pruned)" in out and "deleted 1 packs and 0 objects" in out
    assert ok("--repo", store, "fsck", "--remote", "origin", cwd=tmp_path).strip().endswith(": ok")
    with Repo.open(origin.root) as again:
        assert again.pruned_record(again.resolve("HEAD~2"))["rule"] == "manual"
    assert "tier policy removed" in ok("--repo", store, "tier", "unset", cwd=tmp_path)
    assert_one_line_error(run("--repo", store, "archive", cwd=tmp_path), 9, "no tier policy")


# -- gc on a remote ------------------------------------------------------------------------------


def _drop_remote_branch(url: str, branch: str) -> None:
    backend = _open(url)
    backend.compare_and_swap(f"refs/heads/{branch}", backend.get(f"refs/heads/{branch}"), None)


def test_remote_gc_deletes_unreachable_and_nothing_reachable_s3(origin: Repo, s3_url: str, tmp_path: Path) -> None:
    c1 = origin.commit(_state(1), "one")
    add_remote(origin, "origin", s3_url)
    push(origin, "origin")
    main_packs = _remote_keys(s3_url, "packs")
    origin.branch("scratch", c1)
    origin.checkout("scratch")
    c2 = origin.commit(_state(2), "scratch work")
    push(origin, "origin", ["scratch"])
    scratch_packs = _remote_keys(s3_url, "packs") - main_packs
    assert scratch_packs
    _drop_remote_branch(s3_url, "scratch")  # its data is garbage on the remote now
    young = gc_remote(origin, "origin")  # the default grace (1 day) protects what was just written
    assert young.packs_deleted == [] and young.kept_young > 0
    dry = gc_remote(origin, "origin", grace=0, dry_run=True)
    assert len(dry.packs_deleted) == len(scratch_packs) // 2 and dry.objects_deleted == 2
    assert _remote_keys(s3_url, "packs") >= scratch_packs  # a dry run deletes nothing
    report = gc_remote(origin, "origin", grace=0)
    assert report.bytes_deleted > 0 and report.objects_deleted == 2  # c2 and its manifest
    assert _remote_keys(s3_url, "packs") == main_packs  # exactly the unreachable packs went
    assert not _open(s3_url).size(f"objects/{c2[:2]}/{c2[2:]}")
    assert check_remote(origin, "origin", read_data=True).ok
    copy = clone(s3_url, tmp_path / "copy")
    with copy:
        _assert_state(copy.load("main"), _state(1))


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_push_racing_remote_gc_at_the_swap_repairs_before_it_ends(origin: Repo, where: str,
                                                                  request: pytest.FixtureRequest) -> None:
    """gc (no grace) runs between a push's uploads and its ref swap and deletes the pushed data:
    the push's check after the swap uploads it again, so the ref never ends naming missing data."""
    memory_url = request.getfixturevalue("memory_url" if where == "memory" else "s3_url")
    origin.commit(_state(1), "one")
    add_remote(origin, "origin", memory_url)
    push(origin, "origin")
    c2 = origin.commit(_state(2), "two")
    deleted: list[Any] = []
    spy = Spy(_open(memory_url), before_swap=lambda: deleted.append(gc_remote(None, memory_url, grace=0)))
    report = push(origin, spy)
    assert deleted[0].packs_deleted and deleted[0].objects_deleted == 2  # the race happened
    assert report.updated["refs/heads/main"][1] == c2
    check = check_remote(None, memory_url, read_data=True)
    assert check.ok, check.findings


def test_gc_that_chose_before_a_push_deletes_after_it_keeps_young_data(origin: Repo, memory_url: str) -> None:
    """gc reads the refs, a whole push runs (swap and check), then gc deletes: the grace period
    keeps the push's fresh uploads (this interleaving is what the grace is for)."""
    origin.commit(_state(1), "one")
    add_remote(origin, "origin", memory_url)
    push(origin, "origin")
    c2 = origin.commit(_state(2), "two")
    pushed: list[Any] = []
    report = gc_remote(origin, "origin", grace=3600, before_delete=lambda: pushed.append(push(origin, "origin")))
    assert pushed[0].updated["refs/heads/main"][1] == c2
    assert report.packs_deleted == [] and report.objects_deleted == 0
    assert check_remote(origin, "origin", read_data=True).ok


def test_remote_prune_records_let_gc_reclaim_and_clones_say_pruned(origin: Repo, memory_url: str,
                                                                   tmp_path: Path) -> None:
    ids = [origin.commit(_state(i, n=20000), f"step {i}") for i in range(3)]
    add_remote(origin, "origin", memory_url)
    push(origin, "origin")
    assert prune_on_remote(origin, "origin", [ids[2]], "manual") == []  # a ref tip is never pruned
    assert json.loads(_open(memory_url).get("config.json"))["version"] == 1
    assert prune_on_remote(origin, "origin", [ids[0]], "keep_last=2", "older") == [ids[0]]
    assert json.loads(_open(memory_url).get("config.json"))["version"] == 2  # older ckptvcs refuse it now
    before = gc_remote(origin, "origin", grace=0, dry_run=True)
    assert before.pruned_commits == 1 and before.live_commits == 3
    report = gc_remote(origin, "origin", grace=0)
    assert report.bytes_deleted > 0 and report.objects_deleted == 0  # history stays; data goes
    assert check_remote(origin, "origin", read_data=True).ok
    c4 = origin.commit(_state(3, n=20000), "step 3")
    push(origin, "origin")  # the pruned commit's chunks no longer count as held: sent again if needed
    assert check_remote(origin, "origin", read_data=True).ok
    with clone(memory_url, tmp_path / "copy") as copy:
        assert copy.pruned_record(ids[0])["rule"] == "pruned-on-remote"
        with pytest.raises(CommitPrunedError):
            copy.load(ids[0])
        _assert_state(copy.load(ids[1]), _state(1, n=20000))
        _assert_state(copy.load(c4), _state(3, n=20000))
        assert copy.fsck().ok


# -- the manager: the policy from config, and retention across tiers ------------------------------


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(20000, generator=g)}


def test_manager_applies_the_configured_tier_policy(origin: Repo, memory_url: str) -> None:
    add_remote(origin, "origin", memory_url)
    set_policy(origin, "origin", 2)
    state = {"model": _weights(0)}
    with CheckpointManager(origin, state, remote="origin", code_version=None) as mgr:
        for step in range(1, 5):
            state["model"] = _weights(step)
            mgr.state = {"model": state["model"]}
            mgr.save(step)
        mgr.wait()
    counts = where(origin).counts
    assert counts["remote_only"] == 2 and counts["local_and_remote"] == 2
    with CheckpointManager(origin, {"model": _weights(9)}, remote="origin", keep_local_last=3,
                           code_version=None) as mgr:  # an explicit argument overrides the config
        mgr.save(5)
        mgr.wait()
    assert where(origin).counts["local_and_remote"] == 3
    with pytest.raises(InvalidInputError, match="keep_local_last needs remote"):
        CheckpointManager(origin, {"model": _weights(0)}, keep_local_last=2)


def test_keep_best_counts_archived_checkpoints(origin: Repo, memory_url: str) -> None:
    """An archived best checkpoint stays the best: a worse local one is not kept in its place."""
    add_remote(origin, "origin", memory_url)
    set_policy(origin, "origin", 1, prune_remote=True)
    ids = []
    for run in ([0.1, 0.2], [0.5, 0.6]):  # a resumed run (a new manager) reads the history afresh
        with CheckpointManager(origin, {"model": _weights(0)}, remote="origin", keep_best=1, best_metric="loss",
                               code_version=None) as mgr:
            for loss in run:
                step = len(ids) + 1
                mgr.state = {"model": _weights(step)}
                ids.append(mgr.save(step, {"loss": loss}))
                mgr.wait()
    best, worse, _, newest = ids
    assert origin.pruned_record(best)["rule"] == "archived"  # the best lives on the remote, still kept
    assert origin.pruned_record(worse)["rule"].startswith("keep_best")  # not kept as "best among local"
    assert origin.pruned_record(newest) is None
    assert worse in _open(memory_url).list("pruned") or f"pruned/{worse}" in _remote_keys(memory_url, "pruned")
    with Repo.open(origin.root) as again:
        assert torch.equal(again.load(best)["model"]["w"], _weights(1)["w"])  # fetched back, bit-exact
    gc_remote(origin, "origin", grace=0)
    assert check_remote(origin, "origin").ok


def test_prune_remote_never_prunes_while_the_remote_is_unreachable(origin: Repo, tmp_path: Path) -> None:
    """With prune_remote, the keep policy's drops are pruned only after a successful push: while
    pushes fail, every checkpoint keeps its data locally (the only copy)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")  # a remote "folder" under a file: every push fails
    add_remote(origin, "origin", str(blocker / "remote"))
    set_policy(origin, "origin", 1, prune_remote=True)
    with pytest.warns(RuntimeWarning, match="background push"):
        mgr = CheckpointManager(origin, {"model": _weights(0)}, remote="origin", keep_last=1, code_version=None)
        ids = []
        for step in range(1, 4):
            mgr.state = {"model": _weights(step)}
            ids.append(mgr.save(step))
            mgr.wait()
        assert mgr.remote_error is not None
        with pytest.raises(CkptvcsError):
            mgr.close()  # the last push fails again: raised, not swallowed
    assert all(origin.pruned_record(c) is None for c in ids)
    for step, commit_id in enumerate(ids, start=1):
        assert torch.equal(origin.load(commit_id)["model"]["w"], _weights(step)["w"])

"""History and refs: commits, revisions, branches, tags, checkout, reflog, metadata,
deduplication, diff, and compare-and-swap under concurrent writers."""

from __future__ import annotations

import math
import multiprocessing
import shutil
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch

from ckptvcs import (
    AmbiguousRevisionError,
    CkptvcsError,
    Commit,
    InvalidRefNameError,
    RefConflictError,
    RefExistsError,
    Repo,
    RevisionNotFoundError,
    Tag,
    UnmergedBranchError,
    codec,
    pack,
)
from ckptvcs.objects import canonical_json
from ckptvcs.refs import ZERO_ID
from ckptvcs.store import chunk_hash
from helpers import commit_worker, record_chunk_reads, tree_size

AUTHOR = "Test Author <test@example.com>"


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed author, and a working directory outside any git checkout."""
    monkeypatch.setenv("CKPTVCS_AUTHOR", AUTHOR)
    outside = tmp_path / "cwd"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(outside)


def _state(i: int) -> dict:
    return {"w": torch.full((8,), float(i)), "i": i}


def _history(repo: Repo, n: int) -> list[str]:
    return [repo.commit(_state(i), f"commit {i}") for i in range(n)]


# -- commits and history -------------------------------------------------------------


def test_first_commit_on_unborn_main(repo: Repo) -> None:
    assert repo.head() == ("main", None)
    assert repo.branches() == {}
    with pytest.raises(RevisionNotFoundError, match="no commits yet"):
        repo.resolve("HEAD")
    cid = repo.commit(_state(0), "first")
    assert repo.head() == ("main", cid)
    assert repo.branches() == {"main": cid}
    commit = repo.show()
    assert isinstance(commit, Commit)
    assert commit.id == cid and commit.parents == () and commit.message == "first"
    assert commit.author == AUTHOR
    assert commit.time.endswith("Z")
    assert commit.stats["tensors"] == 1


def test_parents_log_order_and_n(repo: Repo) -> None:
    ids = _history(repo, 4)
    for parent, child in zip(ids, ids[1:]):
        assert repo.show(child).parents == (parent,)
    assert [c.id for c in repo.log()] == ids[::-1]
    assert [c.id for c in repo.log(n=2)] == ids[:1:-1]
    assert [c.id for c in repo.log(ids[1])] == [ids[1], ids[0]]
    assert [c.message for c in repo.log("main", n=1)] == ["commit 3"]
    assert repo.log(n=0) == []


def test_show_returns_the_commit_record(repo: Repo) -> None:
    cid = repo.commit(_state(1), "msg\nbody", step=7)
    commit = repo.show(cid)
    assert commit == repo.show("HEAD") == repo.show("main")
    assert commit.message == "msg\nbody" and commit.step == 7
    assert repo.objects.kind(commit.manifest) == "manifest"
    assert repo.manifest(cid).id == commit.manifest


def test_resolve_ids_prefixes_and_names(repo: Repo) -> None:
    ids = _history(repo, 3)
    tip = ids[-1]
    assert repo.resolve(tip) == tip
    assert repo.resolve(tip[:4]) == tip
    assert repo.resolve(tip[:12]) == tip
    assert repo.resolve(f"  {tip[:10]} ") == tip
    assert repo.resolve("main") == tip
    assert repo.resolve("HEAD") == tip
    assert repo.resolve("refs/heads/main") == tip
    unknown = next(p for p in (f"{i:06x}" for i in range(1 << 24)) if not any(x.startswith(p) for x in repo.objects))
    with pytest.raises(RevisionNotFoundError):
        repo.resolve(unknown)
    for bad in ("nope", "", "   ", "main~x", "refs/heads/../HEAD", "0" * 64):
        with pytest.raises(RevisionNotFoundError):
            repo.resolve(bad)
    manifest = repo.show(tip).manifest
    with pytest.raises(RevisionNotFoundError):
        repo.resolve(manifest)  # an object, but not a commit


def test_ambiguous_prefix(repo: Repo) -> None:
    cid = repo.commit(_state(0))
    # Search for a tag object whose id shares the commit's first 4 hex digits.
    for i in range(2_000_000):
        body = {"object": cid, "name": f"t{i}", "message": "", "tagger": AUTHOR, "time": "2024-01-01T00:00:00.000000Z"}
        oid = blake3.blake3(b"tag\n" + canonical_json(body)).hexdigest()
        if oid[:4] == cid[:4]:
            break
    else:  # pragma: no cover - probability about e^-30
        pytest.fail("no colliding prefix found")
    assert repo.objects.put("tag", body) == oid
    with pytest.raises(AmbiguousRevisionError) as err:
        repo.resolve(cid[:4])
    assert isinstance(err.value, RevisionNotFoundError)
    assert cid[:12] in str(err.value) and oid[:12] in str(err.value)
    distinct = next(n for n in range(5, 64) if cid[:n] != oid[:n])
    assert repo.resolve(cid[:distinct]) == cid
    assert repo.resolve(oid[:distinct]) == cid  # a tag id peels to its commit


def test_ancestry_suffixes(repo: Repo) -> None:
    ids = _history(repo, 4)
    assert repo.resolve("HEAD~0") == ids[3]
    assert repo.resolve("HEAD~") == ids[2]
    assert repo.resolve("HEAD~1") == ids[2]
    assert repo.resolve("HEAD~3") == ids[0]
    assert repo.resolve("main~2") == ids[1]
    assert repo.resolve(f"{ids[3][:8]}~1") == ids[2]
    assert repo.resolve("HEAD^") == ids[2]
    assert repo.resolve("HEAD^1") == ids[2]
    assert repo.resolve("HEAD^0") == ids[3]
    assert repo.resolve("HEAD~1^") == ids[1]
    assert repo.resolve("HEAD^^^") == ids[0]
    with pytest.raises(RevisionNotFoundError, match="not that deep"):
        repo.resolve("HEAD~4")
    with pytest.raises(RevisionNotFoundError, match="no parent 2"):
        repo.resolve("HEAD^2")
    with pytest.raises(RevisionNotFoundError):
        repo.resolve(f"{ids[0]}^")


# -- branches ------------------------------------------------------------------------------


def test_branches_create_move_delete(repo: Repo) -> None:
    c0, c1 = _history(repo, 2)
    assert repo.branch("dev") == c1
    assert repo.branch("old", c0) == c0
    assert repo.branches() == {"main": c1, "dev": c1, "old": c0}
    with pytest.raises(RefExistsError):
        repo.branch("dev", c0)
    assert repo.resolve("dev") == c1
    assert repo.branch("dev", c0, force=True) == c0
    assert repo.resolve("dev") == c0
    with pytest.raises(CkptvcsError, match="HEAD is on it"):
        repo.delete_branch("main")
    assert repo.resolve("main") == c1
    repo.delete_branch("dev")
    assert "dev" not in repo.branches()
    with pytest.raises(RevisionNotFoundError):
        repo.resolve("dev")
    with pytest.raises(RevisionNotFoundError):
        repo.delete_branch("dev")
    repo.show(c0)  # commits stay
    with pytest.raises(RevisionNotFoundError):
        repo.branch("x", "nope")
    assert "x" not in repo.branches()


def test_nested_branch_names_and_path_conflicts(repo: Repo) -> None:
    cid = repo.commit(_state(0))
    repo.branch("feature/one")
    assert repo.branches()["feature/one"] == cid
    assert repo.resolve("feature/one") == cid
    with pytest.raises(RefExistsError):
        repo.branch("feature")  # "feature/" is a folder of refs
    repo.branch("a")
    with pytest.raises(RefExistsError):
        repo.branch("a/b")
    with pytest.raises(RefExistsError):
        repo.commit(_state(1), branch="a/b")
    repo.tag("a")  # tags live apart from branches: this name is free
    with pytest.raises(RefExistsError):
        repo.tag("a/b")
    assert set(repo.branches()) == {"main", "feature/one", "a"}
    assert set(repo.tags()) == {"a"}


BAD_REF_NAMES = ["a..b", "-x", "x.lock", "a b", "", "a~1", "a^", "a:b", "a//b", "/a", "a/", ".a", "a/.b", "HEAD", "@",
                 "a@{1}", "a\\b", "x" * 201]


@pytest.mark.parametrize("name", BAD_REF_NAMES)
def test_invalid_ref_names(repo: Repo, name: str) -> None:
    cid = repo.commit(_state(0))
    with pytest.raises(InvalidRefNameError):
        repo.branch(name)
    with pytest.raises(InvalidRefNameError):
        repo.tag(name)
    with pytest.raises(InvalidRefNameError):
        repo.commit(_state(1), branch=name)
    assert repo.branches() == {"main": cid}
    assert repo.tags() == {}
    assert repo.resolve("HEAD") == cid


# -- tags --------------------------------------------------------------------------------


def test_annotated_tags_never_move_unless_forced(repo: Repo) -> None:
    c0, c1 = _history(repo, 2)
    assert repo.tag("v1", c0, message="first release") == c0
    tags = repo.tags()
    assert list(tags) == ["v1"]
    tag = tags["v1"]
    assert isinstance(tag, Tag)
    assert (tag.object, tag.name, tag.message, tag.tagger) == (c0, "v1", "first release", AUTHOR)
    assert tag.time.endswith("Z") and tag.id and repo.objects.kind(tag.id) == "tag"
    assert repo.resolve("v1") == c0
    assert repo.resolve("refs/tags/v1") == c0
    assert repo.resolve("v1~0") == c0
    with pytest.raises(RefExistsError, match="never move"):
        repo.tag("v1", c1)
    with pytest.raises(RefExistsError):
        repo.tag("v1", c0)  # even to the same commit
    assert repo.resolve("v1") == c0
    assert repo.tag("v1", c1, message="moved", force=True) == c1
    assert repo.resolve("v1") == c1
    assert repo.tags()["v1"].message == "moved"
    repo.tag("v2")
    assert repo.tags()["v2"].object == c1 and repo.tags()["v2"].message == ""
    repo.delete_tag("v1")
    assert list(repo.tags()) == ["v2"]
    with pytest.raises(RevisionNotFoundError):
        repo.delete_tag("v1")
    with pytest.raises(RevisionNotFoundError):
        repo.tag("v3", "nope")


# -- checkout and where commits go ------------------------------------------------------------


def test_checkout_branch_is_symbolic_and_commit_id_detaches(repo: Repo) -> None:
    c0, c1 = _history(repo, 2)
    repo.branch("dev", c0)
    assert repo.checkout("dev") == c0
    assert repo.head() == ("dev", c0)
    assert (repo.root / "HEAD").read_text().strip() == "ref: refs/heads/dev"
    c2 = repo.commit(_state(2), "on dev")
    assert repo.branches() == {"main": c1, "dev": c2}
    assert repo.show(c2).parents == (c0,)

    assert repo.checkout(c1) == c1
    assert repo.head() == (None, c1)
    c3 = repo.commit(_state(3), "detached")
    assert repo.head() == (None, c3)
    assert repo.show(c3).parents == (c1,)
    assert repo.branches() == {"main": c1, "dev": c2}  # no branch moved

    repo.tag("t", c0)
    assert repo.checkout("t") == c0
    assert repo.head() == (None, c0)  # a tag is not a branch: detached
    assert repo.checkout("main~1") == c0
    assert repo.head() == (None, c0)
    assert repo.checkout("main") == c1
    assert repo.head() == ("main", c1)
    with pytest.raises(RevisionNotFoundError):
        repo.checkout("nope")
    assert repo.head() == ("main", c1)


def test_commit_to_named_branch_does_not_move_head(repo: Repo) -> None:
    c0 = repo.commit(_state(0))
    x1 = repo.commit(_state(1), "to x", branch="x")
    assert repo.head() == ("main", c0)
    assert repo.branches() == {"main": c0, "x": x1}
    assert repo.show(x1).parents == (c0,)  # a new branch starts at HEAD
    x2 = repo.commit(_state(2), branch="x")
    assert repo.show(x2).parents == (x1,)
    assert repo.head() == ("main", c0)
    m1 = repo.commit(_state(3), branch="main")  # the branch HEAD is on: HEAD follows
    assert repo.head() == ("main", m1)
    assert repo.reflog("HEAD")[0].new == m1


def test_delete_branch_refuses_a_branch_no_other_ref_contains(repo: Repo) -> None:
    c0, _ = _history(repo, 2)
    own = repo.commit(_state(5), "only on exp", branch="exp")
    with pytest.raises(UnmergedBranchError, match="-D") as err:
        repo.delete_branch("exp")
    assert err.value.exit_code == 6 and err.value.commit_id == own
    assert repo.branches()["exp"] == own  # nothing deleted
    repo.tag("keep", own)
    repo.delete_branch("exp")  # a tag contains it now
    repo.branch("old", c0)
    repo.delete_branch("old")  # main contains it
    repo.commit(_state(6), "only on exp2", branch="exp2")
    repo.checkout("exp2")
    repo.checkout(repo.resolve("HEAD"))  # a detached HEAD is a ref too
    repo.delete_branch("exp2")
    repo.checkout("main")
    lone = repo.commit(_state(7), "only on exp3", branch="exp3")
    repo.delete_branch("exp3", force=True)
    assert "exp3" not in repo.branches()
    # its tip stays named by the deleted branch's reflog, so gc's grace covers it
    assert repo.reflog("exp3")[0].old == lone and lone in repo.live_commits()


def test_a_deleted_branchs_reflog_outlives_it_without_blocking_new_names(repo: Repo) -> None:
    c0, c1 = _history(repo, 2)
    repo.branch("a", c0)
    repo.delete_branch("a")
    assert repo.branch("a/b") == c1  # its log needs logs/refs/heads/a/ where a's log was
    repo.commit(_state(9), "on a/b", branch="a/b")
    assert [e.new for e in repo.reflog("a/b")][-1] == c1
    aside = repo.refs.logged_refs()
    assert any(name.startswith("deleted/") for name in aside)
    assert c0 in {e.old for name in aside if name.startswith("deleted/") for e in repo.refs.reflog(name)}


def test_commits_not_on_refs_lists_what_a_detached_head_alone_holds(repo: Repo) -> None:
    c0, c1 = _history(repo, 2)
    repo.checkout(c0)
    assert repo.commits_not_on_refs() == []
    d1 = repo.commit(_state(3), "d1")
    d2 = repo.commit(_state(4), "d2")
    assert [c.id for c in repo.commits_not_on_refs()] == [d2, d1]
    repo.tag("t", d1)
    assert [c.id for c in repo.commits_not_on_refs()] == [d2]
    assert repo.commits_not_on_refs("main") == []


def test_commit_on_new_branch_from_unborn_head(repo: Repo) -> None:
    cid = repo.commit(_state(0), branch="side")
    assert repo.show(cid).parents == ()
    assert repo.head() == ("main", None)
    assert repo.branches() == {"side": cid}


def test_reflog_records_commits_and_checkouts(repo: Repo) -> None:
    c0, c1 = _history(repo, 2)
    main_log = repo.reflog("main")
    assert [(e.old, e.new) for e in main_log] == [(c0, c1), (ZERO_ID, c0)]
    assert [e.message for e in main_log] == ["commit: commit 1", "commit: commit 0"]
    assert all(e.who == AUTHOR and e.ref == "refs/heads/main" for e in main_log)
    assert main_log[0].time_ns >= main_log[1].time_ns
    assert repo.reflog("refs/heads/main") == main_log
    repo.checkout(c0)
    c2 = repo.commit(_state(2), "detached work")
    repo.checkout("main")
    head_log = repo.reflog("HEAD")
    assert [(e.old, e.new, e.message) for e in head_log[:3]] == [
        (c2, c1, "checkout: moving to main"),
        (c0, c2, "commit: detached work"),
        (c1, c0, f"checkout: moving to {c0}"),
    ]
    assert [e.new for e in head_log[3:]] == [c1, c0]
    assert repo.reflog("main") == main_log  # checkouts do not touch the branch's log
    repo.branch("dev")
    repo.delete_branch("dev")
    assert [(e.old, e.new) for e in repo.reflog("dev")] == [(c1, ZERO_ID), (ZERO_ID, c1)]


# -- metadata --------------------------------------------------------------------------------


def test_commit_metadata(repo: Repo) -> None:
    config = {"lr": 3e-4, "layers": [4, 8], "name": "run-1", "nested": {"flag": True, "none": None}}
    cid = repo.commit(
        _state(0), "with metadata", step=1200, epoch=np.int64(3), config=config, data_version="ds@v3",
        metrics={
            "loss": 0.25, "nan_metric": float("nan"), "inf": math.inf, "t": torch.tensor(1.5), "np": np.float32(2.0), "int": 7,
        },
        code_version={"git_commit": "abc123", "dirty": True}, author="Someone Else",
    )
    c = repo.show(cid)
    assert (c.step, c.epoch, c.data_version, c.author) == (1200, 3, "ds@v3", "Someone Else")
    assert type(c.epoch) is int
    assert c.config == config
    assert c.metrics["loss"] == 0.25 and math.isnan(c.metrics["nan_metric"]) and c.metrics["inf"] == math.inf
    assert c.metrics["t"] == 1.5 and c.metrics["np"] == 2.0 and c.metrics["int"] == 7.0
    assert all(type(v) is float for v in c.metrics.values())
    assert c.code_version == {"git_commit": "abc123", "dirty": True}
    env = c.environment
    assert {"python", "torch", "numpy", "ckptvcs", "platform", "hostname", "devices"} <= set(env)
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert isinstance(env["devices"], list) and env["devices"]

    plain = repo.show(repo.commit(_state(1), code_version=None))
    assert (plain.step, plain.epoch, plain.metrics, plain.config, plain.data_version, plain.code_version) == (
        None, None, {}, None, None, None,
    )


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )
    return done.stdout.strip()


def test_code_version_captured_from_git_checkout(repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert repo.show(repo.commit(_state(0))).code_version is None  # cwd is no checkout

    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q")
    (project / "train.py").write_text("print('hi')\n")
    _git(project, "add", "train.py")
    _git(project, "commit", "-q", "-m", "init")
    head = _git(project, "rev-parse", "HEAD")
    monkeypatch.chdir(project)

    clean = repo.show(repo.commit(_state(1))).code_version
    assert clean is not None
    assert clean["git_commit"] == head and clean["dirty"] is False
    (project / "train.py").write_text("print('changed')\n")
    dirty = repo.show(repo.commit(_state(2))).code_version
    assert dirty["git_commit"] == head and dirty["dirty"] is True
    assert repo.show(repo.commit(_state(3), code_version=None)).code_version is None


# -- storage: dedup ----------------------------------------------------------------------------


def _store_bytes(repo: Repo) -> int:
    return tree_size(repo.root) - (repo.root / "index" / "lock.mdb").stat().st_size


def _big_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(512 * 1024, generator=gen) for i in range(4)}  # 4 x 2 MiB


def test_committing_the_same_state_again_stores_almost_nothing(repo: Repo) -> None:
    state = _big_state()
    nbytes = sum(t.nbytes for t in state.values())
    assert nbytes >= 8 << 20
    repo.commit(state, "one")
    before = _store_bytes(repo)
    chunks_before = repo.stats().chunks
    repo.commit(state, "two")
    growth = _store_bytes(repo) - before
    assert growth < 0.01 * nbytes
    assert repo.show().stats["new_chunks"] == 0 and repo.show().stats["new_stored_bytes"] == 0
    assert repo.stats().chunks == chunks_before
    assert repo.show().manifest == repo.show("HEAD~1").manifest


def test_changing_one_tensor_stores_only_its_chunks(repo: Repo) -> None:
    state = _big_state()
    repo.commit(state)
    stats_before = repo.stats()
    changed = torch.randn(512 * 1024, generator=torch.Generator().manual_seed(99))
    state2 = {**state, "t2": changed}
    repo.commit(state2)
    commit_stats = repo.show().stats
    raw = memoryview(changed.numpy()).cast("B")
    chunks = [raw[s : s + repo.chunk_size] for s in range(0, len(raw), repo.chunk_size)]
    old = memoryview(state["t2"].numpy()).cast("B")
    bases = [old[s : s + repo.chunk_size] for s in range(0, len(old), repo.chunk_size)]
    assert len(chunks) == 2
    # Each new chunk is coded as the smaller of byte planes and an XOR delta against the
    # chunk at the same offset of the parent's t2.
    encodings = [
        codec.encode(c, chunk_hash(c), layout=4, base=(chunk_hash(b), b)) for c, b in zip(chunks, bases)
    ]
    compressed = sum(len(e.payload) for e in encodings)
    assert commit_stats["new_chunks"] == len(chunks)
    assert commit_stats["new_stored_bytes"] == compressed
    assert commit_stats["logical_bytes"] == 8 << 20
    stats_after = repo.stats()
    assert stats_after.chunks == stats_before.chunks + len(chunks)
    base_ids = 32 * sum(e.base is not None for e in encodings)
    pack_overhead = pack._PACK_HEADER.size + len(chunks) * pack.ENTRY_HEADER_SIZE + base_ids + pack._FOOTER.size
    assert stats_after.pack_bytes - stats_before.pack_bytes == compressed + pack_overhead

    # Changing one element touches one chunk only.
    state3 = {**state2, "t0": state["t0"].clone()}
    state3["t0"][-1] += 1.0
    repo.commit(state3)
    assert repo.show().stats["new_chunks"] == 1
    assert repo.stats().chunks == stats_after.chunks + 1


# -- diff -------------------------------------------------------------------------------------


def test_diff_reports_tensor_and_value_changes(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 25, generator=gen)
    same = torch.randn(300, generator=gen)
    a = repo.commit(
        {"model": {"w": w, "same": same, "gone": torch.zeros(3)}, "step": 1, "arr": np.arange(4), "lr": 0.1}
    )
    w2 = w.clone()
    flat = w2.view(-1)
    flat[::4] += torch.arange(250, dtype=torch.float32) / 100 + 0.5  # exactly 25% of elements
    arr2 = np.arange(4)
    arr2[1] = 10
    b = repo.commit(
        {"model": {"w": w2, "same": same, "new": torch.ones(2, 2, dtype=torch.int8)}, "step": 2, "arr": arr2, "lr": 0.1}
    )

    read = record_chunk_reads(monkeypatch, repo)
    entries = {e.path: e for e in repo.diff(a, b)}
    assert set(entries) == {"model/w", "model/gone", "model/new", "arr", "step"}
    w_entry = entries["model/w"]
    assert (w_entry.kind, w_entry.status) == ("tensor", "changed")
    assert w_entry.fraction_changed == 0.25
    assert w_entry.max_abs_diff == pytest.approx(2.49 + 0.5, abs=1e-5)
    assert (entries["model/gone"].status, entries["model/new"].status) == ("removed", "added")
    assert entries["arr"].status == "changed" and entries["arr"].fraction_changed == 0.25
    assert entries["arr"].max_abs_diff == 9.0
    step = entries["step"]
    assert (step.kind, step.status, step.old, step.new) == ("value", "changed", 1, 2)
    same_blobs = [blob for blob in repo.manifest(a).blobs if blob["nbytes"] == same.nbytes]
    same_chunks = {bytes.fromhex(c) for blob in same_blobs for c in blob["chunks"]}
    assert same_chunks and not same_chunks & set(read)  # identical tensors are not even read

    assert repo.diff(a, a) == []
    reverse = {e.path: e.status for e in repo.diff(b, a)}
    assert reverse["model/gone"] == "added" and reverse["model/new"] == "removed"


def test_diff_dtype_or_shape_change(repo: Repo) -> None:
    a = repo.commit({"x": torch.zeros(4), "y": torch.zeros(4)})
    b = repo.commit({"x": torch.zeros(4, dtype=torch.float64), "y": torch.zeros(2, 2)})
    entries = {e.path: e for e in repo.diff(a, b)}
    assert entries["x"].status == "changed" and "float64" in entries["x"].detail
    assert entries["y"].status == "changed" and "[2, 2]" in entries["y"].detail
    assert entries["x"].fraction_changed is None


# -- compare-and-swap -------------------------------------------------------------------------


def test_ref_race_raises_conflict_and_keeps_other_writer(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    base = repo.commit(_state(0), "base")
    other = Repo.open(repo.root)
    winner: list[str] = []
    original = repo.refs.set_if_equals

    def racing(ref, expected, new, **kwargs):  # type: ignore[no-untyped-def]
        if not winner:  # another writer commits between our read of the ref and our update
            winner.append(other.commit(_state(1), "other writer"))
        return original(ref, expected, new, **kwargs)

    try:
        monkeypatch.setattr(repo.refs, "set_if_equals", racing)
        with pytest.raises(RefConflictError, match="refs/heads/main"):
            repo.commit(_state(2), "loser")
        assert repo.resolve("main") == winner[0]
        assert repo.show("main").parents == (base,)
        assert [e.new for e in repo.reflog("main")] == [winner[0], base]
        retry = repo.commit(_state(2), "retry")
        assert repo.show(retry).parents == (winner[0],)
        assert repo.resolve("main") == retry
    finally:
        other.close()


def test_stale_commit_target_raises_conflict(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    base = repo.commit(_state(0))
    moved = repo.commit(_state(1))
    monkeypatch.setattr(repo, "_commit_target", lambda branch: ("refs/heads/main", base, base))
    with pytest.raises(RefConflictError):
        repo.commit(_state(2))
    assert repo.resolve("main") == moved
    monkeypatch.undo()
    assert repo.show(repo.commit(_state(2))).parents == (moved,)


def test_branch_creation_race(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo.commit(_state(0))
    other = Repo.open(repo.root)
    original = repo.refs.set_if_equals
    created: list[str] = []

    def racing(ref, expected, new, **kwargs):  # type: ignore[no-untyped-def]
        if ref == "refs/heads/x" and not created:
            created.append(other.commit(_state(1), branch="x"))
        return original(ref, expected, new, **kwargs)

    try:
        monkeypatch.setattr(repo.refs, "set_if_equals", racing)
        with pytest.raises(RefConflictError):
            repo.commit(_state(2), branch="x")
        assert repo.resolve("x") == created[0]
    finally:
        other.close()


def test_concurrent_writers_lose_no_update(repo: Repo) -> None:
    root = repo.commit(_state(0), "root")
    workers, per_worker = 4, 5
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=commit_worker, args=(str(repo.root), w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * workers

    # Walk the first-parent chain of the shared branch.
    chain = []
    cid: str | None = repo.resolve("shared")
    while cid != root:
        commit = repo.show(cid)
        chain.append(commit)
        cid = commit.parents[0]
    messages = [c.message for c in reversed(chain)]
    expected = {f"shared {w}-{j}" for w in range(workers) for j in range(per_worker)}
    assert len(messages) == len(expected) and set(messages) == expected  # each exactly once
    for w in range(workers):  # each writer's commits appear in its own order
        mine = [m for m in messages if m.startswith(f"shared {w}-")]
        assert mine == [f"shared {w}-{j}" for j in range(per_worker)]
    assert len(repo.reflog("shared")) == workers * per_worker
    assert {e.new for e in repo.reflog("shared")} == {c.id for c in chain}

    for w in range(workers):
        own = repo.log(f"worker-{w}")
        assert [c.message for c in own if c.message.startswith("own")] == [
            f"own {w}-{j}" for j in reversed(range(per_worker))
        ]
        state = repo.load(f"worker-{w}")
        assert state["worker"] == w and state["j"] == per_worker - 1
        assert torch.equal(state["w"], torch.full((256,), float(w * 100 + per_worker - 1)))
    assert repo.head() == ("main", root)
    report = repo.fsck(read_data=True)  # the losers' retried commits left garbage at most
    assert report.ok, [str(f) for f in report.errors]


# -- creation and opening (issue 10, point 7) ------------------------------------------


@pytest.mark.parametrize("url", ["s3://bucket/x", "gs://b/ckpt", "file:///tmp/x", "https://host/repo"])
def test_urls_are_refused_until_remotes_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from ckptvcs.errors import InvalidInputError

    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for attempt in (lambda: Repo.init(url), lambda: Repo.init(Path(url)), lambda: Repo.open(url)):
        with pytest.raises(InvalidInputError, match="URL"):
            attempt()
    assert sorted(tmp_path.rglob("*")) == before  # no directory named "s3:" (or anything else)


def test_init_that_loses_the_race_says_already_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process publishes a repository between our check and our rename."""
    import ckptvcs._fs as fs
    from ckptvcs.errors import RepositoryExistsError

    target = tmp_path / "r"
    real = fs.durable_rename
    winner: list[str] = []

    def other_process_wins(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst) == target and not winner:
            monkeypatch.setattr(fs, "durable_rename", real)
            with Repo.init(target) as other:
                winner.append(other.config["id"])
        return real(src, dst)

    monkeypatch.setattr(fs, "durable_rename", other_process_wins)
    with pytest.raises(RepositoryExistsError, match="already exists"):
        Repo.init(target)
    with Repo.open(target) as repo:
        assert repo.config["id"] == winner[0]
    assert not [p.name for p in tmp_path.iterdir() if ".r.init-" in p.name]  # our staging directory is gone


@pytest.mark.parametrize("lost", ["index directory", "data file"])
def test_a_missing_index_is_rebuilt_on_open(tmp_path: Path, lost: str) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.randn(10_000), "n": np.arange(3)}, code_version=None)
        expected = repo.load()
    if lost == "index directory":
        shutil.rmtree(tmp_path / "r" / "index")  # e.g. a copy that left out derived data
    else:
        (tmp_path / "r" / "index" / "data.mdb").unlink()
    with Repo.open(tmp_path / "r") as repo:
        assert torch.equal(repo.load()["w"], expected["w"])
        assert repo.fsck(read_data=True).ok


def test_an_index_that_cannot_be_rebuilt_is_named_with_the_cure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptvcs.repo as repo_module
    from ckptvcs.errors import LockTimeoutError, StorageError

    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.randn(10_000)}, code_version=None)
    shutil.rmtree(tmp_path / "r" / "index")

    def busy(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise LockTimeoutError("could not take the exclusive repository lock")

    monkeypatch.setattr(repo_module, "rebuild_index", busy)
    with pytest.raises(StorageError, match=r"chunk index .* is missing .* `ckptvcs repair index`"):
        Repo.open(tmp_path / "r")


def test_deleting_a_nested_branch_frees_its_folder_for_a_branch_of_that_name(repo: Repo) -> None:
    """As in git: deleting ``x/y`` removes the folder ``refs/heads/x/`` it leaves empty, so a
    branch ``x`` can be created afterwards (also where an older ckptvcs left the folder)."""
    c1 = repo.commit({"w": torch.zeros(4)}, "c1", code_version=None)
    repo.branch("x/y", c1)
    repo.delete_branch("x/y")
    assert not (repo.root / "refs" / "heads" / "x").exists()
    assert repo.branch("x", c1) == c1
    (repo.root / "refs" / "heads" / "z").mkdir()  # what an older version left behind
    assert repo.branch("z", c1) == c1
    assert set(repo.branches()) == {"main", "x", "z"}


def test_a_copy_without_its_empty_folders_still_takes_commits(tmp_path: Path) -> None:
    """git and some archivers keep no empty folder: a store copied without ``tmp/`` (and, while
    it held no pack, ``packs/``) must still take commits, not fail creating a pack."""
    repo = Repo.init(tmp_path / "store")
    repo.close()
    for name in ("tmp", "packs"):
        (tmp_path / "store" / name).rmdir()
    with Repo.open(tmp_path / "store") as repo:
        cid = repo.commit({"w": torch.arange(10.0)}, "after the copy", code_version=None)
        assert repo.load(cid)["w"].equal(torch.arange(10.0))
        assert repo.fsck().ok

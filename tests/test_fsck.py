"""fsck and repair: bit rot in packs, index and objects is named exactly; the index is
rebuilt from the packs; garbage of interrupted commits is reported but is no error."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptvcs._fs
import ckptvcs.fsck
from ckptvcs import IntegrityError, RefConflictError, Repo, StorageError
from ckptvcs.cli import cli
from ckptvcs.fsck import ERROR_KINDS, FsckReport
from ckptvcs.pack import PackEntry
from ckptvcs.state import iter_tensors
from helpers import flip_byte


@dataclasses.dataclass
class Damaged:
    """A repository with three commits; ``target`` holds tensor model/x whose first chunk
    sits alone in its own pack, so damage to it affects exactly that tensor and commit."""

    repo: Repo
    target: str  # on main
    other: str  # on branch other: shares no chunk with target
    tagged: str  # tagged v1, parent of target
    entry: PackEntry  # model/x's first chunk in target

    @property
    def chunk(self) -> str:
        return self.entry.chunk_id.hex()

    @property
    def pack_path(self) -> Path:
        return self.repo.chunks.packs.path(self.entry.pack)


@pytest.fixture
def damaged(small_repo: Repo) -> Damaged:
    repo = small_repo
    gen = torch.Generator().manual_seed(0)
    tagged = repo.commit({"a": torch.randn(3000, generator=gen)}, "tagged", code_version=None)
    repo.tag("v1", message="release")
    target = repo.commit({"model": {"x": torch.randn(5000, generator=gen)}, "y": torch.randn(5000, generator=gen)},
                         "target", code_version=None)
    other = repo.commit({"z": torch.randn(2000, generator=gen)}, "other", branch="other", code_version=None)
    manifest = repo.manifest(target)
    blob = next(body["blob"] for path, _, body in iter_tensors(manifest.root) if path == "model/x")
    entry = repo.chunks.index.get(bytes.fromhex(manifest.blobs[blob]["chunks"][0]))
    assert entry is not None
    return Damaged(repo, target, other, tagged, entry)


def assert_clean(repo: Repo, read_data: bool = True) -> FsckReport:
    report = repo.fsck(read_data=read_data)
    assert report.ok, [str(f) for f in report.errors]
    return report


# -- a healthy repository -------------------------------------------------------------------------


def test_clean_repository_has_no_findings(damaged: Damaged) -> None:
    report = assert_clean(damaged.repo)
    assert report.findings == []
    assert report.commits == 3 and report.refs == 4  # HEAD, main, other, v1
    assert report.chunks > 0 and report.bytes_read > 0 and report.packs == 3
    assert "0 problem(s)" in report.summary()


def test_progress_reports_each_phase(damaged: Damaged) -> None:
    seen: dict[str, list[tuple[int, int]]] = {}
    damaged.repo.fsck(read_data=True, progress=lambda phase, done, total: seen.setdefault(phase, []).append((done, total)))
    assert set(seen) == {"packs", "commits", "data"}
    done, total = seen["data"][-1]
    assert done == total > 0
    assert seen["packs"][-1] == (3, 3)


# -- packs ---------------------------------------------------------------------------------------


def test_flipped_payload_byte_is_found_by_read_data_only(damaged: Damaged) -> None:
    repo = damaged.repo
    flip_byte(damaged.pack_path, damaged.entry.offset + damaged.entry.stored_len // 2)
    assert repo.fsck().ok  # structure and connectivity are intact; only the bytes rotted
    [finding] = repo.fsck(read_data=True).errors
    assert finding.kind == "hash-mismatch"
    assert finding.objects == (damaged.chunk, damaged.entry.pack)
    assert finding.commits == (damaged.target,)
    assert finding.tensors == ("model/x",)
    assert finding.refs == ("HEAD", "refs/heads/main", "refs/heads/other")  # other branched off target
    assert f"tensor model/x of commit {damaged.target[:12]}" in finding.message
    with pytest.raises(IntegrityError, match=f"tensor model/x of commit {damaged.target[:12]}"):
        repo.load(damaged.target)
    assert repo.load(damaged.target, keys=["y"])["y"].shape == (5000,)  # unaffected parts still load
    assert repo.load(damaged.other)["z"].shape == (2000,)
    assert repo.load("v1")["a"].shape == (3000,)


def test_flipped_entry_header_byte(damaged: Damaged) -> None:
    repo = damaged.repo
    flip_byte(damaged.pack_path, damaged.entry.offset - 10)  # inside the chunk id of the entry header
    found = repo.fsck().errors
    kinds = sorted(f.kind for f in found)
    assert kinds == ["corrupt", "index-mismatch"]
    corrupt = next(f for f in found if f.kind == "corrupt")
    assert corrupt.objects == (damaged.entry.pack,) and "do not match its footer" in corrupt.message
    mismatch = next(f for f in found if f.kind == "index-mismatch")
    assert mismatch.objects == (damaged.chunk, damaged.entry.pack)
    assert mismatch.commits == (damaged.target,) and mismatch.tensors == ("model/x",)
    with pytest.raises(IntegrityError, match="model/x"):
        repo.load(damaged.target)
    assert repo.load(damaged.other)["z"].shape == (2000,)


def test_truncated_pack(damaged: Damaged) -> None:
    repo = damaged.repo
    os.truncate(damaged.pack_path, damaged.entry.offset + 10)
    found = repo.fsck().errors
    corrupt = [f for f in found if f.kind == "corrupt"]
    assert [f.objects for f in corrupt] == [(damaged.entry.pack,)]
    lost = [f for f in found if f.kind == "missing"]
    assert lost and all(f.commits == (damaged.target,) for f in lost)
    assert damaged.chunk in {f.objects[0] for f in lost}
    assert {t for f in lost for t in f.tensors} <= {"model/x", "y"}
    with pytest.raises(IntegrityError, match=damaged.target[:12]):
        repo.load(damaged.target)
    assert repo.load(damaged.other)["z"].shape == (2000,)


def test_deleted_pack(damaged: Damaged) -> None:
    repo = damaged.repo
    damaged.pack_path.unlink()
    [finding] = repo.fsck().errors
    assert finding.kind == "missing"
    assert finding.objects[0] == damaged.entry.pack and damaged.chunk in finding.objects
    assert finding.commits and set(finding.commits) == {damaged.target}
    assert "model/x" in finding.tensors
    assert f"pack {damaged.entry.pack} is missing" in finding.message
    with pytest.raises(IntegrityError, match=f"commit {damaged.target[:12]}"):
        repo.load(damaged.target)
    assert repo.load(damaged.other)["z"].shape == (2000,)


# -- index -------------------------------------------------------------------------------------------


def _edit_index(repo: Repo, edit) -> None:  # type: ignore[no-untyped-def]
    index = repo.chunks.index
    with index._env.begin(db=index._db, write=True) as txn:
        edit(txn)


def test_deleted_index_entry_is_named_and_repaired(damaged: Damaged) -> None:
    repo = damaged.repo
    _edit_index(repo, lambda txn: txn.delete(damaged.entry.chunk_id))
    [finding] = repo.fsck().errors
    assert finding.kind == "index-mismatch"
    assert finding.objects == (damaged.chunk, damaged.entry.pack)
    assert finding.commits == (damaged.target,) and finding.tensors == ("model/x",)
    assert "repair index" in finding.message
    with pytest.raises(IntegrityError, match=f"tensor model/x of commit {damaged.target[:12]}"):
        repo.load(damaged.target)
    report = repo.repair_index()
    assert report.chunks == report.previous_chunks + 1 and report.damaged_packs == []
    assert_clean(repo)
    assert repo.load(damaged.target)["model"]["x"].shape == (5000,)


def test_wrong_index_entry_is_named(damaged: Damaged) -> None:
    repo = damaged.repo
    wrong = dataclasses.replace(damaged.entry, offset=damaged.entry.offset + 4)
    from ckptvcs.index import encode_entry

    _edit_index(repo, lambda txn: txn.put(damaged.entry.chunk_id, encode_entry(wrong)))
    [finding] = repo.fsck().errors
    assert finding.kind == "index-mismatch"
    assert finding.objects == (damaged.chunk, damaged.entry.pack) and finding.commits == (damaged.target,)
    with pytest.raises(IntegrityError, match="model/x"):
        repo.load(damaged.target)
    repo.repair_index()
    assert_clean(repo)


def test_malformed_index_value_is_reported(damaged: Damaged) -> None:
    repo = damaged.repo
    _edit_index(repo, lambda txn: txn.put(damaged.entry.chunk_id, b"short"))
    found = repo.fsck().errors
    assert found and found[0].kind == "corrupt" and "repair index" in found[0].message
    repo.repair_index()
    assert_clean(repo)


@pytest.mark.parametrize("damage", ["garbage"])  # "deleted": rebuilt on open, see test_repo.py
def test_lost_or_garbled_index_file(tmp_path: Path, damage: str) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        cid = repo.commit({"w": torch.randn(10_000)}, code_version=None)
        expected = repo.load()["w"]
    data = tmp_path / "r" / "index" / "data.mdb"
    if damage == "deleted":
        data.unlink()
    else:
        data.write_bytes(b"\x00garbage" * 1000)
    with Repo.open(tmp_path / "r") as repo:
        found = repo.fsck().errors
        assert found and all(f.kind in ("index-mismatch", "corrupt") for f in found)
        assert all(f.commits in ((cid,), ()) for f in found)
        error = IntegrityError if damage == "deleted" else StorageError
        with pytest.raises(error, match="index" if damage != "deleted" else "missing"):
            repo.load()
        report = repo.repair_index()
        assert report.previous_chunks == (0 if damage == "deleted" else None)
        assert_clean(repo)
        assert torch.equal(repo.load()["w"], expected)


def test_missing_delta_base_is_named(damaged: Damaged, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsck checks that every delta base an entry names (``PackEntry.base``) is indexed."""
    index = damaged.repo.chunks.index
    real_iter = type(index).__iter__
    absent = b"\x07" * 32

    def with_base(self):  # type: ignore[no-untyped-def]
        for entry in real_iter(self):
            base = absent if entry.chunk_id == damaged.entry.chunk_id else None
            yield dataclasses.replace(entry, base=base)

    monkeypatch.setattr(type(index), "__iter__", with_base)
    real_walk = ckptvcs.fsck.iter_backend_pack

    def walk_with_base(backend, pack, **kwargs):  # type: ignore[no-untyped-def]
        for entry in real_walk(backend, pack, **kwargs):  # the pack's entry header names the same base
            base = absent if entry.chunk_id == damaged.entry.chunk_id else None
            yield dataclasses.replace(entry, base=base)

    monkeypatch.setattr(ckptvcs.fsck, "iter_backend_pack", walk_with_base)
    [finding] = damaged.repo.fsck().errors
    assert finding.kind == "missing" and finding.objects == (absent.hex(), damaged.chunk)
    assert finding.commits == (damaged.target,)


def test_repair_salvages_a_pack_with_a_damaged_entry_header(damaged: Damaged) -> None:
    repo = damaged.repo
    flip_byte(damaged.pack_path, damaged.entry.offset - 10)
    report = repo.repair_index()
    assert report.damaged_packs == [damaged.entry.pack]
    found = repo.fsck(read_data=True).errors
    by_kind = {f.kind: f for f in found}
    assert by_kind["corrupt"].objects == (damaged.entry.pack,)
    assert by_kind["missing"].objects == (damaged.chunk,) and by_kind["missing"].commits == (damaged.target,)
    # The salvaged entry under the damaged id does not verify, so repair left it out.
    assert report.dropped == [f"{damaged.entry.pack} offset {damaged.entry.offset}"] and len(found) == 2
    assert repo.load(damaged.other)["z"].shape == (2000,)


def test_repair_index_swaps_atomically_and_other_handles_follow(damaged: Damaged) -> None:
    repo = damaged.repo
    other = Repo.open(repo.root)  # shares this process's LMDB environment of the old index
    try:
        before = (repo.root / "index" / "data.mdb").stat().st_ino
        repo.repair_index()
        assert (repo.root / "index" / "data.mdb").stat().st_ino != before
        assert sorted(p.name for p in repo.root.iterdir() if p.name.startswith("index")) == ["index"]
        # A handle opened before the repair must write its next commit into the new index.
        cid = other.commit({"new": torch.randn(3000)}, "after repair", code_version=None)
        assert_clean(repo)
        assert repo.load(cid)["new"].shape == (3000,)
    finally:
        other.close()


def test_repair_without_atomic_exchange_and_crash_between_renames(damaged: Damaged,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    repo = damaged.repo
    _edit_index(repo, lambda txn: txn.delete(damaged.entry.chunk_id))

    def no_exchange(a, b):  # type: ignore[no-untyped-def]
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ckptvcs._fs, "_exchange", no_exchange)
    real_replace = os.replace
    calls: list[str] = []

    def crash_on_second_index_rename(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).name == "index":
            calls.append(str(src))
            raise OSError(errno.EIO, "simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckptvcs._fs, "_replace", crash_on_second_index_rename)
    with pytest.raises(Exception, match="I/O error"):
        repo.repair_index()
    monkeypatch.undo()
    assert calls and not (repo.root / "index").exists() and (repo.root / "index.rebuilt").is_dir()
    repo.close()
    with Repo.open(repo.root) as reopened:  # the next open completes the swap
        assert (reopened.root / "index").is_dir() and not (reopened.root / "index.rebuilt").exists()
        report = assert_clean(reopened)
        assert [o for f in report.garbage for o in f.objects if o.startswith("index")]  # the parked old index
        assert reopened.load(damaged.target)["model"]["x"].shape == (5000,)
        reopened.repair_index()  # the fallback path itself works end to end, and removes the leftover
        assert assert_clean(reopened).findings == []


# -- objects and refs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_commit_object_names_commit_and_refs(damaged: Damaged, damage: str) -> None:
    repo = damaged.repo
    path = repo.objects.path(damaged.target)
    if damage == "flipped":
        flip_byte(path, 20)
    else:
        os.truncate(path, path.stat().st_size // 2)
    found = repo.fsck().errors
    assert [f.kind for f in found] == ["hash-mismatch"]
    assert found[0].objects == (damaged.target,) and found[0].commits == (damaged.target,)
    assert found[0].refs == ("HEAD", "refs/heads/main", "refs/heads/other")
    assert repo.load(damaged.other)["z"].shape == (2000,)


def test_missing_manifest_and_missing_parent(damaged: Damaged) -> None:
    repo = damaged.repo
    manifest = repo.show(damaged.target).manifest
    repo.objects.path(manifest).unlink()
    repo.objects.path(damaged.tagged).unlink()
    found = repo.fsck().errors
    by_object = {f.objects[0]: f for f in found}
    assert set(by_object) == {manifest, damaged.tagged}
    assert by_object[manifest].kind == "missing" and by_object[manifest].commits == (damaged.target,)
    assert f"state of commit {damaged.target[:12]}" in by_object[manifest].message
    missing_parent = by_object[damaged.tagged]
    assert missing_parent.kind == "missing"
    assert set(missing_parent.refs) == {"HEAD", "refs/heads/main", "refs/heads/other", "refs/tags/v1"}
    with pytest.raises(IntegrityError):
        repo.load(damaged.target)
    assert repo.load(damaged.other)["z"].shape == (2000,)  # its parent is gone, its state is not


def test_damaged_ref_and_tag(damaged: Damaged) -> None:
    repo = damaged.repo
    (repo.root / "refs" / "heads" / "other").write_text("garbage\n")
    tag_id = repo.refs.read_raw("refs/tags/v1")
    repo.objects.path(tag_id).unlink()
    found = {f.objects[0]: f for f in repo.fsck().errors}
    assert found["refs/heads/other"].kind == "corrupt"
    assert found[tag_id].kind == "missing" and "refs/tags/v1" in found[tag_id].message


def test_damage_to_many_commits_names_exactly_the_affected_ones(small_repo: Repo) -> None:
    repo = small_repo
    shared = torch.randn(4096 // 4)  # exactly one chunk, in every commit
    commits = [repo.commit({"shared": shared, "own": torch.full((2048,), float(i))}, f"c{i}", code_version=None)
               for i in range(6)]
    entry = repo.chunks.index.get(bytes.fromhex(repo.manifest(commits[0]).blobs[0]["chunks"][0]))
    assert entry is not None
    flip_byte(repo.chunks.packs.path(entry.pack), entry.offset + 5)
    [finding] = repo.fsck(read_data=True).errors
    assert set(finding.commits) == set(commits) and set(finding.tensors) == {"shared"}
    assert "and 1 more" in finding.message  # five named in the message, all in the fields
    assert finding.message.count("tensor shared of commits ") == 1  # one tensor, its commits listed once
    for cid in commits:
        with pytest.raises(IntegrityError, match=f"tensor shared of commit {cid[:12]}"):
            repo.load(cid)
        assert repo.load(cid, keys=["own"])["own"][0] == float(commits.index(cid))


# -- garbage and pruned commits -----------------------------------------------------------------------


def test_interrupted_commit_leaves_only_garbage(damaged: Damaged, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = damaged.repo

    def lose_the_race(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RefConflictError("simulated: the ref moved")

    monkeypatch.setattr(repo.refs, "set_if_equals", lose_the_race)
    with pytest.raises(RefConflictError):
        repo.commit({"orphan": torch.randn(7000)}, "never lands", code_version=None)
    monkeypatch.undo()
    (repo.root / "tmp" / "pack-x-1234.tmp").write_bytes(b"torn")
    report = assert_clean(repo)
    kinds = sorted(f.kind for f in report.garbage)
    assert kinds == ["dangling", "garbage", "garbage", "garbage", "unreachable"]
    assert any("tmp/pack-x-1234.tmp" in f.objects for f in report.garbage)
    assert any(f.kind == "dangling" and "commit" in f.message for f in report.garbage)
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "fsck"])
    assert result.exit_code == 0 and "dangling commit" in result.output


def test_pruned_commits_may_lack_chunks(damaged: Damaged, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit gc pruned keeps commit and manifest; its chunks may be gone on purpose."""
    repo = damaged.repo
    pack_entries = [e for e in repo.chunks.index if e.pack == damaged.entry.pack]
    _edit_index(repo, lambda txn: [txn.delete(e.chunk_id) for e in pack_entries])
    damaged.pack_path.unlink()
    assert not repo.fsck().ok
    monkeypatch.setattr(repo, "_pruned_records", lambda: ({damaged.target: {"reason": "test"}}, {}))
    assert_clean(repo)


# -- command line ---------------------------------------------------------------------------------------------


def test_cli_fsck_and_repair(damaged: Damaged) -> None:
    runner = CliRunner()
    root = str(damaged.repo.root)
    result = runner.invoke(cli, ["--repo", root, "fsck", "--read-data"])
    assert result.exit_code == 0, result.output
    assert "0 problem(s)" in result.output
    _edit_index(damaged.repo, lambda txn: txn.delete(damaged.entry.chunk_id))
    result = runner.invoke(cli, ["--repo", root, "fsck"])
    assert result.exit_code == 10
    assert f"index-mismatch: chunk {damaged.chunk}" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("error: fsck found 1 problem(s)")
    assert "Traceback" not in result.output
    data = json.loads(runner.invoke(cli, ["--repo", root, "fsck", "--json"]).output.split("\nerror:")[0])
    assert data["ok"] is False and data["findings"][0]["commits"] == [damaged.target]
    result = runner.invoke(cli, ["--repo", root, "repair", "index"])
    assert result.exit_code == 0 and "rebuilt the index" in result.output
    assert runner.invoke(cli, ["--repo", root, "fsck", "--read-data"]).exit_code == 0


def test_error_kinds_are_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "durability.md").read_text()
    for kind in ERROR_KINDS:
        assert f"`{kind}`" in text


def test_gc_by_a_handle_opened_before_a_repair(small_repo: Repo) -> None:
    """gc must work on the index ``repair index`` swapped in, not on the one its handle
    opened: Repo.gc refreshes the index after taking the exclusive lock, as commit does."""
    repo = small_repo
    commits = [repo.commit({"w": torch.randn(5000)}, f"c{i}", code_version=None) for i in range(4)]
    other = Repo.open(repo.root)
    try:
        other.repair_index()
    finally:
        other.close()
    repo.prune(commits[0], rule="test")
    assert repo.gc().packs_deleted  # through this handle's (refreshed) index
    with Repo.open(repo.root) as fresh:
        assert_clean(fresh)
        for cid in commits[1:]:
            assert fresh.load(cid)["w"].shape == (5000,)

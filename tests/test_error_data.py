"""Errors that carry data (issue 11, item 5) and the shared validators (item 9).

Integrity errors name what is damaged as fields; fsck decides its finding kinds from
those fields; API misuse raises UsageError; docs/errors.md's table is generated from
errors.py; Repo.commit and the CheckpointManager share one rule for steps and metrics;
nested ref and reflog folders are created durably.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptvcs
import ckptvcs._fs
from ckptvcs import (
    CheckpointManager,
    CorruptObjectError,
    IntegrityError,
    InvalidInputError,
    Repo,
    UnsupportedValueError,
    UsageError,
)
from ckptvcs import errors as errors_module
from ckptvcs.state import iter_tensors
from helpers import flip_byte

ROOT = Path(__file__).resolve().parent.parent


def _errors_table():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("errors_table", ROOT / "scripts" / "errors_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- docs/errors.md ----------------------------------------------------------------------


def test_errors_doc_table_is_generated_from_the_classes() -> None:
    table = _errors_table()
    text = (ROOT / "docs" / "errors.md").read_text()
    assert table.updated(text) == text, "docs/errors.md is out of date: run python scripts/errors_table.py"
    for name in errors_module.__all__:
        cls = getattr(errors_module, name)
        assert f"| `{name}` | " in text and f" | {cls.exit_code} | " in text


def test_errors_doc_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = _errors_table()
    stale = (ROOT / "docs" / "errors.md").read_text().replace("| `UsageError` |", "| `UsageErr` |")
    doc = tmp_path / "errors.md"
    doc.write_text(stale)
    monkeypatch.setattr(table, "DOC", doc)
    assert table.main(["--check"]) == 1
    assert table.main([]) == 0 and table.main(["--check"]) == 0
    assert "| `UsageError` |" in doc.read_text()


# -- the error classes ---------------------------------------------------------------------


def test_integrity_error_fields_default_to_unknown() -> None:
    err = CorruptObjectError("x")
    assert (err.object_id, err.chunk_id, err.pack, err.offset, err.path, err.problem) == (None,) * 6
    assert err.commit_ids == () and err.damaged_on_disk is False and str(err) == "x"
    err = IntegrityError("y", chunk_id="ab", pack="p", offset=7, commit_ids=["c"], damaged_on_disk=True)
    assert (err.chunk_id, err.pack, err.offset, err.commit_ids, err.damaged_on_disk) == ("ab", "p", 7, ("c",), True)


def test_usage_error_is_an_invalid_input_error() -> None:
    assert issubclass(UsageError, InvalidInputError) and UsageError.exit_code == 9
    assert ckptvcs.UsageError is UsageError and "UsageError" in errors_module.__all__


@pytest.mark.parametrize("kwargs", [{"chunk_size": 4095}, {"chunk_size": True}, {"keyframe_interval": 0},
                                    {"keyframe_interval": 65}, {"reflog_expire": 3}])
def test_bad_arguments_raise_usage_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(UsageError):
        Repo.init(tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_url_and_symmetric_difference_are_usage_errors(tmp_path: Path, repo: Repo) -> None:
    with pytest.raises(UsageError, match="URL"):
        Repo.init("s3://bucket/repo")
    repo.commit({"a": 1}, code_version=None)
    with pytest.raises(UsageError, match="symmetric"):
        repo.log("main...main")


# -- fields set where damage is found -------------------------------------------------------------


def _chunk_of(repo: Repo, commit: str, tensor: str):  # type: ignore[no-untyped-def]
    manifest = repo.manifest(commit)
    blob = next(body["blob"] for path, _, body in iter_tensors(manifest.root) if path == tensor)
    entry = repo.chunks.index.get(bytes.fromhex(manifest.blobs[blob]["chunks"][0]))
    assert entry is not None
    return entry


def test_flipped_chunk_names_chunk_pack_and_offset(repo: Repo) -> None:
    cid = repo.commit({"w": torch.randn(20_000, generator=torch.Generator().manual_seed(0))}, code_version=None)
    entry = _chunk_of(repo, cid, "w")
    flip_byte(repo.chunks.packs.path(entry.pack), entry.offset + entry.stored_len // 2)
    with pytest.raises(IntegrityError) as err:
        repo.load(cid)
    e = err.value
    assert (e.chunk_id, e.pack, e.offset) == (entry.chunk_id.hex(), entry.pack, entry.offset)
    assert e.damaged_on_disk and e.problem == "fails its BLAKE3 check" and e.commit_ids == (cid,)
    assert str(e).endswith(f"chunk {entry.chunk_id.hex()} in pack {entry.pack} fails its BLAKE3 check")


def test_damaged_object_names_object_and_file(repo: Repo) -> None:
    cid = repo.commit({"a": 1}, code_version=None)
    with pytest.raises(CorruptObjectError) as err:
        repo.objects.get(cid, "manifest")  # intact bytes, wrong kind: not damage on disk
    assert err.value.object_id == cid and not err.value.damaged_on_disk
    assert err.value.path == f"objects/{cid[:2]}/{cid[2:]}"
    path = repo.objects.path(cid)
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(IntegrityError) as err:
        repo.objects.get(cid)
    assert err.value.object_id == cid and err.value.damaged_on_disk


def test_damaged_ref_names_its_file(repo: Repo) -> None:
    repo.commit({"a": 1}, code_version=None)
    (repo.root / "refs" / "heads" / "main").write_text("not an id\n")
    with pytest.raises(CorruptObjectError) as err:
        repo.resolve("main")
    assert err.value.path == "refs/heads/main"


def test_fsck_decides_kinds_from_fields_not_messages(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = repo.commit({"a": 1}, code_version=None)
    real = repo.objects.get

    def get(oid, expected_kind=None):  # type: ignore[no-untyped-def]
        if oid == cid:
            raise CorruptObjectError("something odd", object_id=oid, damaged_on_disk=on_disk)
        return real(oid, expected_kind)

    monkeypatch.setattr(repo.objects, "get", get)
    for on_disk, kind in ((True, "hash-mismatch"), (False, "corrupt")):  # noqa: B007 (get() above reads it)
        assert [f.kind for f in repo.fsck().errors] == [kind]


# -- one rule for steps and metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "0.5", b"1", np.bool_(True), torch.tensor(True)])
def test_metric_rule_is_shared_by_commit_and_manager(repo: Repo, value: object) -> None:
    with pytest.raises(UnsupportedValueError, match="metrics/acc"):
        repo.commit({"a": 1}, metrics={"acc": value}, code_version=None)
    mgr = CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None)
    with pytest.raises(UnsupportedValueError, match="metrics/acc"):
        mgr.save(5, {"acc": value})  # the manager used to store True as 1.0
    mgr.close()
    assert repo.head() == ("main", None)  # nothing was committed


def test_metric_names_must_be_strings_in_the_manager_too(repo: Repo) -> None:
    with CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None) as mgr:
        with pytest.raises(UnsupportedValueError, match="metric names"):
            mgr.save(1, {1: 0.5})  # type: ignore[dict-item]


def test_numbers_of_every_kind_are_metrics(repo: Repo) -> None:
    metrics = {"i": 1, "f": 0.5, "np": np.float32(0.25), "t": torch.tensor(2.0), "n": np.int64(3)}
    expected = {"i": 1.0, "f": 0.5, "np": 0.25, "t": 2.0, "n": 3.0}
    cid = repo.commit({"a": 1}, metrics=metrics, code_version=None)
    assert repo.show(cid).metrics == expected
    with CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None, branch="m") as mgr:
        saved = mgr.save(np.int64(7), metrics)
    assert repo.show(saved).metrics == expected and repo.show(saved).step == 7


@pytest.mark.parametrize("step", [True, 1.0, "1", None])
def test_step_rule_is_shared_by_commit_and_manager(repo: Repo, step: object) -> None:
    if step is not None:
        with pytest.raises(UnsupportedValueError, match="step"):
            repo.commit({"a": 1}, step=step, code_version=None)
    with CheckpointManager(repo, {"w": torch.zeros(2)}, code_version=None) as mgr:
        with pytest.raises(UnsupportedValueError, match="step"):
            mgr.save(step)  # type: ignore[arg-type]


def test_numpy_integers_are_integers_for_init_too(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=np.int64(8192), keyframe_interval=np.int32(2)) as r:
        assert r.chunk_size == 8192 and type(r.chunk_size) is int
    with Repo.open(tmp_path / "r") as r:
        assert r.chunk_size == 8192


# -- durable nested folders ---------------------------------------------------------------------------


def test_nested_ref_and_log_folders_are_fsynced(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo.commit({"a": 1}, code_version=None)
    synced: list[Path] = []
    real = ckptvcs._fs.fsync_dir
    monkeypatch.setattr(ckptvcs._fs, "fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    repo.branch("team/alice/exp")
    for base in (repo.root / "refs" / "heads", repo.root / "logs" / "refs" / "heads"):
        assert base / "team" / "alice" in synced  # the entry of the new folder .../exp's parent
        assert base / "team" in synced and base in synced
    synced.clear()
    repo.branch("team/alice/exp2")  # the folders exist now: nothing more to sync for them
    assert repo.root / "refs" / "heads" / "team" not in synced


def test_make_dirs_creates_and_syncs_each_new_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(ckptvcs._fs, "fsync_dir", lambda p: synced.append(Path(p)))
    ckptvcs._fs.make_dirs(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    synced.clear()
    ckptvcs._fs.make_dirs(tmp_path / "a" / "b")
    assert synced == []

"""Bad input and damaged data: each case raises a clear, typed error and leaves the
store as it was."""

from __future__ import annotations

import collections
import errno
import json
import os
import socket
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptvcs
import ckptvcs._fs
from ckptvcs import (
    CkptvcsError,
    ForkedRepoError,
    IntegrityError,
    InvalidInputError,
    KeyNotFoundError,
    LockTimeoutError,
    NotARepositoryError,
    Repo,
    RepositoryExistsError,
    RevisionNotFoundError,
    StorageError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from ckptvcs import errors as errors_module
from ckptvcs.pack import PackEntry
from ckptvcs.state import iter_tensors
from helpers import flip_byte, store_snapshot


@pytest.fixture
def committed(repo: Repo) -> tuple[Repo, str]:
    """A repository holding one commit (so the index and packs exist)."""
    return repo, repo.commit({"w": torch.randn(1000), "step": 1}, "base", code_version=None)


def _self_containing_list() -> list:
    loop: list = [1]
    loop.append(loop)
    return loop


class _Opaque:
    pass


class _TensorSubclass(torch.Tensor):
    pass


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized dtypes are deprecated in torch
        return torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)


UNSUPPORTED = {
    "object": _Opaque(),
    "set": {1, 2},
    "lambda": (lambda x: x),
    "complex": 1 + 2j,
    "sparse": torch.eye(3).to_sparse(),
    "quantized": _quantized(),
    "meta": torch.empty(3, device="meta"),
    "tensor_subclass": torch.zeros(2).as_subclass(_TensorSubclass),
    "tensor_key": {torch.zeros(1): 1},
    "nested_tuple_key": {(1, (2,)): 1},
    "frozenset_key": {frozenset({1}): 1},
    "cycle": _self_containing_list(),
    "numpy_object": np.array([1, "a"], dtype=object),
    "numpy_unicode": np.array(["ab"]),
    "numpy_structured": np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
    "numpy_datetime": np.datetime64("2024-01-01"),
    "defaultdict": collections.defaultdict(int),
    "namedtuple": collections.namedtuple("P", "x y")(1, 2),
    "surrogate": "\ud800",
    "huge_int": 10**5000,
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_value_names_its_path_and_writes_nothing(committed: tuple[Repo, str], name: str) -> None:
    repo, base = committed
    value, path = UNSUPPORTED[name], "optimizer/state/0/foo"
    state = {"model": {"w": torch.randn(5000)}, "optimizer": {"state": {0: {"ok": torch.randn(3000), "foo": value}}}}
    before = store_snapshot(repo.root)
    with pytest.raises(UnsupportedValueError) as err:
        repo.commit(state, "bad")
    assert path in str(err.value)
    assert err.value.path.startswith(path)
    assert err.value.exit_code == 8
    assert "\n" not in str(err.value)
    assert store_snapshot(repo.root) == before
    assert repo.resolve("HEAD") == base


def test_unsupported_value_at_the_root(repo: Repo) -> None:
    with pytest.raises(UnsupportedValueError, match="<root>"):
        repo.commit(_Opaque())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metrics": {"loss": "low"}},
        {"metrics": {"loss": None}},
        {"metrics": {"loss": [1.0]}},
        {"metrics": {"loss": True}},
        {"metrics": {"loss": torch.ones(2)}},
        {"metrics": {1: 0.5}},
        {"config": {"t": torch.zeros(1)}},
        {"config": {"x": float("nan")}},
        {"config": {"s": {1, 2}}},
        {"config": np.arange(3)},
        {"code_version": {"git_commit": torch.zeros(1)}},
        {"message": 5},
        {"step": 1.5},
        {"step": True},
        {"epoch": "3"},
        {"data_version": 3},
    ],
    ids=lambda kw: "-".join(f"{k}={v!r}"[:30] for k, v in kw.items()),
)
def test_bad_metadata_is_refused_before_writing(committed: tuple[Repo, str], kwargs: dict) -> None:
    repo, base = committed
    before = store_snapshot(repo.root)
    with pytest.raises(UnsupportedValueError):
        repo.commit({"w": torch.randn(4000)}, **kwargs)
    assert store_snapshot(repo.root) == before
    assert repo.resolve("HEAD") == base


@pytest.mark.parametrize("call", ["load", "show", "log", "diff", "checkout", "branch", "tag", "manifest"])
def test_unknown_revision(committed: tuple[Repo, str], call: str) -> None:
    repo, _ = committed
    before = store_snapshot(repo.root)
    calls = {
        "load": lambda: repo.load("no-such-rev"),
        "show": lambda: repo.show("v9"),
        "log": lambda: repo.log("deadbeef"),
        "diff": lambda: repo.diff("HEAD", "HEAD~5"),
        "checkout": lambda: repo.checkout("nope"),
        "branch": lambda: repo.branch("new", "nope"),
        "tag": lambda: repo.tag("v1", "nope"),
        "manifest": lambda: repo.manifest("f" * 64),
    }
    with pytest.raises(RevisionNotFoundError) as err:
        calls[call]()
    assert err.value.exit_code == 5
    assert store_snapshot(repo.root) == before


def test_open_something_that_is_not_a_repository(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (empty, tmp_path / "missing", tmp_path / "missing" / "deeper"):
        with pytest.raises(NotARepositoryError) as err:
            Repo.open(path)
        assert err.value.exit_code == 3
    assert not (tmp_path / "missing").exists()
    (empty / "config.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(NotARepositoryError):
        Repo.open(empty)
    nowhere = tmp_path / "a" / "b"
    nowhere.mkdir(parents=True)
    with pytest.raises(NotARepositoryError):
        Repo.discover(nowhere)


def test_open_and_discover_find_the_store(tmp_path: Path) -> None:
    Repo.init(tmp_path / "project" / ".ckptvcs").close()
    (tmp_path / "project" / "src").mkdir()
    with Repo.open(tmp_path / "project") as r:
        assert r.root == tmp_path / "project" / ".ckptvcs"
    with Repo.discover(tmp_path / "project" / "src") as r:
        assert r.root == tmp_path / "project" / ".ckptvcs"


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    Repo.init(tmp_path / "r").close()
    config_path = tmp_path / "r" / "config.json"
    config = json.loads(config_path.read_text())
    config["version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormatError, match="newer") as err:
        Repo.open(tmp_path / "r")
    assert err.value.exit_code == 4
    assert "99" in str(err.value)


def test_init_refuses_existing_content(tmp_path: Path) -> None:
    Repo.init(tmp_path / "r").close()
    with pytest.raises(RepositoryExistsError):
        Repo.init(tmp_path / "r")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    before = store_snapshot(other)
    with pytest.raises(RepositoryExistsError):
        Repo.init(other)
    assert store_snapshot(other) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RepositoryExistsError):
        Repo.init(a_file)
    assert a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    Repo.init(empty).close()  # an empty directory is fine
    assert (empty / "config.json").is_file()


@pytest.mark.parametrize("chunk_size", [0, -4096, 4095, 4104, 1 << 12 >> 1, (256 << 20) + 16, True, "4096", 4096.0, None])
def test_invalid_chunk_size(tmp_path: Path, chunk_size: object) -> None:
    with pytest.raises(InvalidInputError) as err:
        Repo.init(tmp_path / "r", chunk_size=chunk_size)  # type: ignore[arg-type]
    assert err.value.exit_code == 9
    assert not (tmp_path / "r").exists()


def test_valid_chunk_size_bounds(tmp_path: Path) -> None:
    for size in (4096, 256 << 20):
        with Repo.init(tmp_path / str(size), chunk_size=size) as r:
            assert r.chunk_size == size
        with Repo.open(tmp_path / str(size)) as r:
            assert r.chunk_size == size


def test_load_unknown_key(committed: tuple[Repo, str]) -> None:
    repo, base = committed
    with pytest.raises(KeyNotFoundError) as err:
        repo.load(keys=["nope"])
    assert isinstance(err.value, KeyError)
    assert "'nope'" in str(err.value) and base[:12] in str(err.value)
    assert err.value.exit_code == 5
    with pytest.raises(KeyError):
        repo.load(keys=["w", "nope", "nope2"])
    repo.commit([1, 2, 3], code_version=None)
    with pytest.raises(KeyNotFoundError, match="dict"):
        repo.load(keys=["w"])  # the top level is a list


def _run_in_fork(child) -> int:  # type: ignore[no-untyped-def]
    """Fork; run ``child()`` (returns an exit code) in the child; return its exit code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a threaded process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = child()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_use_after_fork_raises(committed: tuple[Repo, str]) -> None:
    repo, base = committed
    repo.load()  # the thread pool and the index are live at fork time

    def child() -> int:
        calls = (repo.log, repo.load, lambda: repo.commit({"x": 1}), repo.stats, repo.branches, repo.head, repo.show)
        for call in calls:
            try:
                call()
            except ForkedRepoError as err:
                if err.exit_code != 12 or "Repo.open" not in str(err):
                    return 3
                continue
            except BaseException:
                return 2
            return 1
        return 0

    assert _run_in_fork(child) == 0
    assert repo.log()[0].id == base  # the parent's handle is unaffected
    assert repo.load()["step"] == 1


def test_open_in_forked_child_fails_typed_or_works(committed: tuple[Repo, str]) -> None:
    repo, base = committed

    def child() -> int:
        try:
            with Repo.open(repo.root) as fresh:
                return 0 if fresh.log()[0].id == base else 4
        except CkptvcsError:
            return 0  # refused with a typed error (see the xfail test below)
        except BaseException:
            return 2

    assert _run_in_fork(child) == 0


def test_fresh_handle_in_forked_child_is_refused_clearly(committed: tuple[Repo, str]) -> None:
    """LMDB cannot reopen, after fork, an environment the parent has open: say so, typed."""
    repo, _ = committed

    def child() -> int:
        try:
            Repo.open(repo.root)
        except ForkedRepoError as err:
            return 0 if "spawn" in str(err) else 3
        return 4

    assert _run_in_fork(child) == 0
    assert repo.load()["step"] == 1  # the parent's handle is untouched


def test_open_in_forked_child_works_when_parent_closed_first(tmp_path: Path) -> None:
    Repo.init(tmp_path / "r").close()
    with Repo.open(tmp_path / "r") as r:
        base = r.commit({"a": 1}, code_version=None)

    def child() -> int:
        with Repo.open(tmp_path / "r") as fresh:
            fresh.commit({"a": 2}, code_version=None)
        return 0

    assert _run_in_fork(child) == 0
    with Repo.open(tmp_path / "r") as r:
        assert r.show().parents == (base,) and r.load() == {"a": 2}


# -- damaged data ------------------------------------------------------------------------


def _damaged_setup(repo: Repo) -> tuple[str, str, PackEntry]:
    """Two commits sharing no chunk; returns them and the pack entry of model/x's first chunk."""
    gen = torch.Generator().manual_seed(0)
    damaged = repo.commit({"model": {"x": torch.randn(50_000, generator=gen)}, "y": torch.randn(50_000, generator=gen)})
    intact = repo.commit({"z": torch.randn(2000, generator=gen)}, branch="other")
    manifest = repo.manifest(damaged)
    blob = next(body["blob"] for path, _, body in iter_tensors(manifest.root) if path == "model/x")
    entry = repo.chunks.index.get(bytes.fromhex(manifest.blobs[blob]["chunks"][0]))
    assert entry is not None
    return damaged, intact, entry


def test_flipped_byte_in_pack_payload(repo: Repo) -> None:
    damaged, intact, entry = _damaged_setup(repo)
    expected_y = repo.load(damaged, keys=["y"])["y"].clone()
    flip_byte(repo.chunks.packs.path(entry.pack), entry.offset + entry.stored_len // 2)
    with pytest.raises(IntegrityError) as err:
        repo.load(damaged)
    message = str(err.value)
    assert "model/x" in message and damaged[:12] in message
    assert err.value.exit_code == 10
    assert torch.equal(repo.load(damaged, keys=["y"])["y"], expected_y)  # other chunks of the pack are fine
    assert repo.load(intact)["z"].shape == (2000,)
    zeros = repo.commit({"model": {"x": torch.zeros(50_000)}}, branch="third")
    with pytest.raises(IntegrityError, match="model/x"):
        repo.diff(zeros, damaged)  # diff reads model/x of both sides


def test_flipped_byte_in_pack_entry_header(repo: Repo) -> None:
    damaged, _, entry = _damaged_setup(repo)
    flip_byte(repo.chunks.packs.path(entry.pack), entry.offset - 10)  # inside the chunk id
    with pytest.raises(IntegrityError, match="model/x"):
        repo.load(damaged)


def test_truncated_pack(repo: Repo) -> None:
    damaged, intact, entry = _damaged_setup(repo)
    path = repo.chunks.packs.path(entry.pack)
    os.truncate(path, 100)
    with pytest.raises(IntegrityError) as err:
        repo.load(damaged)
    assert damaged[:12] in str(err.value) and ("tensor model/x " in str(err.value) or "tensor y " in str(err.value))
    assert repo.load(intact)["z"].shape == (2000,)


def test_missing_pack(repo: Repo) -> None:
    damaged, _, entry = _damaged_setup(repo)
    repo.chunks.packs.path(entry.pack).unlink()
    with pytest.raises(IntegrityError, match=r"tensor (model/x|y) of commit .* is missing"):
        repo.load(damaged)


def test_flipped_byte_in_commit_object(repo: Repo) -> None:
    first = repo.commit({"a": 1}, code_version=None)
    cid = repo.commit({"a": 2}, code_version=None)
    path = repo.objects.path(cid)
    original = path.read_bytes()
    expected = repo.show(cid)
    detected = 0
    for offset in range(len(original)):
        flip_byte(path, offset)
        try:
            commit = repo.show(cid)
        except IntegrityError as err:
            assert cid in str(err), f"offset {offset}: {err}"
            with pytest.raises(IntegrityError):
                repo.log()
            detected += 1
        else:
            # A flip that zstd decodes to the very same bytes (the id still
            # verifies) is harmless; anything else must be detected.
            assert commit == expected
        path.write_bytes(original)
    assert detected >= len(original) - 4
    assert repo.show(cid).parents == (first,)
    assert repo.show(first).id == first


def test_flipped_byte_in_manifest_object(repo: Repo) -> None:
    cid = repo.commit({"w": torch.randn(100)}, code_version=None)
    path = repo.objects.path(repo.show(cid).manifest)
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(IntegrityError):
        repo.load(cid)
    assert repo.show(cid).id == cid  # the commit object itself is intact


def test_missing_commit_object(repo: Repo) -> None:
    first = repo.commit({"a": 1}, code_version=None)
    second = repo.commit({"a": 2}, code_version=None)
    repo.objects.path(first).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        repo.log()
    assert repo.show(second).parents == (first,)


def test_damaged_ref_file(repo: Repo) -> None:
    repo.commit({"a": 1}, code_version=None)
    (repo.root / "refs" / "heads" / "main").write_text("not an id\n")
    with pytest.raises(IntegrityError, match="refs/heads/main"):
        repo.resolve("main")


# -- locks ---------------------------------------------------------------------------


def test_ref_lock_held_by_live_process_times_out(repo: Repo) -> None:
    cid = repo.commit({"a": 1}, code_version=None)
    holder = ckptvcs._fs.RefLock(repo.root / "refs" / "heads" / "dev").acquire()  # a live holder (flock held)
    repo.refs.lock_timeout = 0.05
    with pytest.raises(LockTimeoutError, match=str(os.getpid())):
        repo.branch("dev")
    assert "dev" not in repo.branches()
    holder.release()
    assert repo.branch("dev") == cid


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.parametrize(
    "content",
    ["owner", "new value", "truncated"],
    ids=["died-after-owner-line", "died-before-rename", "died-after-truncate"],
)
def test_stale_ref_lock_of_dead_process_is_broken(repo: Repo, content: str) -> None:
    """A holder killed at any step leaves a lock file nobody holds a flock on: it is broken.

    Regression: the lock used to be judged by its owner line only, so a writer killed
    after writing the new value into it (or after truncating it) blocked every later
    update of that ref until the 30 s timeout, and then for ever.
    """
    cid = repo.commit({"a": 1}, code_version=None)
    lock = repo.root / "refs" / "heads" / "dev.lock"
    lock.write_text({"owner": f"{socket.gethostname()} {_dead_pid()}\n", "new value": "ab" * 32 + "\n",
                     "truncated": ""}[content])
    if content == "truncated":
        old = time.time() - 60
        os.utime(lock, (old, old))
    assert ckptvcs._fs.lock_file_is_stale(lock)
    repo.refs.lock_timeout = 0.2  # a lock that is not broken at once raises LockTimeoutError
    assert repo.branch("dev") == cid
    assert not lock.exists()


def test_young_empty_ref_lock_is_not_broken(repo: Repo) -> None:
    """An empty lock file may belong to a writer between O_EXCL and flock: wait for it."""
    repo.commit({"a": 1}, code_version=None)
    lock = repo.root / "refs" / "heads" / "dev.lock"
    lock.write_text("")
    assert not ckptvcs._fs.lock_file_is_stale(lock)
    repo.refs.lock_timeout = 0.05
    with pytest.raises(LockTimeoutError):
        repo.branch("dev")
    assert lock.exists()


# -- error classes ---------------------------------------------------------------------


def test_every_error_class_has_an_exit_code() -> None:
    classes = [getattr(errors_module, name) for name in errors_module.__all__]
    assert len(classes) >= 17
    for cls in classes:
        assert issubclass(cls, CkptvcsError), cls
        assert isinstance(cls.exit_code, int) and not isinstance(cls.exit_code, bool), cls
        assert 1 <= cls.exit_code <= 125, cls
        assert cls.__doc__, cls
        assert getattr(ckptvcs, cls.__name__) is cls  # exported at the top level
    assert issubclass(errors_module.KeyNotFoundError, KeyError)
    assert issubclass(errors_module.CorruptObjectError, IntegrityError)
    err = errors_module.KeyNotFoundError("no top-level entry 'x'")
    assert str(err) == "no top-level entry 'x'"  # not KeyError's quoted repr


# -- atomic init ---------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", ["first", "final"])
@pytest.mark.parametrize("pre_existing", [False, True], ids=["absent", "empty-dir"])
def test_init_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str, pre_existing: bool) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("x")
    target = parent / "repo"
    if pre_existing:
        target.mkdir()
    real = ckptvcs._fs.durable_rename
    calls: list[tuple[str, str]] = []

    def failing(src, dst):  # type: ignore[no-untyped-def]
        calls.append((str(src), str(dst)))
        if fail_on == "first" or Path(dst) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ckptvcs._fs, "durable_rename", failing)
    with pytest.raises(StorageError, match="disk full"):
        Repo.init(target)
    assert calls
    if fail_on == "final":
        assert Path(calls[-1][1]) == target
    monkeypatch.undo()
    expected = ["neighbour.txt", "repo"] if pre_existing else ["neighbour.txt"]
    assert sorted(p.name for p in parent.iterdir()) == expected  # no staging directory left
    if pre_existing:
        assert target.is_dir() and not any(target.iterdir())
    with pytest.raises(NotARepositoryError):
        Repo.open(target)
    Repo.init(target).close()  # and a retry succeeds
    with Repo.open(target) as r:
        assert r.head() == ("main", None)

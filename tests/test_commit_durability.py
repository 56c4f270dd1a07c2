"""The batched durability of a commit (docs/format.md section 8, steps 4-7).

A commit stores its manifest and commit object in one batch (every file fsynced, then
renamed, then each folder fsynced once) and appends the branch's and HEAD's reflog lines
together. These tests pin what that must still guarantee:

- a power-loss model (what the fsync rules say a power loss keeps, replayed from the
  calls a real commit makes through the ``_fs`` seams) finds, at the ref rename, every
  object and pack the commit names durable: content fsynced before its rename, its
  directory entry (and the fan-out folder's own entry) fsynced after; and when the
  commit returns, the ref's entry and the reflog lines durable too. A control run with
  the batch's folder fsyncs removed is caught by the same model;
- a child SIGKILLed before each fsync and each rename of a commit (every step boundary,
  including between the batch's renames) leaves a store where no ref names missing
  data, fsck finds no damage and the next commit works;
- a fault on each item of the batches (FaultyBackend) leaves a consistent store;
- a tiny commit makes at most 11 fsyncs (counted through ``_fs._fsync``), so a change
  that adds one is caught.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptvcs._fs
from ckptvcs import Repo, StorageError
from ckptvcs.backends import Fault, FaultyBackend, LocalBackend
from ckptvcs.index import ChunkIndex, SessionLookups

MAX_FSYNCS_PER_TINY_COMMIT = 11  # pack 2, manifest + commit 4, ref 2, reflogs 2, ref log 1


def _state(i: int) -> dict[str, Any]:
    """State ``i``: weights a small step away from state ``i - 1`` (deltas pay), as in training."""
    w = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    w += np.float32(1e-4) * np.random.default_rng(i).standard_normal(3000).astype(np.float32)
    return {"w": w, "b": np.full(40, i, dtype=np.int64), "i": i}


def _assert_state(loaded: dict[str, Any], i: int) -> None:
    expected = _state(i)
    assert np.array_equal(loaded["w"], expected["w"]) and np.array_equal(loaded["b"], expected["b"])
    assert loaded["i"] == i


class PowerLossModel:
    """Replays a process's durable-write calls and says what a power loss would keep.

    The rules (POSIX fsync, as docs/durability.md relies on them): a file's bytes are
    durable once it is fsynced after its last write; a directory entry (a rename's
    target, a new folder) once its folder is fsynced after the entry was made. The model
    wraps ``_fs._write``, ``_fs._fsync``, ``_fs._replace`` and ``os.mkdir``; LMDB's own
    writes (C code) are outside it. ``commit_point`` is the ref file whose rename is the
    commit point: at that rename every file renamed into ``objects/`` or ``packs/`` (and
    the folders on their way) must be durable, else ``violations`` says which is not.
    """

    def __init__(self, root: Path, commit_point: str) -> None:
        self.root = os.path.realpath(root)
        self.commit_point = os.path.join(self.root, commit_point)
        self.dirty: set[int] = set()  # inodes written since their last fsync
        self.pending: dict[str, int] = {}  # path → inode: entries whose folder was not fsynced since
        self.violations: list[str] = []
        self.fsyncs = 0

    def _real(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> PowerLossModel:
        write, fsync, replace, mkdir = ckptvcs._fs._write, ckptvcs._fs._fsync, ckptvcs._fs._replace, os.mkdir

        def tracked_write(fd: int, data: Any) -> int:
            self.dirty.add(os.fstat(fd).st_ino)
            return write(fd, data)

        def tracked_fsync(fd: int) -> None:
            fsync(fd)
            self.fsyncs += 1
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                folder = os.readlink(f"/proc/self/fd/{fd}")
                for path in [p for p in self.pending if os.path.dirname(p) == folder]:
                    del self.pending[path]
            else:
                self.dirty.discard(info.st_ino)

        def tracked_replace(src: Any, dst: Any) -> None:
            inode = os.lstat(src).st_ino
            target = self._real(dst)
            if inode in self.dirty and target.startswith(self.root):
                self.violations.append(f"{os.path.relpath(target, self.root)} renamed before its bytes were fsynced")
            if target == self.commit_point:
                self._check_commit_point()
            replace(src, dst)
            self.pending[target] = inode

        def tracked_mkdir(path: Any, *args: Any, **kw: Any) -> None:
            mkdir(path, *args, **kw)
            self.pending[self._real(path)] = os.lstat(path).st_ino

        monkeypatch.setattr(ckptvcs._fs, "_write", tracked_write)
        monkeypatch.setattr(ckptvcs._fs, "_fsync", tracked_fsync)
        monkeypatch.setattr(ckptvcs._fs, "_replace", tracked_replace)
        monkeypatch.setattr(os, "mkdir", tracked_mkdir)
        return self

    def _check_commit_point(self) -> None:
        for path in self.pending:
            rel = os.path.relpath(path, self.root)
            if rel.startswith(("objects", "packs")):
                self.violations.append(f"at the ref rename, the entry of {rel} is not durable (folder not fsynced)")

    def not_durable(self, rel: str) -> list[str]:
        """Why ``rel`` (a file under the root) would not survive a power loss now ([] if it would)."""
        path = os.path.join(self.root, rel)
        problems = []
        if os.stat(path).st_ino in self.dirty:
            problems.append(f"{rel}: bytes written since its last fsync")
        problems += [f"{os.path.relpath(p, self.root)}: entry not fsynced" for p in self.pending
                     if path == p or path.startswith(p + os.sep)]
        return problems


def _precreate_fanout(root: Path) -> None:
    """Every ``objects/xx`` folder exists (and is durable), as in a repository with some
    history: a commit then creates no folder, so its fsync count is the steady one."""
    for i in range(256):
        (root / "objects" / f"{i:02x}").mkdir(exist_ok=True)
    os.sync()


@pytest.fixture()
def repo(tmp_path: Path) -> Iterator[Repo]:
    with Repo.init(tmp_path / "store", chunk_size=4096) as repo:
        repo.commit(_state(0), "first", code_version=None)
        yield repo


def test_at_the_ref_rename_everything_the_commit_names_is_durable(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    model = PowerLossModel(repo.root, "refs/heads/main").install(monkeypatch)
    for i in (1, 2, 3):  # new fan-out folders and existing ones
        cid = repo.commit(_state(i), f"state {i}", code_version=None)
        assert model.violations == []
        commit = repo.show(cid)
        named = [f"objects/{cid[:2]}/{cid[2:]}", f"objects/{commit.manifest[:2]}/{commit.manifest[2:]}",
                 "refs/heads/main", "logs/refs/heads/main", "logs/HEAD", "audit/refs.jsonl"]
        named += [f"packs/{p}.pack" for p in {e.pack for e in repo.chunks.index}]
        assert [p for rel in named for p in model.not_durable(rel)] == []
    monkeypatch.undo()
    assert repo.fsck(read_data=True).ok


def test_the_model_catches_a_batch_without_its_folder_fsyncs(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: drop the batch's folder fsyncs and the model reports the objects."""
    model = PowerLossModel(repo.root, "refs/heads/main").install(monkeypatch)
    monkeypatch.setattr(ckptvcs._fs, "fsync_dirs", lambda folders: None)
    repo.commit(_state(1), "state 1", code_version=None)
    assert model.violations and all("objects/" in v and "not durable" in v for v in model.violations)


def test_a_tiny_commit_makes_at_most_eleven_fsyncs(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steady state (fan-out folders exist): pack + packs/ (2), manifest and commit files
    and their two folders (4), ref lock file + refs/heads (2), branch and HEAD reflogs (2),
    the ref log audit/refs.jsonl (1). LMDB's fdatasync is its own (not counted here)."""
    _precreate_fanout(repo.root)
    counted = []
    real = ckptvcs._fs._fsync

    def counting(fd: int) -> None:
        counted.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(ckptvcs._fs, "_fsync", counting)
    for i in (1, 2, 3):
        counted.clear()
        repo.commit(_state(i), f"state {i}", code_version=None)
        assert len(counted) <= MAX_FSYNCS_PER_TINY_COMMIT, counted


def test_a_commit_reads_the_index_through_one_read_transaction(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dedup checks, delta bases and their chains, base reads: one LMDB read transaction
    per commit (index.SessionLookups), no per-look-up transaction (ChunkIndex.get)."""
    sessions: list[SessionLookups] = []
    gets = []
    real_init, real_get = SessionLookups.__init__, ChunkIndex.get

    def tracked_init(self: SessionLookups, index: ChunkIndex) -> None:
        real_init(self, index)
        sessions.append(self)

    def counted_get(self: ChunkIndex, chunk_id: bytes) -> Any:
        gets.append(chunk_id)
        return real_get(self, chunk_id)

    monkeypatch.setattr(SessionLookups, "__init__", tracked_init)
    monkeypatch.setattr(ChunkIndex, "get", counted_get)
    for i in (1, 2, 3):  # deltas on deltas: bases and chains are looked up
        repo.commit(_state(i), f"state {i}", code_version=None)
    assert gets == []
    assert [s.transactions for s in sessions] == [1, 1, 1]
    monkeypatch.undo()
    assert repo.fsck(read_data=True).ok
    assert any(entry.base is not None for entry in repo.chunks.index)  # deltas were built on bases
    for i in (1, 2, 3):
        _assert_state(repo.load(repo.log()[3 - i].id), i)


def _commit_killed_at(root: str, primitive: str, n: int) -> int:
    """Fork a child that commits ``_state(n + 100)`` and SIGKILLs itself just before its
    N-th call of ``_fs.<primitive>``; returns its wait status (a fork, not a new
    interpreter: no imports to pay per kill; the parent holds no LMDB environment open)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            real, calls = getattr(ckptvcs._fs, primitive), [0]

            def kill_at_n(*args: Any) -> Any:
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args)

            with Repo.open(root) as child:
                setattr(ckptvcs._fs, primitive, kill_at_n)
                child.commit(_state(n + 100), f"state {n + 100}", code_version=None)
            code = 100 + min(calls[0], 100)  # it finished: how many calls the commit made
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("primitive", ["_fsync", "_replace"])
def test_a_kill_before_each_durable_step_of_a_commit_leaves_no_ref_naming_missing_data(
        tmp_path: Path, primitive: str) -> None:
    """SIGKILL before the N-th fsync (or rename) of a commit, for every N: between the
    pack's steps, the batch's file fsyncs, its renames, its folder fsyncs, the ref's steps
    and the reflog appends. After each kill HEAD names a commit that loads bit-exact
    (the old one, or the new one once the ref was renamed), fsck finds no damage, and the
    next commit works."""
    root = str(tmp_path / "store")
    with Repo.init(root, chunk_size=4096) as repo:
        heads = {repo.commit(_state(0), "state 0", code_version=None): 0}
    n = 0
    while True:
        n += 1
        status = _commit_killed_at(root, primitive, n)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) >= 100, "the child failed"
            assert os.WEXITSTATUS(status) - 100 < n  # no N-th call any more: every step was cut once
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        with Repo.open(root) as after:
            report = after.fsck(read_data=True)
            assert report.ok, [str(f) for f in report.errors]
            head = after.resolve("HEAD")
            seed = heads.get(head, int(after.show(head).message.split()[-1]))
            _assert_state(after.load(head), seed)
            cid = after.commit(_state(n), f"state {n}", code_version=None)  # the next commit works
            assert after.show(cid).parents == (head,)
            heads[cid] = n
    assert n > 4


def _faulty_repo(tmp_path: Path, *faults: Fault) -> tuple[Repo, FaultyBackend]:
    backend = FaultyBackend(LocalBackend(tmp_path / "store"))
    repo = Repo.init(None, chunk_size=4096, backend=backend)
    repo.commit(_state(0), "first", code_version=None)
    backend.faults.extend(faults)
    return repo, backend


@pytest.mark.parametrize("item", [1, 2], ids=["manifest", "commit object"])
def test_a_fault_on_either_object_of_the_batch_moves_no_ref(tmp_path: Path, item: int) -> None:
    fault = Fault("put", "objects/*", nth=item, errno=errno.ENOSPC)
    repo, _ = _faulty_repo(tmp_path, fault)
    with repo:
        head = repo.resolve("HEAD")
        with pytest.raises(StorageError, match="disk full while writing manifest object"):
            repo.commit(_state(1), "state 1", code_version=None)
        assert fault.fired == 1 and repo.resolve("HEAD") == head
        report = repo.fsck(read_data=True)
        assert report.ok
        repo.commit(_state(2), "state 2", code_version=None)
        _assert_state(repo.load("HEAD"), 2)


@pytest.mark.parametrize("key", ["logs/refs/heads/main", "logs/HEAD"])
def test_a_fault_on_either_reflog_line_comes_after_the_commit_point(tmp_path: Path, key: str) -> None:
    fault = Fault("append", key, errno=errno.EIO)
    repo, _ = _faulty_repo(tmp_path, fault)
    with repo:
        with pytest.raises(StorageError, match="I/O error while appending to the reflog of refs/heads/main and HEAD"):
            repo.commit(_state(1), "state 1", code_version=None)
        assert fault.fired == 1
        _assert_state(repo.load("HEAD"), 1)  # the ref moved before the reflog: the commit stands
        assert repo.fsck(read_data=True).ok
        cid = repo.commit(_state(2), "state 2", code_version=None)
        assert [e.new for e in repo.reflog("main")][0] == cid

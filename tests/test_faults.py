"""Faults: failing writes, fsyncs and renames (ENOSPC, EIO) injected through the I/O seam
in ckptvcs/_fs.py, EIO on reads, a real full disk (tmpfs), and a full LMDB map.

SQLite's I/O-error loop: for N = 1, 2, ... make the N-th call of a primitive fail, and
check each time that the user gets one typed line, the store stays consistent (fsck:
no damage; HEAD names a complete commit), no lock is left held, and a retry succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptvcs._fs
import ckptvcs.index
from ckptvcs import Repo, StorageError


def _state(i: int) -> dict:
    gen = torch.Generator().manual_seed(i)
    return {"w": torch.randn(6000, generator=gen), "b": torch.randn(300, generator=gen), "i": i}


class FailNth:
    """Wraps a primitive so that its ``n``-th call raises OSError(``err``); counts calls."""

    def __init__(self, real: Callable, n: int, err: int) -> None:
        self.real, self.n, self.err = real, n, err
        self.calls = 0
        self.failed = False
        self.calls_after_failure = 0

    def __call__(self, *args):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.failed:
            self.calls_after_failure += 1
        if self.calls == self.n:
            self.failed = True
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*args)


def _assert_consistent(repo: Repo, possible_heads: set[str], states: dict[str, int]) -> str:
    report = repo.fsck(read_data=True)
    assert report.ok, [str(f) for f in report.errors]
    head = repo.resolve("HEAD")
    assert head in possible_heads
    loaded = repo.load(head)
    assert torch.equal(loaded["w"], _state(states[head])["w"]) and loaded["i"] == states[head]
    return head


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("primitive", ["_write", "_fsync", "_replace"])
def test_every_failing_call_of_a_commit(small_repo: Repo, monkeypatch: pytest.MonkeyPatch,
                                        primitive: str, err: int) -> None:
    repo = small_repo
    states = {repo.commit(_state(0), "base", code_version=None): 0}
    head = next(iter(states))
    repo.refs.lock_timeout = 0.2  # a lock left held would make the next commit fail
    n = 0
    while True:
        n += 1
        fault = FailNth(getattr(ckptvcs._fs, primitive), n, err)
        monkeypatch.setattr(ckptvcs._fs, primitive, fault)
        try:
            cid = repo.commit(_state(n), f"attempt {n}", code_version=None)
        except StorageError as error:
            monkeypatch.undo()
            message = str(error)
            assert "\n" not in message and error.exit_code == 13
            assert ("disk full" in message) if err == errno.ENOSPC else ("I/O error" in message)
            if primitive == "_fsync":
                assert fault.calls_after_failure == 0  # a failed fsync ends the operation: never retried
            # The commit point is the ref rename: a fault after it leaves the new commit
            # in place (complete); before it, the old HEAD. Both are consistent.
            new = repo.resolve("HEAD")
            if new != head:
                states[new] = n
                assert repo.show(new).message == f"attempt {n}" and repo.show(new).parents == (head,)
            head = _assert_consistent(repo, {head, new}, states)
            continue
        monkeypatch.undo()
        assert fault.calls < n  # the commit no longer reaches the N-th call: every call was failed once
        states[cid] = n
        _assert_consistent(repo, {cid}, states)
        break
    assert n > 3
    assert repo.show().parents == (head,)


def test_failing_fsync_of_a_pack_is_an_error_not_retried(small_repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = small_repo
    base = repo.commit(_state(0), code_version=None)
    synced: list[int] = []
    real = ckptvcs._fs._fsync

    def fsync_fails_once(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(ckptvcs._fs, "_fsync", fsync_fails_once)
    with pytest.raises(StorageError, match="I/O error while sealing pack"):
        repo.commit(_state(1), code_version=None)
    assert len(synced) == 1  # nothing was fsynced again after the failure
    monkeypatch.undo()
    assert repo.resolve("HEAD") == base
    assert list((repo.root / "tmp").iterdir()) == []  # the unsealed pack is dropped
    assert repo.fsck().ok


@pytest.mark.parametrize("primitive", ["_write", "_fsync", "_replace"])
def test_failing_tag_and_branch_leave_no_ref(small_repo: Repo, monkeypatch: pytest.MonkeyPatch, primitive: str) -> None:
    repo = small_repo
    base = repo.commit(_state(0), code_version=None)
    monkeypatch.setattr(ckptvcs._fs, primitive, FailNth(getattr(ckptvcs._fs, primitive), 1, errno.ENOSPC))
    with pytest.raises(StorageError, match="disk full"):
        repo.tag("v1")
    monkeypatch.setattr(ckptvcs._fs, primitive, FailNth(getattr(ckptvcs._fs, primitive), 1, errno.ENOSPC))
    with pytest.raises(StorageError, match="disk full"):
        repo.branch("dev")
    monkeypatch.undo()
    assert repo.tags() == {} and set(repo.branches()) == {"main"}
    assert repo.fsck().ok
    repo.refs.lock_timeout = 0.2
    assert repo.tag("v1") == base and repo.branch("dev") == base


# -- reads -------------------------------------------------------------------------------------


def test_eio_on_read(small_repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = small_repo
    cid = repo.commit(_state(0), code_version=None)
    expected = repo.load()["w"]

    def eio(*args):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckptvcs._fs, "_preadv", eio)
    monkeypatch.setattr(ckptvcs._fs, "_pread", eio)
    with pytest.raises(StorageError) as error:
        repo.load(cid)
    assert "I/O error" in str(error.value) and "\n" not in str(error.value)
    report = repo.fsck(read_data=True)
    assert report.errors and {f.kind for f in report.errors} <= {"unreadable"}
    assert any(f.commits == (cid,) for f in report.errors)
    monkeypatch.undo()
    assert torch.equal(repo.load(cid)["w"], expected)
    assert repo.fsck(read_data=True).ok


# -- LMDB map full --------------------------------------------------------------------------------


def test_full_lmdb_map_grows_and_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckptvcs.index, "_INITIAL_MAP_SIZE", 64 << 10)
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        assert repo.chunks.index.map_size() == 64 << 10
        state = {"w": torch.randn(1 << 20)}  # 4 MiB: 1024 chunks, more index than 64 KiB holds
        cid = repo.commit(state, code_version=None)
        assert repo.chunks.index.map_size() > 64 << 10
        assert torch.equal(repo.load(cid)["w"], state["w"])
        assert repo.fsck().ok


def test_map_grown_by_another_process_is_adopted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crash_harness import context

    monkeypatch.setattr(ckptvcs.index, "_INITIAL_MAP_SIZE", 64 << 10)
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.commit({"w": torch.randn(1000)}, code_version=None)
        proc = context().Process(target=_commit_big, args=(str(repo.root),))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0
        state = {"v": torch.randn(1 << 18)}
        cid = repo.commit(state, code_version=None)  # this process's map is stale: adopt, retry
        assert torch.equal(repo.load(cid)["v"], state["v"])
        assert repo.fsck().ok


def _commit_big(store: str) -> None:
    with Repo.open(store) as repo:
        repo.commit({"big": torch.randn(1 << 20)}, branch="big", code_version=None)


# -- a real full disk -----------------------------------------------------------------------------------

_DISK_FULL_CHILD = r"""
import json, sys, torch
from ckptvcs import Repo, StorageError
root = sys.argv[1]
repo = Repo.init(root + "/r", chunk_size=4096)
ballast = root + "/ballast"
with open(ballast, "wb") as f:
    f.write(b"\0" * (256 << 10))
acked, seed, error = {}, 0, None
while error is None:
    seed += 1
    try:
        acked[repo.commit({"w": torch.randn(64 << 10, generator=torch.Generator().manual_seed(seed))},
                          f"seed {seed}", code_version=None)] = seed
    except StorageError as err:
        error = str(err)
report = repo.fsck(read_data=True)
loads = all(torch.equal(repo.load(c)["w"], torch.randn(64 << 10, generator=torch.Generator().manual_seed(s)))
            for c, s in acked.items())
head_ok = repo.resolve("HEAD") in acked
import os; os.unlink(ballast)
after = repo.commit({"x": torch.ones(10)}, "after freeing space", code_version=None)
print(json.dumps({"acked": len(acked), "error": error, "fsck_ok": report.ok,
                  "problems": [str(f) for f in report.errors], "loads": loads, "head_ok": head_ok,
                  "after_ok": repo.load(after)["x"].sum().item() == 10}))
"""


def _unshare_tmpfs_available() -> str | None:
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:200]}"
    return None


def test_real_disk_full_on_a_small_tmpfs(tmp_path: Path) -> None:
    """Covered everywhere by the injected ENOSPC loop above; this adds a real device."""
    reason = _unshare_tmpfs_available()
    if reason:
        pytest.skip(f"real disk-full check skipped: {reason} (the injected ENOSPC tests still ran)")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_DISK_FULL_CHILD)
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=3m tmpfs "$0" && exec "$1" "$2" "$0"',
         str(mount), sys.executable, str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["acked"] >= 3
    assert "disk full" in outcome["error"], outcome["error"]
    assert outcome["fsck_ok"], outcome["problems"]
    assert outcome["loads"] and outcome["head_ok"] and outcome["after_ok"]

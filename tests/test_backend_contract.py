"""The storage backend contract (ckptvcs/backends/base.py), run against every backend.

One test class, parametrised over LocalBackend (a temporary directory), MemoryBackend and
FaultyBackend wrapping each with no fault armed, and FsspecBackend on memory:// and on a
real SeaweedFS S3 server, as dulwich runs one object-store suite against its disk, memory
and bucket stores. Where a backend declares fewer capabilities (no advisory locks, emulated
appends), the tests branch on ``backend.capabilities`` and check what it promises instead.
"""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptvcs.backends import (
    Backend,
    ConcurrentUpdate,
    Fault,
    FaultyBackend,
    KeyMissing,
    LocalBackend,
    MemoryBackend,
)
from ckptvcs.errors import CorruptObjectError, LockTimeoutError


def _fsspec_memory(tmp: Path, request: pytest.FixtureRequest) -> Backend:
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    return FsspecBackend(f"memory://ckptvcs-contract-{uuid.uuid4().hex}/store")


def _fsspec_s3(tmp: Path, request: pytest.FixtureRequest) -> Backend:
    """FsspecBackend on a fresh bucket of the real SeaweedFS S3 server (tests/s3server.py)."""
    from ckptvcs.backends.fsspec_backend import FsspecBackend
    from s3server import make_bucket

    server = request.getfixturevalue("s3_server")
    bucket = f"contract-{uuid.uuid4().hex[:16]}"
    make_bucket(server, bucket)
    return FsspecBackend(f"s3://{bucket}/store", **server.storage_options())


FACTORIES: dict[str, Callable[[Path, pytest.FixtureRequest], Backend]] = {
    "local": lambda tmp, _: LocalBackend(tmp / "store"),
    "memory": lambda tmp, _: MemoryBackend(),
    "faulty-local": lambda tmp, _: FaultyBackend(LocalBackend(tmp / "store")),
    "faulty-memory": lambda tmp, _: FaultyBackend(MemoryBackend()),
    "fsspec-memory": _fsspec_memory,
    "fsspec-s3": _fsspec_s3,
}


@pytest.fixture(params=sorted(FACTORIES))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    (tmp_path / "store").mkdir()
    yield FACTORIES[request.param](tmp_path, request)


class TestBackendContract:
    def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert backend.describe()
        assert (backend.local_root() is not None) == backend.capabilities.local_path

    def test_put_get_size(self, backend: Backend) -> None:
        assert backend.put("objects/ab/cdef", b"hello")
        assert backend.get("objects/ab/cdef") == b"hello"
        assert backend.size("objects/ab/cdef") == 5
        assert backend.size("objects/ab/missing") is None

    def test_put_replaces_whole(self, backend: Backend) -> None:
        backend.put("config.json", b"old value")
        backend.put("config.json", b"new")
        assert backend.get("config.json") == b"new"

    def test_put_if_absent_keeps_the_first(self, backend: Backend) -> None:
        assert backend.put("objects/00/a", b"first", if_absent=True)
        assert not backend.put("objects/00/a", b"second", if_absent=True)
        assert backend.get("objects/00/a") == b"first"

    def test_missing_key(self, backend: Backend) -> None:
        with pytest.raises(KeyMissing) as err:
            backend.get("refs/heads/nope")
        assert isinstance(err.value, FileNotFoundError) and err.value.key == "refs/heads/nope"
        with pytest.raises(KeyMissing):
            backend.open_reader("packs/nope.pack")
        assert not backend.delete("refs/heads/nope")

    def test_max_size(self, backend: Backend) -> None:
        backend.put("pruned/x", b"x" * 100)
        assert backend.get("pruned/x", max_size=100) == b"x" * 100
        with pytest.raises(CorruptObjectError, match="pruned/x"):
            backend.get("pruned/x", max_size=99)

    def test_ranged_reads(self, backend: Backend) -> None:
        data = bytes(range(256)) * 64
        backend.put("packs/p.pack", data)
        reader = backend.open_reader("packs/p.pack")
        try:
            assert reader.size == len(data)
            assert reader.read(100, 50) == data[100:150]
            assert reader.read(len(data) - 10, 50) == data[-10:]  # short only where the object ends
            head, body = bytearray(16), bytearray(1000)
            assert reader.readinto([head, memoryview(body)], 7) == 1016
            assert bytes(head) == data[7:23] and bytes(body) == data[23:1023]
            tail = bytearray(100)
            assert reader.readinto([tail], len(data) - 40) == 40
            assert bytes(tail[:40]) == data[-40:]
        finally:
            reader.close()

    def test_list_sorted_under_prefix(self, backend: Backend) -> None:
        for key in ["refs/heads/b", "refs/heads/a/x", "refs/tags/v1", "refs/heads/a0", "objects/00/z"]:
            backend.put(key, b"v")
        assert list(backend.list("refs/heads")) == ["refs/heads/a/x", "refs/heads/a0", "refs/heads/b"]
        assert list(backend.list("refs/heads/")) == ["refs/heads/a/x", "refs/heads/a0", "refs/heads/b"]
        assert list(backend.list("refs")) == sorted(["refs/heads/a/x", "refs/heads/a0", "refs/heads/b", "refs/tags/v1"])
        assert list(backend.list("nothing")) == []

    def test_list_shows_no_temporaries(self, backend: Backend) -> None:
        writer = backend.open_writer("packs/p.pack")
        writer.write(b"half")
        backend.compare_and_swap("refs/heads/main", None, b"a\n")
        assert list(backend.list("packs")) == []
        assert list(backend.list("refs")) == ["refs/heads/main"]
        writer.abort()
        assert list(backend.list("tmp")) == []

    def test_writer_commit_and_abort(self, backend: Backend) -> None:
        writer = backend.open_writer("packs/a.pack")
        writer.write(b"one ")
        writer.write(memoryview(b"two"))
        assert backend.size("packs/a.pack") is None  # invisible until commit
        writer.commit()
        assert backend.get("packs/a.pack") == b"one two"
        dropped = backend.open_writer("packs/b.pack")
        dropped.write(b"x" * 1000)
        dropped.abort()
        dropped.abort()  # twice is fine
        assert backend.size("packs/b.pack") is None
        assert list(backend.list("packs")) == ["packs/a.pack"]

    def test_delete(self, backend: Backend) -> None:
        backend.put("staged/m", b"r")
        assert backend.delete("staged/m")
        assert backend.size("staged/m") is None
        assert not backend.delete("staged/m")
        backend.put("packs/1.pack", b"1")
        backend.put("packs/2.pack", b"2")
        assert backend.delete_many(["packs/1.pack", "packs/2.pack", "packs/3.pack"]) == 2
        assert list(backend.list("packs")) == []
        assert list(backend.list()) == []  # an emptied folder is no key

    def test_compare_and_swap(self, backend: Backend) -> None:
        backend.compare_and_swap("refs/heads/main", None, b"1\n")
        assert backend.get("refs/heads/main") == b"1\n"
        backend.compare_and_swap("refs/heads/main", b"1\n", b"2\n")
        with pytest.raises(ConcurrentUpdate) as lost:
            backend.compare_and_swap("refs/heads/main", b"1\n", b"3\n")
        assert lost.value.current == b"2\n" and lost.value.key == "refs/heads/main"
        with pytest.raises(ConcurrentUpdate) as exists:
            backend.compare_and_swap("refs/heads/main", None, b"3\n")
        assert exists.value.current == b"2\n"
        assert backend.get("refs/heads/main") == b"2\n"
        backend.compare_and_swap("refs/heads/main", b"2\n", None)  # delete
        assert backend.size("refs/heads/main") is None
        with pytest.raises(ConcurrentUpdate) as gone:
            backend.compare_and_swap("refs/heads/main", b"2\n", b"4\n")
        assert gone.value.current is None

    def test_compare_and_swap_races_have_one_winner(self, backend: Backend) -> None:
        backend.compare_and_swap("HEAD", None, b"0")
        wins: list[int] = []

        def attempt(n: int) -> None:
            try:
                backend.compare_and_swap("HEAD", b"0", str(n).encode())
                wins.append(n)
            except ConcurrentUpdate:
                pass

        threads = [threading.Thread(target=attempt, args=(n,)) for n in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and backend.get("HEAD") == str(wins[0]).encode()

    def test_append(self, backend: Backend) -> None:
        backend.append("logs/refs/heads/main", b"line 1\n")
        backend.append("logs/refs/heads/main", b"line 2\n")
        assert backend.get("logs/refs/heads/main") == b"line 1\nline 2\n"

    def test_concurrent_appends_keep_every_line(self, backend: Backend) -> None:
        """Native (O_APPEND) or emulated (read, compare-and-swap, retry): no append is lost."""

        def write(n: int) -> None:
            for i in range(3):
                backend.append("records/gc.jsonl", f"{n}.{i}\n".encode())

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = backend.get("records/gc.jsonl").decode().splitlines()
        assert sorted(lines) == sorted(f"{n}.{i}" for n in range(4) for i in range(3))

    def test_bad_keys_are_refused(self, backend: Backend) -> None:
        for key in ["", "/etc/passwd", "../x", "refs/../../x", "refs//x", "./x", "a\\b", "refs/heads/.."]:
            with pytest.raises(ValueError):
                backend.get(key)
            with pytest.raises(ValueError):
                backend.put(key, b"x")
            with pytest.raises(ValueError):
                backend.compare_and_swap(key, None, b"x")
        with pytest.raises(ValueError):
            list(backend.list("../"))

    def test_lock_exclusivity(self, backend: Backend) -> None:
        if not backend.capabilities.advisory_locks:  # object stores: the protocol says so, loudly
            with pytest.raises(NotImplementedError):
                with backend.lock("lock", exclusive=True, timeout=1):
                    pass
            return
        with backend.lock("lock", exclusive=False, timeout=5), backend.lock("lock", exclusive=False, timeout=5):
            pass  # shared holders coexist
        held = threading.Event()
        release = threading.Event()

        def hold_exclusive() -> None:
            with backend.lock("lock", exclusive=True, timeout=5):
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold_exclusive)
        holder.start()
        assert held.wait(30)
        try:
            with pytest.raises(LockTimeoutError), backend.lock("lock", exclusive=False, timeout=0.05):
                pass
        finally:
            release.set()
            holder.join()
        with backend.lock("lock", exclusive=True, timeout=5):
            pass


# -- the fault wrapper itself ---------------------------------------------------------------------


def test_fault_fails_the_nth_matching_call_only() -> None:
    fault = Fault("put", "objects/*", nth=2, errno=errno.ENOSPC)
    backend = FaultyBackend(MemoryBackend(), fault)
    backend.put("refs/heads/a", b"x")  # does not match
    backend.put("objects/00/a", b"1")
    with pytest.raises(OSError) as err:
        backend.put("objects/00/b", b"2")
    assert err.value.errno == errno.ENOSPC
    backend.put("objects/00/c", b"3")  # times=1: only once
    assert fault.calls == 3 and fault.fired == 1
    assert backend.size("objects/00/b") is None


def test_fault_flips_bits_on_read() -> None:
    inner = MemoryBackend()
    inner.put("packs/p.pack", b"\x00" * 64)
    backend = FaultyBackend(inner, Fault("read", "packs/*", flip=True, flip_offset=10, times=None))
    reader = backend.open_reader("packs/p.pack")
    assert reader.read(0, 64)[10] == 1
    head, body = bytearray(4), bytearray(20)
    reader.readinto([head, body], 0)
    assert body[6] == 1 and sum(body) == 1 and sum(head) == 0
    assert inner.get("packs/p.pack") == b"\x00" * 64  # the stored bytes are untouched


def test_local_backend_refuses_links_and_special_files(tmp_path: Path) -> None:
    import os

    root = tmp_path / "store"
    (root / "refs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "refs" / "heads")
    backend = LocalBackend(root)
    with pytest.raises(CorruptObjectError, match="link"):
        backend.put("refs/heads/main", b"x")
    with pytest.raises(CorruptObjectError, match="link"):
        backend.compare_and_swap("refs/heads/main", None, b"x")
    assert list(outside.iterdir()) == []
    os.mkfifo(root / "refs" / "fifo")
    with pytest.raises(CorruptObjectError, match="FIFO"):
        backend.get("refs/fifo")


def test_fault_wrapper_forwards_the_ref_lock_timeout(tmp_path: Path) -> None:
    from ckptvcs.refs import Refs

    inner = LocalBackend(tmp_path)
    refs = Refs(FaultyBackend(inner))
    refs.lock_timeout = 0.2
    assert inner.cas_timeout == 0.2 and refs.lock_timeout == 0.2
    assert not hasattr(FaultyBackend(MemoryBackend()), "cas_timeout")

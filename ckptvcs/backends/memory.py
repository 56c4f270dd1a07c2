"""MemoryBackend: keys in a dict, for fast tests and as the reference of the contract.

Thread-safe (one lock around the dict), with every operation the protocol has:
compare-and-swap, appends and reader/writer locks (between threads of one process).
Nothing is durable: the store lives as long as the object. Objects are immutable
``bytes``, so a reader holding one never sees a later put.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import CorruptObjectError, LockTimeoutError
from .base import Capabilities, ConcurrentUpdate, KeyMissing, check_key, check_prefix

__all__ = ["MemoryBackend"]


class _MemoryReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + size])

    def readinto(self, buffers: list[bytearray | memoryview], offset: int) -> int:
        done = 0
        for buf in buffers:
            target = memoryview(buf).cast("B")
            piece = self._data[offset + done : offset + done + len(target)]
            target[: len(piece)] = piece
            done += len(piece)
            if len(piece) < len(target):
                break
        return done

    def close(self) -> None:
        self._data = memoryview(b"")


class _MemoryWriter:
    def __init__(self, backend: MemoryBackend, key: str) -> None:
        self._backend = backend
        self._key = key
        self._parts: list[bytes] | None = []

    def write(self, data: bytes | memoryview) -> None:
        if self._parts is None:
            raise ValueError("write to a committed or aborted writer")
        self._parts.append(bytes(data))

    def commit(self) -> None:
        if self._parts is None:
            raise ValueError("commit of a committed or aborted writer")
        parts, self._parts = self._parts, None
        self._backend.put(self._key, b"".join(parts))

    def abort(self) -> None:
        self._parts = None


class _RWLock:
    """A reader/writer lock between threads: many shared holders or one exclusive."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def hold(self, name: str, exclusive: bool, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._exclusive or (exclusive and self._shared):
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self._exclusive or (exclusive and self._shared):
                        kind = "exclusive" if exclusive else "shared"
                        raise LockTimeoutError(f"could not take the {kind} lock {name} within {timeout:.0f}s")
            if exclusive:
                self._exclusive = True
            else:
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


class MemoryBackend:
    """Keys in a dict (see the module docstring)."""

    capabilities = Capabilities(
        atomic_rename=False, fsync=False, conditional_put=True, advisory_locks=True, local_path=False, appends=True
    )

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._data: dict[str, bytes] = {}
        self._guard = threading.Lock()
        self._locks: dict[str, _RWLock] = {}

    def describe(self) -> str:
        return f"memory:{self.name}"

    def local_root(self) -> Path | None:
        return None

    def __repr__(self) -> str:
        return f"MemoryBackend({self.name!r})"

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        check_key(key)
        with self._guard:
            data = self._data.get(key)
        if data is None:
            raise KeyMissing(key)
        if max_size is not None and len(data) > max_size:
            raise CorruptObjectError(f"{key} holds {len(data)} bytes, more than the {max_size} its kind may hold")
        return data

    def open_reader(self, key: str) -> _MemoryReader:
        return _MemoryReader(self.get(key))

    def size(self, key: str) -> int | None:
        check_key(key)
        with self._guard:
            data = self._data.get(key)
        return None if data is None else len(data)

    def list(self, prefix: str = "") -> Iterator[str]:
        folder = check_prefix(prefix)
        start = folder + "/" if folder else ""
        with self._guard:
            keys = [k for k in self._data if k.startswith(start)]
        return iter(sorted(keys))

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        check_key(key)
        with self._guard:
            self._check_no_folder_clash(key)
            if if_absent and key in self._data:
                return False
            self._data[key] = bytes(data)
        return True

    def _check_no_folder_clash(self, key: str) -> None:
        """A key may not sit where another key is a folder (or the reverse), as on a file
        system: the layers above rely on that (``refs/heads/a`` vs ``refs/heads/a/b``)."""
        parts = key.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in self._data:
                raise OSError(errno.ENOTDIR, "Not a directory", "/".join(parts[:n]))
        start = key + "/"
        if any(k.startswith(start) for k in self._data):
            raise OSError(errno.EISDIR, "Is a directory", key)

    def open_writer(self, key: str) -> _MemoryWriter:
        check_key(key)
        return _MemoryWriter(self, key)

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._guard:
            return self._data.pop(key, None) is not None

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(self.delete(key) for key in keys)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        check_key(key)
        with self._guard:
            current = self._data.get(key)
            if current != expected:
                raise ConcurrentUpdate(key, current)
            if new is None:
                self._data.pop(key, None)
            else:
                self._check_no_folder_clash(key)
                self._data[key] = bytes(new)

    def append(self, key: str, data: bytes) -> None:
        check_key(key)
        with self._guard:
            if key not in self._data:
                self._check_no_folder_clash(key)
            self._data[key] = self._data.get(key, b"") + bytes(data)

    def lock(self, name: str, *, exclusive: bool, timeout: float) -> contextlib.AbstractContextManager[None]:
        check_key(name)
        with self._guard:
            lock = self._locks.setdefault(name, _RWLock())
        return lock.hold(name, exclusive, timeout)

    # -- test helpers ------------------------------------------------------------------

    def corrupt(self, key: str, offset: int, xor: int = 0x01) -> None:
        """Flip bits of one stored byte (bit-rot tests)."""
        with self._guard:
            data = bytearray(self._data[key])
            data[offset] ^= xor
            self._data[key] = bytes(data)

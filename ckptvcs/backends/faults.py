"""FaultyBackend: a wrapper that injects storage faults, for the fault and bit-rot tests.

It forwards every call to the wrapped backend, except the calls its :class:`Fault` rules
match: the N-th call of an operation on a key matching a glob raises ``OSError(errno)``
(ENOSPC, EIO, EROFS...), or its data comes back with bits flipped. Operations:

``get``, ``read`` (ranged reads: ``RangeReader.read`` and ``readinto``), ``open_reader``,
``size``, ``list``, ``put`` (each item of a ``put_many`` too), ``write``
(``ObjectWriter.write``), ``commit`` (``ObjectWriter.commit``), ``delete``, ``cas``,
``append`` (each item of an ``append_many`` too), ``lock``.

This replaces monkeypatching private names: a test states *what* fails (the second pack
write, every read of one object) in the protocol's terms, and the same test runs on
every backend.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .base import Backend, Capabilities, ObjectWriter, RangeReader, append_many, put_many

__all__ = ["FaultyBackend", "Fault", "OPERATIONS", "WRITES"]

OPERATIONS = ("get", "read", "open_reader", "size", "list", "put", "write", "commit", "delete", "cas", "append",
              "lock")
WRITES = ("put", "write", "commit", "delete", "cas", "append")  # every operation that changes the store


@dataclass
class Fault:
    """Fail (or corrupt) matching calls.

    op: one of OPERATIONS, or a tuple of them (``WRITES``: every write).
    key: a glob over keys (``packs/*``; ``*`` matches ``/`` too).
    nth: the first matching call that fails (1 = the first); ``times`` calls from there
    fail (None: every one after). errno: the error raised; or ``flip``: instead of failing,
    a read returns its data with one bit flipped at ``flip_offset`` within what was read.
    ``calls`` counts the matching calls seen, ``fired`` those that failed.
    """

    op: str | tuple[str, ...]
    key: str = "*"
    nth: int = 1
    times: int | None = 1
    errno: int | None = None
    flip: bool = False
    flip_offset: int = 0
    calls: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)
    _ops: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        ops = (self.op,) if isinstance(self.op, str) else self.op
        if not ops or any(op not in OPERATIONS for op in ops):
            raise ValueError(f"unknown operation in {self.op!r}; one of {', '.join(OPERATIONS)}")
        self._ops = ops
        if (self.errno is None) == (not self.flip):
            raise ValueError("a fault either raises an errno or flips a bit (flip=True)")

    def hits(self, op: str, key: str) -> bool:
        """Count a call; True when this one is to fail (or be corrupted)."""
        if op not in self._ops or not fnmatch.fnmatchcase(key, self.key):
            return False
        self.calls += 1
        if self.calls < self.nth or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class FaultyBackend:
    """Wraps a backend; see the module docstring. ``faults`` may be changed at any time."""

    def __init__(self, wrapped: Backend, *faults: Fault) -> None:
        self.wrapped = wrapped
        self.faults: list[Fault] = list(faults)
        self._guard = threading.Lock()

    @property
    def capabilities(self) -> Capabilities:
        return self.wrapped.capabilities

    def describe(self) -> str:
        return self.wrapped.describe()

    def local_root(self) -> Path | None:
        return self.wrapped.local_root()

    def __repr__(self) -> str:
        return f"FaultyBackend({self.wrapped!r}, {len(self.faults)} faults)"

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)  # local extras (path...)

    @property
    def cas_timeout(self) -> float:
        """The wrapped backend's ref-lock wait (AttributeError where it has none)."""
        return float(getattr(self.wrapped, "cas_timeout"))  # noqa: B009

    @cas_timeout.setter
    def cas_timeout(self, value: float) -> None:
        setattr(self.wrapped, "cas_timeout", value)  # noqa: B010

    def _check(self, op: str, key: str) -> Fault | None:
        """Raise the error of the first fault that fires; a firing flip fault is returned."""
        with self._guard:
            fired = next((f for f in self.faults if f.hits(op, key)), None)
        if fired is not None and fired.errno is not None:
            raise OSError(fired.errno, os.strerror(fired.errno), key)
        return fired

    @staticmethod
    def _flip(data: bytes, fault: Fault) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        out[min(fault.flip_offset, len(out) - 1)] ^= 0x01
        return bytes(out)

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        fault = self._check("get", key)
        data = self.wrapped.get(key, max_size=max_size)
        return self._flip(data, fault) if fault else data

    def open_reader(self, key: str) -> RangeReader:
        self._check("open_reader", key)
        return _FaultyReader(self, key, self.wrapped.open_reader(key))

    def size(self, key: str) -> int | None:
        self._check("size", key)
        return self.wrapped.size(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self._check("list", prefix)
        return self.wrapped.list(prefix)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        self._check("put", key)
        return self.wrapped.put(key, data, if_absent=if_absent)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> builtins.list[bool]:
        """A ``put`` fault on the i-th item fails the batch there: the items before it are
        stored (as a batch, through the wrapped backend), the rest are not."""
        items = list(items)
        for i, (key, _) in enumerate(items):
            try:
                self._check("put", key)
            except OSError:
                put_many(self.wrapped, items[:i])
                raise
        return put_many(self.wrapped, items)

    def open_writer(self, key: str) -> ObjectWriter:
        return _FaultyWriter(self, key, self.wrapped.open_writer(key))

    def delete(self, key: str) -> bool:
        self._check("delete", key)
        return self.wrapped.delete(key)

    def delete_many(self, keys: Iterable[str]) -> int:
        for key in keys:
            self._check("delete", key)
        return self.wrapped.delete_many(keys)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        self._check("cas", key)
        self.wrapped.compare_and_swap(key, expected, new)

    def append(self, key: str, data: bytes) -> None:
        self._check("append", key)
        self.wrapped.append(key, data)

    def append_many(self, appends: Sequence[tuple[str, bytes]]) -> None:
        """An ``append`` fault on the i-th item fails there, after the items before it."""
        appends = list(appends)
        for i, (key, _) in enumerate(appends):
            try:
                self._check("append", key)
            except OSError:
                append_many(self.wrapped, appends[:i])
                raise
        append_many(self.wrapped, appends)

    def lock(self, name: str, *, exclusive: bool, timeout: float) -> contextlib.AbstractContextManager[None]:
        self._check("lock", name)
        return self.wrapped.lock(name, exclusive=exclusive, timeout=timeout)


class _FaultyReader:
    def __init__(self, backend: FaultyBackend, key: str, reader: RangeReader) -> None:
        self._backend, self._key, self._reader = backend, key, reader

    @property
    def size(self) -> int:
        return self._reader.size

    def read(self, offset: int, size: int) -> bytes:
        fault = self._backend._check("read", self._key)
        data = self._reader.read(offset, size)
        return self._backend._flip(data, fault) if fault else data

    def readinto(self, buffers: list[bytearray | memoryview], offset: int) -> int:
        fault = self._backend._check("read", self._key)
        got = self._reader.readinto(buffers, offset)
        if fault and got:
            at = min(fault.flip_offset, got - 1)
            for buf in buffers:
                view = memoryview(buf).cast("B")
                if at < len(view):
                    view[at] ^= 0x01
                    break
                at -= len(view)
        return got

    def close(self) -> None:
        self._reader.close()


class _FaultyWriter:
    def __init__(self, backend: FaultyBackend, key: str, writer: ObjectWriter) -> None:
        self._backend, self._key, self._writer = backend, key, writer

    def write(self, data: bytes | memoryview) -> None:
        self._backend._check("write", self._key)
        self._writer.write(data)

    def commit(self) -> None:
        self._backend._check("commit", self._key)
        self._writer.commit()

    def abort(self) -> None:
        self._writer.abort()

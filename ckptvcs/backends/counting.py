"""A backend wrapper that counts requests and bytes, per operation and per key prefix.

For capacity planning against object stores (docs/scale.md): S3 limits request *rates per
key prefix*, and bills per request, so what matters is how many GETs and PUTs each step
of a save issues and under which prefixes. ``CountingBackend(inner)`` forwards every call
to ``inner`` unchanged and tallies it as the object-store request it becomes:

- GET: ``get``, every ``read``/``readinto`` of an ``open_reader`` (a ranged GET each);
- HEAD: ``size``, ``open_reader`` (s3fs asks for the size first);
- PUT: ``put``, an ``open_writer``'s ``commit``, ``compare_and_swap``, ``append``;
- LIST: ``list``; DELETE: ``delete``, each key of ``delete_many``.

The prefix of a key is its first two components (``packs/<name>.pack`` → ``packs``,
``objects/ab/...`` → ``objects/ab``), the granularity at which S3 partitions. Counts are
kept under a lock (the store's worker threads issue reads in parallel).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .base import Backend, ObjectWriter, RangeReader

KINDS = ("GET", "HEAD", "PUT", "LIST", "DELETE")


def key_prefix(key: str) -> str:
    """The key's first two components (one for a top-level key): its S3 prefix partition."""
    parts = key.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


@dataclass
class RequestCounts:
    """Requests and bytes seen by a :class:`CountingBackend` (plain values: picklable)."""

    requests: Counter[str] = field(default_factory=Counter)  # kind -> count
    by_prefix: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, prefix) -> count
    bytes_in: int = 0  # read from the store
    bytes_out: int = 0  # written to the store

    def add(self, other: RequestCounts) -> None:
        """Add ``other``'s counts to these (summing several processes)."""
        self.requests.update(other.requests)
        self.by_prefix.update(other.by_prefix)
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out

    def total(self) -> int:
        return sum(self.requests.values())

    def top_level(self, kind: str) -> Counter[str]:
        """``kind`` requests per top-level folder (``packs``, ``objects``, ``refs``...)."""
        out: Counter[str] = Counter()
        for (k, prefix), n in self.by_prefix.items():
            if k == kind:
                out[prefix.split("/")[0]] += n
        return out


class CountingBackend:
    """``inner`` with every request counted in ``self.counts`` (see the module docstring)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.counts = RequestCounts()
        self._mutex = threading.Lock()

    def _tally(self, kind: str, key: str, *, read: int = 0, written: int = 0, n: int = 1) -> None:
        with self._mutex:
            self.counts.requests[kind] += n
            self.counts.by_prefix[(kind, key_prefix(key))] += n
            self.counts.bytes_in += read
            self.counts.bytes_out += written

    def reset(self) -> RequestCounts:
        """The counts so far; counting restarts from zero."""
        with self._mutex:
            counts, self.counts = self.counts, RequestCounts()
        return counts

    def describe(self) -> str:
        return self.inner.describe()

    def local_root(self) -> Path | None:
        return self.inner.local_root()

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        data = self.inner.get(key, max_size=max_size)
        self._tally("GET", key, read=len(data))
        return data

    def open_reader(self, key: str) -> RangeReader:
        reader = self.inner.open_reader(key)
        self._tally("HEAD", key)
        return _CountingReader(self, key, reader)

    def size(self, key: str) -> int | None:
        self._tally("HEAD", key)
        return self.inner.size(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self._tally("LIST", prefix or "")
        return self.inner.list(prefix)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        self._tally("PUT", key, written=len(data))
        return self.inner.put(key, data, if_absent=if_absent)

    def open_writer(self, key: str) -> ObjectWriter:
        return _CountingWriter(self, key, self.inner.open_writer(key))

    def delete(self, key: str) -> bool:
        self._tally("DELETE", key)
        return self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        for key in keys:
            self._tally("DELETE", key)
        return self.inner.delete_many(keys)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        self._tally("PUT", key, written=len(new or b""))
        self.inner.compare_and_swap(key, expected, new)

    def append(self, key: str, data: bytes) -> None:
        self._tally("PUT", key, written=len(data))
        self.inner.append(key, data)

    def lock(self, name: str, *, exclusive: bool, timeout: float) -> contextlib.AbstractContextManager[None]:
        return self.inner.lock(name, exclusive=exclusive, timeout=timeout)


class _CountingReader:
    def __init__(self, owner: CountingBackend, key: str, inner: RangeReader) -> None:
        self._owner, self._key, self._inner = owner, key, inner

    @property
    def size(self) -> int:
        return self._inner.size

    def read(self, offset: int, size: int) -> bytes:
        data = self._inner.read(offset, size)
        self._owner._tally("GET", self._key, read=len(data))
        return data

    def readinto(self, buffers: list[bytearray | memoryview], offset: int) -> int:
        n = self._inner.readinto(buffers, offset)
        self._owner._tally("GET", self._key, read=n)
        return n

    def close(self) -> None:
        self._inner.close()


class _CountingWriter:
    def __init__(self, owner: CountingBackend, key: str, inner: ObjectWriter) -> None:
        self._owner, self._key, self._inner = owner, key, inner
        self._written = 0

    def write(self, data: bytes | memoryview) -> None:
        self._inner.write(data)
        self._written += len(data)

    def commit(self) -> None:
        self._inner.commit()
        self._owner._tally("PUT", self._key, written=self._written)

    def abort(self) -> None:
        self._inner.abort()

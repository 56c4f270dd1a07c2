"""The storage backend protocol: everything ckptvcs does to durable storage.

A backend stores *keys*: relative POSIX paths inside one repository ("packs/ab/<id>.pack",
"objects/12/<id>", "refs/heads/main"). It knows nothing of chunks, commits or refs; the
layers above decide what a key means (their names live in ``ckptvcs.layout``). The protocol
is shaped so that both a local directory and an object store (S3 and its compatibles) can
implement it without a second seam:

- ``put`` is an immutable, atomic, durable whole-object write: a reader sees all of it or
  nothing, and once ``put`` returns a crash cannot take it back. Locally: write a temporary
  file, fsync, rename, fsync the folder. On S3: one PUT (``If-None-Match: *`` when
  ``if_absent``).
- ``open_writer`` streams a large object (a pack) and makes it visible only at ``commit``.
- ``get_range``/``open_reader`` serve ranged reads; nothing ever needs a whole pack in memory.
- ``compare_and_swap`` is the commit point of the store (a ref update): it replaces a small
  object only if it still holds what the caller last read. Locally: a lock file plus rename;
  on S3: a conditional PUT (``If-Match: <etag>`` / ``If-None-Match: *``).
- ``put_many`` (optional; :func:`put_many` is the default) stores several immutable
  objects that must all be durable before the same later step (a commit's manifest and
  commit object, before its ref moves): locally every temp file is written and fsynced,
  then renamed, then each distinct folder fsynced once, instead of a folder fsync after
  each object.
- ``append`` adds a line to a log (reflogs); ``append_many`` (optional; :func:`append_many`
  is the default) adds lines to several logs, all durable when it returns. Backends without appends emulate it with
  ``compare_and_swap`` of the whole object.
- ``lock`` is the repository's advisory reader/writer lock (gc and repair hold it
  exclusively). Only backends with ``Capabilities.advisory_locks`` offer it.

Errors: a missing key raises :class:`KeyMissing` (a ``FileNotFoundError``, so existing
``except FileNotFoundError`` paths keep working); a lost compare-and-swap raises
:class:`ConcurrentUpdate`; every other failure raises an ``OSError`` with an errno (ENOSPC,
EIO, EACCES...) that the layers above turn into one clear ``StorageError`` line. A key that
holds something no reader may trust (locally: a symbolic link, a FIFO, a device; anywhere:
an object larger than a read's ``max_size``) raises ``ckptvcs.errors.CorruptObjectError``
naming the key, never its content. A backend never returns data it did not read: a ranged
read returns fewer bytes than asked only where the object ends, and callers check the count
(a truncated pack is damage that fsck names, not an I/O error).

Keys are checked by :func:`check_key` before any I/O: relative, ``/``-separated, no empty,
``.`` or ``..`` component, no backslash or NUL. A bad key is a programming error
(ValueError): the layers above build keys from validated names (``ckptvcs.layout``).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


def check_key(key: str) -> str:
    """``key`` if it is a valid key (see the module docstring), else ValueError."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}: a key is a relative POSIX path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: empty, '.' or '..' component")
    return key


def check_prefix(prefix: str) -> str:
    """A ``list`` prefix: "" (everything) or a folder key, returned without a trailing ``/``."""
    if prefix == "":
        return prefix
    return check_key(prefix.removesuffix("/"))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise; the layers above choose their strategy from it.

    atomic_rename: a put/commit becomes visible whole through a rename (POSIX); object
        stores publish whole objects natively and say False.
    fsync: durability is reached by fsync (files and folders); False where the service
        acknowledges a write only once it is durable.
    conditional_put: compare_and_swap and put(if_absent=True) are native and safe between
        machines (S3 If-Match / If-None-Match). Local directories implement them with lock
        files, safe between processes on one host only.
    advisory_locks: ``lock()`` works (flock on a local file system). Object stores have no
        locks; maintenance there relies on conditional puts and grace periods instead.
    local_path: keys are files under ``local_root()``, so LMDB and mmap may be used on them.
    appends: ``append`` is native (O_APPEND + fsync); otherwise it is emulated by
        read-modify-compare-and-swap, correct but O(size) per line.
    """

    atomic_rename: bool
    fsync: bool
    conditional_put: bool
    advisory_locks: bool
    local_path: bool
    appends: bool


class KeyMissing(FileNotFoundError):
    """The key does not exist (or was deleted). Subclasses FileNotFoundError on purpose."""

    def __init__(self, key: str) -> None:
        super().__init__(errno.ENOENT, "no such key", key)
        self.key = key


class ConcurrentUpdate(OSError):
    """compare_and_swap found another value than the expected one.

    ``current`` holds what the key holds now (None: absent), so a caller can report or retry.
    """

    def __init__(self, key: str, current: bytes | None) -> None:
        super().__init__(errno.EAGAIN, "the key was changed by someone else", key)
        self.key = key
        self.current = current


class RangeReader(Protocol):
    """An open, immutable object read by ranges (a pack)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, fewer only where the object ends (callers check)."""
        ...

    def readinto(self, buffers: list[bytearray | memoryview], offset: int) -> int:
        """Fill the buffers in order from ``offset`` (one preadv locally, no copy); returns
        the bytes read, fewer than the buffers hold only where the object ends."""
        ...

    def close(self) -> None: ...


class ObjectWriter(Protocol):
    """A streamed immutable object: invisible until ``commit``, gone after ``abort``."""

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self) -> None:
        """Make everything written durable and visible under the key, atomically."""
        ...

    def abort(self) -> None:
        """Drop what was written; the key is untouched. Safe to call twice or after a failure."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Durable storage for one repository; see the module docstring for the contract."""

    capabilities: Capabilities

    def describe(self) -> str:
        """Where this backend stores (a path or URL), for messages."""
        ...

    def local_root(self) -> Path | None:
        """The directory holding the keys as files, or None (not a local file system)."""
        ...

    # Reads
    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        """The whole object. Larger than ``max_size``: CorruptObjectError naming the key."""
        ...

    def open_reader(self, key: str) -> RangeReader: ...

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every committed key under ``prefix`` (a folder, "" for all), sorted; never
        temporaries or half-written objects."""
        ...

    # Writes
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store ``data`` atomically and durably. ``if_absent``: leave an existing key as it
        is and return False (content-addressed keys hold the same bytes anyway)."""
        ...

    def open_writer(self, key: str) -> ObjectWriter: ...

    def delete(self, key: str) -> bool:
        """Remove the key durably; False when it did not exist."""
        ...

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove several keys durably (locally: one folder fsync at the end, not one per
        key); returns how many existed. gc deletes packs with it."""
        ...

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        """Replace the key's value by ``new`` (None: delete) only if it still holds
        ``expected`` (None: absent); otherwise raise :class:`ConcurrentUpdate`."""
        ...

    def append(self, key: str, data: bytes) -> None:
        """Append ``data`` durably (creating the key); a crash keeps a prefix of whole appends."""
        ...

    def lock(self, name: str, *, exclusive: bool, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Hold the named advisory lock (shared or exclusive) for the block.

        Raises ``NotImplementedError`` where ``capabilities.advisory_locks`` is False."""
        ...


def put_many(backend: Backend, items: Sequence[tuple[str, bytes]]) -> list[bool]:
    """Store immutable objects as ``put(key, data, if_absent=True)`` does each, all durable
    when this returns; per item, whether it was written (False: the key existed).

    Uses the backend's own ``put_many`` where its class defines one (LocalBackend batches
    the fsyncs; FaultyBackend injects faults into it), else one ``put`` per item. The
    method is looked up on the class, not the instance, so a wrapper that forwards unknown
    attributes to the backend it wraps (a test spy) never bypasses its own ``put``. A
    failure may leave some items stored: each whole (never torn), none named by anything
    yet, so garbage for gc.
    """
    method = getattr(type(backend), "put_many", None)
    if method is not None:
        return list(method(backend, items))
    return [backend.put(key, data, if_absent=True) for key, data in items]


def append_many(backend: Backend, appends: Sequence[tuple[str, bytes]]) -> None:
    """``append(key, data)`` for each item, all durable when this returns (a branch's and
    HEAD's reflog lines of one commit). The backend's own ``append_many`` where its class
    defines one (LocalBackend: every line written, then every file fsynced), else one
    ``append`` per item, in order."""
    method = getattr(type(backend), "append_many", None)
    if method is not None:
        method(backend, appends)
        return
    for key, data in appends:
        backend.append(key, data)


@runtime_checkable
class FolderTokens(Protocol):
    """An optional extension of :class:`Backend`: cheap change tokens for folders.

    ``Repo.stats()`` sums the bytes under ``objects/`` and ``packs/``; listing 10,000 keys
    for that on every call is what made it linear in the history. A backend that can tell
    cheaply whether a folder's entries changed offers these two methods; one that cannot
    (memory, fsspec) does not, and callers then list every time (:func:`folder_tokens_of`
    returns None): the safe default.

    ``folder_tokens(parent, names)``: for each folder ``parent/name`` (``parent`` "" for
    the top level), a string that changes whenever an entry directly inside it is added,
    removed, renamed or replaced, or None when the backend cannot promise that for that
    folder now (absent, not a folder, or changed too recently for its clock granularity
    to tell). Equal tokens mean the same direct entries, never the same bytes inside each
    file: objects and packs are never rewritten in place (they are replaced by a rename,
    which changes the token). Batched: stats() asks for one token per fan-out folder.

    ``list_folder(prefix)``: ``(files, folders)`` directly inside the folder: ``(name,
    size)`` of every entry that ``list`` would name (temporaries and lock files left out),
    and the names of the sub-folders ``list`` walks into; both empty when it is absent.
    """

    def folder_tokens(self, parent: str, names: list[str]) -> list[str | None]: ...

    def list_folder(self, prefix: str) -> tuple[list[tuple[str, int]], list[str]]: ...


def folder_tokens_of(backend: object) -> FolderTokens | None:
    """``backend`` where it offers :class:`FolderTokens` (a wrapper forwarding to one does), else None."""
    return backend if isinstance(backend, FolderTokens) else None

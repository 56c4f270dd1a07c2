"""The chunk index: an LMDB map from chunk id to its place in a pack.

The index is derived data: everything in it can be rebuilt from the packs, whose
entries describe themselves. Values are small fixed-size records. Write transactions
are short and hold no hashing or compression; a full map is grown outside the
transaction and the write retried. One LMDB environment per process and path, never
used across fork (LMDB's rule), which the Repo enforces.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import lmdb

from . import _fs
from .errors import CorruptObjectError, ForkedRepoError, StorageError
from .pack import PackEntry

__all__ = ["ChunkIndex"]

_VALUE = struct.Struct("<16sQIIB")  # pack id, payload offset, stored length, raw length, codec
_BASE_ID_SIZE = 32  # a delta chunk's value is followed by its base chunk id
_INITIAL_MAP_SIZE = 256 << 20
_MAX_MAP_SIZE = 1 << 40

_T = TypeVar("_T")

_registry_lock = threading.Lock()
# (pid, real path) → [environment, number of open ChunkIndex objects using it]
_registry: dict[tuple[int, str], list] = {}


def _acquire_environment(path: Path, map_size: int) -> lmdb.Environment:
    """One shared environment per (process, real path); LMDB forbids opening twice."""
    real = os.path.realpath(path)
    key = (os.getpid(), real)
    with _registry_lock:
        slot = _registry.get(key)
        if slot is None and any(p != key[0] and r == real for p, r in _registry):
            # LMDB (and py-lmdb, which refuses outright) cannot open an environment a
            # parent process had open before fork; closing the inherited handle here
            # would drop the parent's reader locks, so refuse clearly instead.
            raise ForkedRepoError(
                f"this process was forked from one that has {path.parent} open, and LMDB cannot "
                "open it again here; start workers with the 'spawn' method, or open the "
                "repository in the parent only after forking"
            )
        if slot is None:
            env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=2,
                max_readers=256,
                subdir=True,
                sync=True,
                metasync=True,
                readahead=False,
                writemap=False,
            )
            env.reader_check()  # clear reader slots left by dead processes
            slot = _registry[key] = [env, 0]
        slot[1] += 1
        return slot[0]


def _release_environment(path: Path) -> None:
    key = (os.getpid(), os.path.realpath(path))
    with _registry_lock:
        slot = _registry.get(key)
        if slot is not None:
            slot[1] -= 1
            if slot[1] <= 0:
                del _registry[key]
                slot[0].close()


class ChunkIndex:
    """Chunk id (32 bytes) → :class:`PackEntry`, stored in LMDB."""

    def __init__(self, path: Path, map_size: int = _INITIAL_MAP_SIZE) -> None:
        self.path = path
        with _fs.storage_errors(f"opening the chunk index {path}"):
            try:
                self._env = _acquire_environment(path, map_size)
                self._db = self._env.open_db(b"chunks")
            except lmdb.Error as err:
                raise StorageError(f"opening the chunk index {path}: {err}") from None
        self._closed = False

    def close(self) -> None:
        """Release this process's use of the environment (closed with its last user)."""
        if not self._closed:
            self._closed = True
            _release_environment(self.path)

    @staticmethod
    def _decode(chunk_id: bytes, value: bytes) -> PackEntry:
        if len(value) not in (_VALUE.size, _VALUE.size + _BASE_ID_SIZE):
            raise CorruptObjectError(f"index entry for chunk {chunk_id.hex()} is malformed")
        pack, offset, stored_len, raw_len, codec = _VALUE.unpack_from(value)
        base = bytes(value[_VALUE.size :]) if len(value) > _VALUE.size else None
        return PackEntry(chunk_id, pack.hex(), offset, stored_len, raw_len, codec, base)

    def _run(self, op: Callable[[], _T]) -> _T:
        """Run an LMDB operation, growing the map or adopting another process's growth."""
        while True:
            try:
                return op()
            except lmdb.MapFullError:
                size = self._env.info()["map_size"]
                if size >= _MAX_MAP_SIZE:
                    raise StorageError(f"chunk index {self.path} reached {size} bytes") from None
                self._env.set_mapsize(size * 2)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
            except lmdb.Error as err:
                raise StorageError(f"chunk index {self.path}: {err}") from None

    def get(self, chunk_id: bytes) -> PackEntry | None:
        def op() -> PackEntry | None:
            with self._env.begin(db=self._db) as txn:
                value = txn.get(chunk_id)
            return None if value is None else self._decode(chunk_id, value)

        return self._run(op)

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        """The subset of ``chunk_ids`` the index does not hold, in one read transaction."""
        ids = list(chunk_ids)

        def op() -> set[bytes]:
            with self._env.begin(db=self._db) as txn:
                return {cid for cid in ids if txn.get(cid) is None}

        return self._run(op)

    def add(self, entries: Iterable[PackEntry]) -> None:
        """Insert entries of sealed packs in one short, synchronous write transaction."""
        rows = [(e.chunk_id, self._encode(e)) for e in entries]
        if not rows:
            return

        def op() -> None:
            with self._env.begin(db=self._db, write=True) as txn:
                for key, value in rows:
                    txn.put(key, value)

        self._run(op)

    def update(self, put: Iterable[PackEntry], remove: Iterable[PackEntry]) -> None:
        """In one write transaction: insert ``put``, and delete each entry of ``remove``
        whose stored value is still exactly that entry (gc moving or dropping chunks)."""
        rows = [(e.chunk_id, self._encode(e)) for e in put]
        drops = [(e.chunk_id, self._encode(e)) for e in remove]
        if not rows and not drops:
            return

        def op() -> None:
            with self._env.begin(db=self._db, write=True) as txn:
                for key, value in drops:
                    if txn.get(key) == value:
                        txn.delete(key)
                for key, value in rows:
                    txn.put(key, value)

        self._run(op)

    @staticmethod
    def _encode(e: PackEntry) -> bytes:
        """The stored value: the fixed record, then the base chunk id of a delta entry."""
        return _VALUE.pack(bytes.fromhex(e.pack), e.offset, e.stored_len, e.raw_len, e.codec) + (e.base or b"")

    def __iter__(self) -> Iterator[PackEntry]:
        with self._env.begin(db=self._db) as txn:
            for key, value in txn.cursor():
                yield self._decode(bytes(key), bytes(value))

    def __len__(self) -> int:
        with self._env.begin(db=self._db) as txn:
            return txn.stat(self._db)["entries"]

"""The chunk index: an LMDB map from chunk id to its place in a pack.

The index is derived data: everything in it can be rebuilt from the packs, whose
entries describe themselves. Values are small fixed-size records. Write transactions
are short and hold no hashing or compression; a full map is grown outside the
transaction and the write retried. One LMDB environment per process and path, never
used across fork (LMDB's rule), which the Repo enforces.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from . import _fs
from .errors import CorruptObjectError, ForkedRepoError, StorageError
from .pack import PackEntry

__all__ = ["ChunkIndex", "SessionLookups", "open_environment", "write_entries", "REBUILT_SUFFIX"]

_VALUE = struct.Struct("<16sQIIB")  # pack id, payload offset, stored length, raw length, codec
_BASE_ID_SIZE = 32  # a delta chunk's value is followed by its base chunk id
_INITIAL_MAP_SIZE = 256 << 20
_MAX_MAP_SIZE = 1 << 40

_T = TypeVar("_T")

_registry_lock = threading.Lock()
# (pid, real path, inode of data.mdb) → [environment, number of open ChunkIndex objects using it]
_registry: dict[tuple[int, str, int | None], list[Any]] = {}


_PACKS_DB = b"packs"  # the packs a cached index has read (stores without local files)

REBUILT_SUFFIX = ".rebuilt"  # a complete rebuilt index waiting to be swapped in (repair)


def _data_inode(path: Path) -> int | None:
    try:
        return os.stat(path / "data.mdb").st_ino
    except FileNotFoundError:
        return None


def _finish_interrupted_swap(path: Path) -> None:
    """Complete a ``repair index`` swap that a crash cut between its two renames.

    Only on filesystems without an atomic directory exchange: there ``index/`` is
    renamed away before the complete ``index.rebuilt/`` is renamed into its place.
    """
    rebuilt = path.with_name(path.name + REBUILT_SUFFIX)
    if not path.exists() and rebuilt.is_dir():
        with _fs.storage_errors(f"finishing the interrupted rebuild of {path}"):
            try:
                _fs.durable_rename(rebuilt, path)
            except FileNotFoundError:
                if not path.is_dir():
                    raise  # else another process finished it first


def _acquire_environment(path: Path, map_size: int) -> tuple[lmdb.Environment, tuple[int, str, int | None]]:
    """One shared environment per (process, real path, data file); LMDB forbids opening twice.

    The data file's inode is part of the key so that, once ``repair index`` has
    swapped in a rebuilt environment, handles that reopen get the new one.
    """
    real = os.path.realpath(path)
    with _registry_lock:
        _finish_interrupted_swap(path)
        key = (os.getpid(), real, _data_inode(path))
        slot = _registry.get(key)
        if slot is None and any(p != key[0] and r == real for p, r, _ in _registry):
            # LMDB (and py-lmdb, which refuses outright) cannot open an environment a
            # parent process had open before fork; closing the inherited handle here
            # would drop the parent's reader locks, so refuse clearly instead.
            raise ForkedRepoError(
                f"this process was forked from one that has {path.parent} open, and LMDB cannot "
                "open it again here; start workers with the 'spawn' method, or open the "
                "repository in the parent only after forking"
            )
        if slot is None:
            _check_files(path)
            if _writable(path):
                env = open_environment(path, map_size)
                env.reader_check()  # clear reader slots left by dead processes
            else:
                env = open_read_only(path)
            key = (key[0], real, _data_inode(path))  # created just now if it was missing
            slot = _registry.setdefault(key, [env, 0])
            if slot[0] is not env:
                env.close()
        slot[1] += 1
        return slot[0], key


def open_environment(path: Path, map_size: int | None = None) -> lmdb.Environment:
    """Open (creating if needed) the LMDB environment of a chunk index at ``path``."""
    return lmdb.open(
        str(path),
        map_size=map_size or _INITIAL_MAP_SIZE,
        max_dbs=2,
        max_readers=256,
        subdir=True,
        sync=True,
        metasync=True,
        readahead=False,
        writemap=False,
    )


def _writable(path: Path) -> bool:
    """Whether this process may write the index (False on a read-only mount, even for root)."""
    data = path / "data.mdb"
    if not path.exists():
        return True  # LMDB creates it (or reports why it cannot)
    return os.access(path, os.W_OK) and (not data.exists() or os.access(data, os.W_OK))


def _check_files(path: Path) -> None:
    """LMDB opens its files itself, following links and blocking on FIFOs: refuse those first."""
    for name in ("data.mdb", "lock.mdb"):
        try:
            mode = os.lstat(path / name).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise StorageError(
                f"chunk index file {path / name} is not a regular file (a link or special file); "
                "rebuild the index with `ckptvcs repair index`"
            )


def open_read_only(path: Path) -> lmdb.Environment:
    """Open an index that cannot be written (read-only mount, archived copy) for reading.

    Without LMDB's lock file (it cannot be created there): readers need none when no
    writer can exist, and a writer through another, writable path is not guarded.
    """
    return lmdb.open(str(path), readonly=True, lock=False, max_dbs=2, subdir=True, readahead=False)


def _release_environment(key: tuple[int, str, int | None]) -> None:
    with _registry_lock:
        slot = _registry.get(key)
        if slot is not None:
            slot[1] -= 1
            if slot[1] <= 0:
                del _registry[key]
                slot[0].close()


def encode_entry(entry: PackEntry) -> bytes:
    """The index value of a pack entry (docs/format.md, section 5.3): 33 bytes, followed
    by the 32-byte base chunk id for an entry that has one (delta codecs)."""
    value = _VALUE.pack(bytes.fromhex(entry.pack), entry.offset, entry.stored_len, entry.raw_len, entry.codec)
    return value + (entry.base or b"")


def write_entries(env: lmdb.Environment, entries: Iterable[PackEntry], batch: int = 10_000) -> int:
    """Fill the ``chunks`` database of a private environment (index rebuild).

    The first entry of a chunk wins (a chunk stored twice by racing writers is valid
    in either pack). Transactions hold ``batch`` rows; a full map is doubled and the
    batch retried. Returns the number of distinct chunks written.
    """
    db = env.open_db(b"chunks")
    written = 0
    rows: list[tuple[bytes, bytes]] = []

    def flush() -> int:
        while True:
            try:
                with env.begin(db=db, write=True) as txn:
                    return sum(txn.put(key, value, overwrite=False) for key, value in rows)
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)

    for entry in entries:
        rows.append((entry.chunk_id, encode_entry(entry)))
        if len(rows) >= batch:
            written += flush()
            rows.clear()
    if rows:
        written += flush()
    return written


class ChunkIndex:
    """Chunk id (32 bytes) → :class:`PackEntry`, stored in LMDB."""

    def __init__(self, path: Path, map_size: int | None = None) -> None:
        self.path = path
        self._map_size = map_size or _INITIAL_MAP_SIZE
        self._closed = True
        self._open()

    def _open(self) -> None:
        with _fs.storage_errors(f"opening the chunk index {self.path}"):
            try:
                self._env, self._key = _acquire_environment(self.path, self._map_size)
                self._closed = False
                self._db = self._env.open_db(b"chunks", create=not self._env.flags()["readonly"])
                self._packs_db: Any = None
            except lmdb.Error as err:
                self.close()
                raise StorageError(
                    f"opening the chunk index {self.path}: {err}; rebuild it with `ckptvcs repair index`"
                ) from None

    def close(self) -> None:
        """Release this process's use of the environment (closed with its last user)."""
        if not self._closed:
            self._closed = True
            _release_environment(self._key)

    def refresh(self) -> bool:
        """Reopen if ``repair index`` replaced the environment since it was opened.

        Writers call this under the shared repository lock (which repair excludes), so
        they never add entries to, or trust the answers of, an index that was swapped
        out. Returns True when it reopened.
        """
        if self._closed or _data_inode(self.path) == self._key[2]:
            return False
        self.close()
        self._open()
        return True

    @staticmethod
    def _decode(chunk_id: bytes, value: bytes) -> PackEntry:
        if len(value) not in (_VALUE.size, _VALUE.size + _BASE_ID_SIZE):
            raise CorruptObjectError(f"index entry for chunk {chunk_id.hex()} is malformed", chunk_id=chunk_id.hex())
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
                raise StorageError(f"chunk index {self.path}: {_write_failure(err, self.path)}") from None

    def get(self, chunk_id: bytes) -> PackEntry | None:
        def op() -> PackEntry | None:
            with self._env.begin(db=self._db) as txn:
                value = txn.get(chunk_id)
            return None if value is None else self._decode(chunk_id, value)

        return self._run(op)

    def get_many(self, chunk_ids: Iterable[bytes], *, base_levels: int = 0) -> dict[bytes, PackEntry]:
        """The entries of those ``chunk_ids`` the index holds, in one read transaction.

        With ``base_levels`` the delta bases they name, and theirs, down that many levels
        of each chain, are looked up in the same transaction: a load of many chunks asks
        LMDB once, not once per chunk and chain level (a transaction costs more than the
        look-up).
        """
        pending = list(dict.fromkeys(chunk_ids))

        def op() -> dict[bytes, PackEntry]:
            found: dict[bytes, PackEntry] = {}
            with self._env.begin(db=self._db) as txn:
                todo = pending
                for _ in range(base_levels + 1):
                    bases: list[bytes] = []
                    for cid in todo:
                        value = txn.get(cid)
                        if value is not None:
                            entry = found[cid] = self._decode(cid, value)
                            if entry.base is not None and entry.base not in found:
                                bases.append(entry.base)
                    todo = list(dict.fromkeys(bases))
                    if not todo:
                        break
            return found

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
        rows = [(e.chunk_id, encode_entry(e)) for e in entries]
        if not rows:
            return

        def op() -> None:
            with self._env.begin(db=self._db, write=True) as txn:
                for key, value in rows:
                    txn.put(key, value)

        self._run(op)

    # -- the packs a cached index has read (stores without local files, index_cache.py) --

    def _packs(self) -> Any:
        """The ``packs`` database: pack id → b"1" for each pack whose entries are indexed."""
        if self._packs_db is None:
            self._packs_db = self._run(lambda: self._env.open_db(_PACKS_DB, create=True))
        return self._packs_db

    def indexed_packs(self) -> set[str]:
        """The packs recorded as indexed (by :meth:`add_pack`)."""
        db = self._packs()

        def op() -> set[str]:
            with self._env.begin(db=db) as txn:
                return {bytes(key).hex() for key, _ in txn.cursor()}

        return self._run(op)

    def add_pack(self, pack: str, entries: Iterable[PackEntry], *, replace: bool = False) -> int:
        """Insert a pack's entries and record the pack as indexed, in one write transaction.

        ``replace``: rows of chunks already indexed are replaced (a writer's own new
        pack, as :meth:`add`); otherwise they keep their row (the first pack indexed
        wins, as in a rebuild). Returns the number of rows written.
        """
        rows = [(e.chunk_id, encode_entry(e)) for e in entries]
        packs = self._packs()

        def op() -> int:
            with self._env.begin(write=True) as txn:
                added = sum(txn.put(key, value, overwrite=replace, db=self._db) for key, value in rows)
                txn.put(bytes.fromhex(pack), b"1", db=packs)
                return added

        return self._run(op)

    def drop_packs(self, gone: set[str]) -> set[bytes]:
        """Forget packs that no longer exist: their record and every row naming them, in one
        write transaction (one pass over the rows). Returns the chunk ids whose row went."""
        ids = {bytes.fromhex(p) for p in gone}
        packs = self._packs()
        if not ids:
            return set()

        def op() -> set[bytes]:
            dropped = set()
            with self._env.begin(write=True) as txn:
                cursor = txn.cursor(db=self._db)
                for key, value in cursor:
                    if bytes(value[:16]) in ids:
                        dropped.add(bytes(key))
                for key in dropped:
                    txn.delete(key, db=self._db)
                for pack_id in ids:
                    txn.delete(pack_id, db=packs)
            return dropped

        return self._run(op)

    def map_size(self) -> int:
        """The current size of the LMDB map (grown on demand)."""
        return self._env.info()["map_size"]

    def update(self, put: Iterable[PackEntry], remove: Iterable[PackEntry]) -> None:
        """In one write transaction: insert ``put``, and delete each entry of ``remove``
        whose stored value is still exactly that entry (gc moving or dropping chunks)."""
        rows = [(e.chunk_id, encode_entry(e)) for e in put]
        drops = [(e.chunk_id, encode_entry(e)) for e in remove]
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

    def __iter__(self) -> Iterator[PackEntry]:
        try:
            with self._env.begin(db=self._db) as txn:
                for key, value in txn.cursor():
                    yield self._decode(bytes(key), bytes(value))
        except lmdb.Error as err:
            raise StorageError(
                f"chunk index {self.path}: {err}; rebuild it with `ckptvcs repair index`"
            ) from None

    def __len__(self) -> int:
        def op() -> int:
            with self._env.begin(db=self._db) as txn:
                return txn.stat(self._db)["entries"]

        return self._run(op)


class SessionLookups:
    """The index look-ups of one write session through one read transaction.

    A commit asks the index ~3 times per chunk (its dedup check, its delta base and that
    base's chain, the base again when it is read), one LMDB read transaction each
    before. This opens one read transaction on first use and keeps it, shared by the
    session's pool threads under a lock, and remembers every entry found.

    Sound only while the caller holds the repository lock shared, from before the first
    look-up until its ref has moved: rows are removed only by gc and ``repair index``,
    which hold it exclusively, so every entry found stays true for the whole session.
    A row added meanwhile by another writer may be missed (the read transaction is a
    snapshot): the chunk is then stored again, which is valid (the index keeps one of the
    two copies). :meth:`reset` before this process writes the index (a write may grow
    the map, which LMDB allows only with no read transaction open in the process).
    """

    def __init__(self, index: ChunkIndex) -> None:
        self._index = index
        self._lock = threading.Lock()
        self._txn: Any = None
        self._found: dict[bytes, PackEntry] = {}
        self.transactions = 0  # read transactions begun (tests, benchmarks)

    def get(self, chunk_id: bytes) -> PackEntry | None:
        entry = self._found.get(chunk_id)
        if entry is not None:
            return entry
        value = self._index._run(lambda: self._read(chunk_id))
        if value is None:
            return None
        entry = self._index._decode(chunk_id, value)
        self._found[chunk_id] = entry
        return entry

    def _read(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            if self._txn is None:
                self._txn = self._index._env.begin(db=self._index._db)
                self.transactions += 1
            value = self._txn.get(chunk_id)
            return None if value is None else bytes(value)

    def reset(self) -> None:
        """End the read transaction (the entries found stay remembered)."""
        with self._lock:
            txn, self._txn = self._txn, None
        if txn is not None:
            txn.abort()

    close = reset


def _write_failure(err: lmdb.Error, path: Path) -> str:
    """LMDB's message, or "disk full" when that is what happened: LMDB reports a write that
    found no space as ENOSPC (DiskError) but a short write as EIO ("Input/output error")."""
    if isinstance(err, lmdb.DiskError) or ("Input/output error" in str(err) and _nearly_full(path)):
        return f"disk full ({err}); free space and retry (nothing was left half-written)"
    return str(err)


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


_NEARLY_FULL_BYTES = 1 << 20

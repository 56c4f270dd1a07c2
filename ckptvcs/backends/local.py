"""LocalBackend: a repository in a local directory, with today's durability protocol.

Every operation is one of the primitives of :mod:`ckptvcs._fs` (this backend's private
helper module), so the fsync rules are exactly those of docs/durability.md: a put is
temp file, fsync, rename, fsync of the folder; a new folder's entry is fsynced in its
parent; a compare-and-swap is a git-style lock file (``<key>.lock``) renamed over the
key; an append is one O_APPEND write and an fsync; the repository lock is a flock.

A repository is untrusted input, so every key is checked on its way down
(:func:`_fs.check_inside`: no folder on the way may be a link or a special file) and
every read opens a regular file only, never through a final link, never blocking
(:func:`_fs.open_regular`). The fault tests' seams (``_fs._write``, ``_fs._fsync``,
``_fs._replace``, ``_fs._pread``, ``_fs._preadv``) stay where they were.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .. import _fs
from ..errors import CorruptObjectError
from .base import Capabilities, ConcurrentUpdate, KeyMissing, check_key, check_prefix

__all__ = ["LocalBackend", "LocalRangeReader", "LocalObjectWriter"]

_TMP_FOLDER = "tmp"  # where streamed objects are written before they are renamed into place
_TEMPORARY = re.compile(r"[0-9]+-[0-9a-f]{12}\.tmp$")  # the tail of every _fs.temp_name
_LOCK_SUFFIX = ".lock"
_MAX_CAS_VALUE = 1 << 20  # a compare-and-swap key holds a small value (a ref: at most 4 KiB)
# Object and pack data is read through _fs's ``_pread`` seam (the fault tests fail it);
# refs, reflogs and records are read outside it, as before the seam existed.
_DATA_PREFIXES = ("objects/", "packs/")
# A folder token is given only for a folder unchanged for this long (seconds, by this
# machine's clock): a change within one tick of a coarse file system clock (FAT: 2 s, ext3
# and many network file systems: 1 s) leaves the folder's times as they were, so a token
# taken in the same tick could match a folder that changed after it was listed.
TOKEN_MIN_AGE = 5.0
_folder_stat = os.lstat  # the seam the coarse-clock tests replace


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder itself (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class LocalRangeReader:
    """A sealed file read by ranges through pread/preadv (one syscall per read).

    ``seam``: read through _fs's fault-injection seam (``_fs._pread``/``_fs._preadv``),
    as chunk and object data always were; False for walks over pack headers, which the
    fault tests leave alone (fsck then tells unreadable data from missing chunks).
    """

    def __init__(self, fd: int, key: str, *, seam: bool = True) -> None:
        self._fd = fd
        self.key = key
        self._size = os.fstat(fd).st_size
        self._pread = _fs.pread if seam else _plain_pread

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        return self._pread(self._fd, size, offset)

    def readinto(self, buffers: list[bytearray | memoryview], offset: int) -> int:
        return _fs.preadv(self._fd, buffers, offset)

    def fileno(self) -> int:
        """The open descriptor (local only: salvage scans map the file)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _plain_pread(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset)


class LocalObjectWriter:
    """A file under ``tmp/``, renamed to its key at :meth:`commit` (fsync, rename, fsync dir).

    Disk writes overlap the writer's work through :class:`_fs.EarlyWriteback`; its errors
    surface at commit, which is the durability point.
    """

    def __init__(self, backend: LocalBackend, key: str) -> None:
        self._final = backend._path(key)
        tmp_dir = backend.root / _TMP_FOLDER
        if not tmp_dir.is_dir():  # a copy of the store that dropped empty folders (git keeps none)
            _fs.make_dirs(tmp_dir)
        stem = self._final.name.removesuffix(".pack")
        kind = key.split("/", 1)[0].removesuffix("s")
        self.tmp_path = tmp_dir / _fs.temp_name(f"{kind}-{stem}-")
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._writeback = _fs.EarlyWriteback(self._fd)
        self._backend = backend
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        _fs.write_all(self._fd, data)
        self.size += len(data)
        self._writeback.wrote(self.size)

    def commit(self) -> None:
        self._writeback.finish()
        _fs.fsync_file(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._backend._prepare_parent(self._final)
        _fs.durable_rename(self.tmp_path, self._final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writeback.finish()  # the object is dropped: its flush errors no longer matter
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


class LocalBackend:
    """Keys as files under ``root`` (see the module docstring).

    ``cas_timeout``: how long a compare-and-swap waits for a ref lock held by a live
    process before LockTimeoutError names the holder.
    """

    capabilities = Capabilities(
        atomic_rename=True, fsync=True, conditional_put=True, advisory_locks=True, local_path=True, appends=True
    )

    def __init__(self, root: str | os.PathLike[str], *, cas_timeout: float = 30.0) -> None:
        self.root = Path(root)
        self.cas_timeout = cas_timeout
        self._root_text = str(self.root)
        self._checked_data_folders: set[str] = set()  # see _read_path
        self._token_paths: dict[str, str] = {}  # see folder_tokens

    def describe(self) -> str:
        return str(self.root)

    def local_root(self) -> Path | None:
        return self.root

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        """The file of ``key``; no folder on its way is a link or a special file."""
        path = self.root / check_key(key)
        _fs.check_inside(self.root, path)
        return path

    def _read_path(self, key: str) -> str:
        """The file of ``key`` for a read; the folders on its way are checked as in :meth:`_path`.

        A data folder (``objects/xx``, ``packs``) found sound is remembered for this handle
        and not checked again: a catalog query reads 10,000 commit objects from 256
        folders, and the checks (two lstats and path handling per read) were most of its
        time. Only data is read this way: every object and chunk is verified against its
        BLAKE3 id after the read, so a folder swapped for a link later could not pass off
        other bytes; refs, reflogs and records are checked on every read.
        """
        check_key(key)
        folder = key.rpartition("/")[0]
        if folder not in self._checked_data_folders:
            path = self.root / key
            _fs.check_inside(self.root, path)
            if key.startswith(_DATA_PREFIXES) and _is_folder(path.parent):
                self._checked_data_folders.add(folder)
        return os.path.join(self._root_text, key)

    def _prepare_parent(self, path: Path) -> None:
        """Create the folders on the way to ``path`` durably, then check again that none is a
        link (one could have slipped in while they were made)."""
        if not path.parent.is_dir():
            _fs.make_dirs(path.parent)
            _fs.check_inside(self.root, path)

    # -- reads -----------------------------------------------------------------------

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        path = self._read_path(key)
        read = _fs.read_file if key.startswith(_DATA_PREFIXES) else _fs.read_record
        try:
            return read(path, max_size)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(key) from None

    def open_reader(self, key: str) -> LocalRangeReader:
        path = self._read_path(key)
        try:
            fd = _fs.open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(key) from None
        try:
            return LocalRangeReader(fd, key)
        except BaseException:
            os.close(fd)
            raise

    def size(self, key: str) -> int | None:
        """The size of what the key names (a link's own size: it exists, reading refuses it)."""
        try:
            info = os.lstat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if stat.S_ISDIR(info.st_mode) else info.st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every entry that is not a folder under ``prefix``, sorted; temporaries (``*.tmp``
        names made by ``_fs.temp_name``) and lock files (``*.lock``) left out. Links to
        files and special files are listed (reading them is refused with
        CorruptObjectError, which names them); links to folders are neither listed nor
        followed (os.walk)."""
        prefix = check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if prefix:
            _fs.check_inside(self.root, base / "x")
        found: builtins.list[str] = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            folder = "" if rel == "." else rel + "/"
            found.extend(folder + f for f in files if not (f.endswith(_LOCK_SUFFIX) or _TEMPORARY.search(f)))
        return iter(sorted(found))

    # -- folder tokens (backends.base.FolderTokens) ------------------------------------

    def folder_tokens(self, parent: str, names: builtins.list[str]) -> builtins.list[str | None]:
        """Each folder's inode, modification and change times (ns, hex): any entry
        added, removed or renamed in it moves its mtime and ctime (and a program can set
        mtime back, never ctime). None for a folder changed less than ``TOKEN_MIN_AGE``
        seconds ago, absent, or not a folder (a link to one is never walked).

        One open of ``parent`` and an ``lstat`` relative to it per name (stats() asks for
        257 tokens per call); the folders on the way to ``parent`` are checked once per
        handle, and each folder itself is lstat'ed every time, so a link in its place
        gives None (it is then listed, and refused)."""
        path = self._token_paths.get(parent)
        try:
            if path is None:
                checked = check_prefix(parent)
                if checked:
                    _fs.check_inside(self.root, self.root / checked / "x")
                path = self._token_paths[parent] = os.path.join(self._root_text, checked) if checked else self._root_text
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except (OSError, CorruptObjectError):
            return [None] * len(names)
        oldest = time.time_ns() - int(TOKEN_MIN_AGE * 1e9)
        tokens: builtins.list[str | None] = []
        append, lstat, is_dir = tokens.append, _folder_stat, stat.S_ISDIR
        try:
            if "/" in "".join(names) or not {"", ".", ".."}.isdisjoint(names):
                raise ValueError(f"invalid folder name among {names!r}")
            for name in names:
                try:
                    info = lstat(name, dir_fd=fd)
                except OSError:
                    append(None)
                    continue
                mtime, ctime = info.st_mtime_ns, info.st_ctime_ns
                if mtime > oldest or ctime > oldest or not is_dir(info.st_mode):
                    append(None)
                else:
                    append(f"{info.st_ino:x}:{mtime:x}:{ctime:x}")
        finally:
            os.close(fd)
        return tokens

    def list_folder(self, prefix: str) -> tuple[builtins.list[tuple[str, int]], builtins.list[str]]:
        """What :meth:`list` finds directly inside the folder: its files with their sizes
        (a link's own size, as :meth:`size` gives) and the folders it would walk into."""
        prefix = check_prefix(prefix)
        path = self.root / prefix if prefix else self.root
        files: builtins.list[tuple[str, int]] = []
        folders: builtins.list[str] = []
        try:
            if prefix:
                _fs.check_inside(self.root, path / "x")
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir():  # as os.walk: a link to a folder is neither listed nor walked
                        if not entry.is_symlink():
                            folders.append(entry.name)
                    elif not (entry.name.endswith(_LOCK_SUFFIX) or _TEMPORARY.search(entry.name)):
                        with contextlib.suppress(FileNotFoundError):
                            files.append((entry.name, entry.stat(follow_symlinks=False).st_size))
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return sorted(files), sorted(folders)

    # -- writes ----------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        if if_absent and os.path.lexists(path):
            return False
        self._prepare_parent(path)
        return _fs.atomic_write(path, data, exclusive=if_absent)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> builtins.list[bool]:
        """``put(key, data, if_absent=True)`` for each item, made durable together.

        Order: every new object's temp file (beside its key) is written and fsynced; then
        each is renamed into place, in the order given; then each distinct folder is
        fsynced once, the folder of an object found already stored included (its writer
        may not have fsynced that folder yet). Folders created on the way have their own
        entries fsynced in their parents first (``_fs.make_dirs``). When this returns,
        every object is durable; a crash before leaves each object whole or absent.
        """
        written: builtins.list[bool] = []
        folders: builtins.list[Path] = []
        pending: builtins.list[tuple[Path, Path]] = []  # (temp file, final path), fsynced
        try:
            for key, data in items:
                path = self._path(key)
                folders.append(path.parent)
                if os.path.lexists(path):
                    written.append(False)
                    continue
                self._prepare_parent(path)
                tmp = path.with_name(_fs.temp_name("." + path.name + "."))
                _fs.write_synced(tmp, data)
                pending.append((tmp, path))
                written.append(True)
            while pending:
                tmp, path = pending[0]
                _fs._replace(tmp, path)
                pending.pop(0)
        finally:
            for tmp, _ in pending:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        _fs.fsync_dirs(folders)
        return written

    def open_writer(self, key: str) -> LocalObjectWriter:
        return LocalObjectWriter(self, key)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        _fs.fsync_dir(path.parent)
        return True

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete several keys, fsyncing each folder once at the end; returns how many existed."""
        folders: set[Path] = set()
        removed = 0
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            removed += 1
            folders.add(path.parent)
        for folder in sorted(folders):
            _fs.fsync_dir(folder)
        return removed

    def _current(self, path: Path) -> bytes | None:
        """The value a compare-and-swap compares (a folder in the key's place reads as absent)."""
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return None
            return _fs.read_record(path, _MAX_CAS_VALUE)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        path = self._path(key)
        if new is not None:
            self._prepare_parent(path)
        with _fs.RefLock(path, self.cas_timeout) as lock:
            current = self._current(path)
            if current != expected:
                raise ConcurrentUpdate(key, current)
            if new is not None:
                lock.commit(new)
            elif current is not None:
                os.unlink(path)
                _fs.fsync_dir(path.parent)

    def append(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._prepare_parent(path)
        _fs.append_durably(path, data)

    def append_many(self, appends: Sequence[tuple[str, bytes]]) -> None:
        """``append`` of each ``(key, data)``, made durable together: every line is written,
        then every file fsynced (``_fs.append_lines_durably``); durable when it returns."""
        paths = []
        for key, data in appends:
            path = self._path(key)
            self._prepare_parent(path)
            paths.append((path, data))
        _fs.append_lines_durably(paths)

    def lock(self, name: str, *, exclusive: bool, timeout: float) -> contextlib.AbstractContextManager[None]:
        path = self._path(name)
        self._prepare_parent(path)  # a lock in a folder not made yet (audit/lock)
        return _fs.RepoLock(path).hold(exclusive=exclusive, timeout=timeout)

    # -- local extras (not in the protocol) ---------------------------------------------

    def path(self, key: str) -> Path:
        """The file a key is stored in (for messages and LMDB); checked like every key."""
        return self._path(key)


"""The one module that makes bytes durable: fsync, atomic rename, lock files.

Everything that must survive a crash goes through here, so the durability protocol
lives in one place and fault-injection tests can swap the primitives below
(``fsync``, ``replace``, ``write``) for failing ones. A failed fsync is a failure:
nothing here retries it (after an fsync error the page cache may already have dropped
the dirty pages, so a second fsync that "succeeds" proves nothing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import CorruptObjectError, LockTimeoutError, StorageError

__all__ = [
    "storage_errors",
    "fsync_file",
    "fsync_dir",
    "write_all",
    "make_dirs",
    "atomic_write",
    "atomic_file",
    "append_durably",
    "append_lines_durably",
    "durable_rename",
    "write_synced",
    "fsync_dirs",
    "RefLock",
    "lock_file_is_stale",
    "RepoLock",
    "flock_within",
    "temp_name",
    "EarlyWriteback",
    "pread",
    "preadv",
    "read_file",
    "open_regular",
    "read_record",
    "check_inside",
    "exchange_directories",
    "remove_tree",
]

# Primitives, looked up at call time so tests can replace them (fault injection:
# failing writes, fsyncs, renames, ENOSPC, and EIO on reads).
_fsync = os.fsync
_replace = os.replace
_write = os.write
_pread = os.pread
_preadv = os.preadv
_RENAME_EXCHANGE = 2  # linux/fs.h


def _describe(err: OSError, what: str) -> str:
    if err.errno == errno.ENOSPC:
        # Not "unchanged": a fault after a commit point (the ref rename) leaves the new,
        # complete commit in place. What is true at every step: nothing is half-written.
        return f"disk full while {what}; free space and retry (nothing was left half-written)"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded while {what}; nothing was left half-written"
    if err.errno == errno.EIO:
        return f"I/O error while {what}: the disk reported a failure"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied while {what}: {err.strerror}"
    return f"{err.strerror or err} while {what}"


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn an OSError raised inside the block into a one-line StorageError."""
    try:
        yield
    except OSError as err:
        raise StorageError(_describe(err, what)) from err


def temp_name(prefix: str = "") -> str:
    """A file name no other process or thread will pick: pid plus random bits."""
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"


def fsync_file(fd: int) -> None:
    """fsync a file descriptor; any error propagates (never retried)."""
    _fsync(fd)


class EarlyWriteback:
    """Flushes a growing file to disk in the background while its writer keeps writing.

    A pack is written in one pass and fsynced when sealed; without help, the whole
    file's dirty pages reach the disk only in that final fsync, after all the encoding
    work is done. Every ``step`` bytes this starts an fsync on a background thread
    (one at a time), so disk writes overlap the encoding and the final fsync has little
    left. It is *not* a durability point: :func:`fsync_file` at seal time still is.
    An error from a background fsync is kept and raised by :meth:`finish` (the kernel
    may report a writeback error only once).
    """

    def __init__(self, fd: int, step: int = 32 << 20) -> None:
        self._fd = fd
        self._step = step
        self._next = step
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def wrote(self, size: int) -> None:
        """Tell how many bytes the file holds now; may start a background fsync."""
        if size < self._next or (self._thread is not None and self._thread.is_alive()):
            return
        self._next = size + self._step
        self._thread = threading.Thread(target=self._flush, name="ckptvcs-writeback", daemon=True)
        self._thread.start()

    def _flush(self) -> None:
        try:
            _fsync(self._fd)
        except BaseException as err:  # kept for finish(): never lost, never retried
            self._error = err

    def finish(self) -> None:
        """Wait for the background fsync; raise the error it met, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """``mkdir -p``, durably: each folder created has its entry fsynced in its parent.

    A ref or reflog written into a new nested folder (``refs/heads/team/x``) is only
    durable once every new folder on its way is. A folder that exists already (or that
    another process creates meanwhile) gets its parent fsynced too when it was missing
    at the start: its creator may not have synced it yet.
    """
    missing = []
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise
        fsync_dir(folder.parent)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write fewer than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = _write(fd, view)
        view = view[written:]


def pread(fd: int, size: int, offset: int) -> bytes:
    """Read up to ``size`` bytes at ``offset`` (pack payloads); errors propagate."""
    return _pread(fd, size, offset)


def preadv(fd: int, buffers: list[bytearray | memoryview], offset: int) -> int:
    """Scatter-read at ``offset`` straight into ``buffers``; returns the bytes read."""
    return _preadv(fd, buffers, offset)


_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike[str], max_size: int | None = None) -> int:
    """Open a repository file for reading: a regular file only, never through a final symlink.

    A repository is untrusted input: a FIFO would block the open or the read forever, a
    device (``/dev/zero``) would never end, and a symbolic link could lead out of the
    repository. So the open does not follow a final link and does not block, and
    anything but a regular file (or one larger than ``max_size``) is refused with
    CorruptObjectError, which names the path but never its content.
    FileNotFoundError propagates (callers decide what absent means).
    """
    try:
        fd = os.open(path, _NOFOLLOW_READ)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CorruptObjectError(
                f"{path} is a symbolic link; ckptvcs never follows links inside a repository"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptObjectError(f"{path} is a {_file_kind(info.st_mode)}, not a regular file")
        if max_size is not None and info.st_size > max_size:
            raise CorruptObjectError(f"{path} holds {info.st_size} bytes, more than the {max_size} its kind may hold")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str | os.PathLike[str], max_size: int | None = None) -> bytes:
    """The whole content of a small file (objects, refs, records), read through the ``_pread`` seam.

    Only a regular file is read (see :func:`open_regular`); with ``max_size``, a larger
    file (even one growing while it is read) raises CorruptObjectError.
    """
    return _read_whole(path, max_size, _pread)


def read_record(path: str | os.PathLike[str], max_size: int | None = None) -> bytes:
    """:func:`read_file` for refs, reflogs and records, outside the ``_pread`` seam (fault
    tests inject read errors into object and pack data, not into these)."""
    return _read_whole(path, max_size, lambda fd, size, offset: os.read(fd, size))


def _read_whole(
    path: str | os.PathLike[str], max_size: int | None, read: Callable[[int, int, int], bytes]
) -> bytes:
    """Read a regular file to its end with ``read(fd, size, offset)``, refusing more than ``max_size``."""
    fd = open_regular(path, max_size)
    try:
        parts: list[bytes] = []
        offset = 0
        while True:
            block = read(fd, 1 << 20, offset)
            if not block:
                return b"".join(parts)
            parts.append(block)
            offset += len(block)
            if max_size is not None and offset > max_size:
                raise CorruptObjectError(f"{path} holds more than the {max_size} bytes its kind may hold")
    finally:
        os.close(fd)


def check_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Refuse a path under ``root`` whose folders on the way are links or not folders.

    Called before creating or replacing a file below ``root`` (refs, reflogs, objects,
    records): a symbolic link in place of ``refs/``, ``logs/`` or ``objects/xx/`` must
    never make a write land outside the repository. Missing folders are fine (the
    caller creates them), a regular file on the way raises NotADirectoryError as the OS
    would; the final component is the caller's (O_EXCL, O_NOFOLLOW or rename, none of
    which follow it).
    """
    root_path = Path(root)
    rel = Path(path).relative_to(root_path)
    current = root_path
    for part in rel.parts[:-1]:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return
        if stat.S_ISREG(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(current))
        if not stat.S_ISDIR(info.st_mode):
            raise CorruptObjectError(
                f"{current} is a {_file_kind(info.st_mode)}, not a folder; "
                "ckptvcs never follows links inside a repository"
            )


def _exchange(a: str, b: str) -> None:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux 3.15+)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def exchange_directories(new: str | os.PathLike[str], current: str | os.PathLike[str], parked: str | os.PathLike[str]) -> None:
    """Put the complete directory ``new`` in place of ``current``; the old one ends at ``parked``.

    Where the filesystem can swap two paths atomically (renameat2 RENAME_EXCHANGE:
    ext4, xfs, btrfs, tmpfs) a reader sees the old or the new directory, never none.
    Elsewhere ``current`` is first renamed to ``parked`` and ``new`` then renamed into
    place; a crash in between leaves no ``current`` but a complete ``new``, which the
    caller's recovery (see index.py) moves into place. The parent directory is fsynced.
    """
    new, current, parked = os.fspath(new), os.fspath(current), os.fspath(parked)
    parent = os.path.dirname(os.path.abspath(current))
    try:
        _exchange(new, current)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        _replace(current, parked)
        fsync_dir(parent)
        try:
            _replace(new, current)
        except FileNotFoundError:
            if not os.path.isdir(current):
                raise
            # A process that opened the index in between found no ``current`` and
            # completed the swap itself (the documented recovery): the result is the same.
    else:
        _replace(new, parked)
    fsync_dir(parent)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory tree that holds garbage only (errors ignored: it stays garbage)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def durable_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` over ``dst`` and fsync the destination directory."""
    _replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def write_synced(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it; no rename.

    The first half of an atomic write whose renames and folder fsyncs the caller batches
    (``LocalBackend.put_many``). A failure removes the file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_all(fd, data)
            fsync_file(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def fsync_dirs(folders: Iterable[str | os.PathLike[str]]) -> None:
    """fsync each distinct folder once, in the order first named."""
    for folder in dict.fromkeys(os.fspath(f) for f in folders):
        fsync_dir(folder)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False) -> bool:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one.

    Order: write a temp file beside it, fsync it, rename, fsync the directory.
    With ``exclusive``, an existing ``path`` is left alone and False is returned
    (content-addressed objects: an existing file already holds the same bytes).
    """
    path = Path(path)
    if exclusive and path.exists():
        return False
    tmp = path.with_name(temp_name("." + path.name + "."))
    write_synced(tmp, data)
    try:
        durable_rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int = 0o666) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` whole, or not at all.

    The block writes to a temp file beside ``path``; on a clean exit it is flushed,
    fsynced, renamed over ``path`` and the directory fsynced (the order of
    :func:`atomic_write`). On any exception the temp file is removed and ``path`` is
    left as it was. ``mode`` (before the umask) suits files handed to users (exports).
    OSErrors propagate; callers wrap them with :func:`storage_errors`.
    """
    path = Path(path)
    tmp = path.with_name(temp_name("." + path.name + "."))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with open(fd, "wb", closefd=True) as f:
            yield f
            f.flush()
            fsync_file(f.fileno())
        durable_rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_durably(path: str | os.PathLike[str], line: bytes) -> None:
    """Append one record with a single write() and fsync it (reflog entries).

    A file this call creates also gets its directory entry fsynced: the record is not
    durable while the file's name is not.
    """
    created = not os.path.lexists(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptObjectError(f"{path} is not a regular file")
        write_all(fd, line)
        fsync_file(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def append_lines_durably(appends: Sequence[tuple[str | os.PathLike[str], bytes]]) -> None:
    """:func:`append_durably` for several files, made durable together.

    Each record is appended with one write() first; then every file is fsynced, then
    the folder of each file this call created. Nothing is durable before the fsyncs, as
    with one append; the writes all precede the first fsync so that the filesystem can
    commit them in one journal transaction (on ext4 the later fsyncs find their
    metadata committed already). A crash keeps, per file, a prefix of whole appends
    (a torn last line at worst, which readers skip).
    """
    created: list[str] = []
    fds: list[int] = []
    try:
        for path, line in appends:
            if not os.path.lexists(path):
                created.append(os.path.dirname(os.path.abspath(path)))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptObjectError(f"{path} is not a regular file")
            write_all(fd, line)
        for fd in fds:
            fsync_file(fd)
    finally:
        for fd in fds:
            os.close(fd)
    fsync_dirs(created)


_EMPTY_LOCK_GRACE = 2.0  # seconds an empty, unlocked lock file may be young (see RefLock)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_file_is_stale(path: str | os.PathLike[str]) -> bool:
    """True when a ``.lock`` file's holder is gone (see :class:`RefLock`); never breaks it."""
    try:
        fd = open_regular(path)
    except (FileNotFoundError, CorruptObjectError):
        return False
    try:
        if not _try_flock(fd):
            return False
        info = os.fstat(fd)
        return info.st_size > 0 or time.time() - info.st_mtime > _EMPTY_LOCK_GRACE
    finally:
        os.close(fd)


class RefLock:
    """A git-style ``<ref>.lock`` file taken with O_CREAT|O_EXCL, and held with flock.

    The lock file doubles as the staging file of the new ref value: ``commit()``
    writes the value into it, fsyncs and renames it over the ref (the atomic commit
    point); ``release()`` without commit removes it. The holder keeps an exclusive
    flock on the file from right after creating it until it is renamed or removed,
    and writes an owner line (host, pid) right after taking the flock. flock dies with
    its process, so a waiter that can take the flock of a non-empty lock file knows
    the holder died (at whatever step: after the owner line, after the new value was
    written, ...) and breaks the lock; an empty one is broken only once it is older
    than a grace period (its creator may not have reached flock yet). A lock held by
    a live process is waited for up to ``timeout`` seconds, then LockTimeoutError
    names the holder. The breaker unlinks the stale file while holding its flock and
    only if the path still names that file, so two breakers never remove a new lock.
    """

    def __init__(self, target: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".lock")
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> RefLock:
        deadline = time.monotonic() + self.timeout
        owner = f"{socket.gethostname()} {os.getpid()}\n".encode()
        delay = 0.001
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._break_if_stale():
                    continue
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"lock {self.path} is held by {self._holder() or 'another process'}; "
                        "if no ckptvcs process is running, delete that file"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            self._fd = fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file: no one else holds it
                # The owner line names the holder in messages; commit() replaces it.
                write_all(fd, owner)
            except BaseException:
                self.release()  # never leave a lock file behind that our own fd holds
                raise
            return self

    def _holder(self) -> str:
        try:
            return read_file(self.path, 4096).decode("utf-8", "replace").strip()
        except (OSError, CorruptObjectError):
            return ""

    def _break_if_stale(self) -> bool:
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            return True  # released meanwhile: try again at once
        try:
            if not _try_flock(fd):
                return False  # a live holder
            info = os.fstat(fd)
            if info.st_size == 0 and time.time() - info.st_mtime <= _EMPTY_LOCK_GRACE:
                return False  # its creator may be between O_EXCL and flock
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return True
            if (current.st_dev, current.st_ino) == (info.st_dev, info.st_ino):
                os.unlink(self.path)  # still the stale file, and we hold its flock
            return True
        finally:
            os.close(fd)

    def commit(self, data: bytes) -> None:
        """Replace the target with ``data`` durably, then release the lock."""
        assert self._fd is not None, "commit() on a lock that is not held"
        fd, self._fd = self._fd, None
        renamed = False
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            write_all(fd, data)
            fsync_file(fd)
            _replace(self.path, self.target)  # still holding the flock
            renamed = True
            fsync_dir(self.target.parent)
        except BaseException:
            if not renamed:  # after the rename, the lock path may already be another writer's lock
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the lock up without changing the target."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # before the flock goes, so no waiter breaks a new lock
            finally:
                os.close(fd)

    def __enter__(self) -> RefLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


GATE_SUFFIX = ".gate"  # beside the repository lock: see RepoLock


def flock_within(fd: int, mode: int, timeout: float) -> bool:
    """Take ``flock(fd, mode)``, waiting at most ``timeout`` seconds; False when it timed out.

    The wait is a blocking flock in a helper thread, not LOCK_NB polling: the kernel
    hands a freed lock to a blocked waiter at once, while a poller only wins when it
    happens to look in a moment the lock is free, which never comes while holders
    overlap. On timeout the helper is abandoned: if it gets the lock later it drops it
    at once (it waits on a duplicate of ``fd``, the same open file, so the lock it
    takes is the caller's).
    """
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if timeout <= 0:
            return False
    waiter_fd = os.dup(fd)
    guard = threading.Lock()
    done = threading.Event()
    outcome: dict[str, object] = {"taken": False, "abandoned": False, "error": None}

    def wait() -> None:
        try:
            fcntl.flock(waiter_fd, mode)
            with guard:
                if outcome["abandoned"]:
                    fcntl.flock(waiter_fd, fcntl.LOCK_UN)
                else:
                    outcome["taken"] = True
        except OSError as err:
            outcome["error"] = err
        finally:
            os.close(waiter_fd)
            done.set()

    threading.Thread(target=wait, name="ckptvcs-lock-wait", daemon=True).start()
    try:
        done.wait(timeout)
    finally:
        with guard:
            outcome["abandoned"] = not outcome["taken"]
    if isinstance(outcome["error"], OSError):
        raise outcome["error"]
    return bool(outcome["taken"])


class RepoLock:
    """A whole-repository flock: shared for writers that only add, exclusive for gc.

    flock locks die with their process, so a crash never leaves this one stale.

    Fairness comes from a second file, the *gate* (``lock.gate``): an exclusive
    taker holds the gate exclusively while it waits for the lock, and a shared taker
    passes through the gate (shared, only until it has the lock). So once gc or
    repair waits, new commits queue behind it while the commits in flight finish,
    and gc runs; it lets go of the gate as soon as it holds the lock, so commits
    waiting behind it enter next, before another exclusive taker can close the gate
    again. Every wait is a blocking flock (see :func:`flock_within`), bounded by
    ``timeout``, after which LockTimeoutError names the lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.gate = self.path.with_name(self.path.name + GATE_SUFFIX)

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool, timeout: float = 60.0) -> Iterator[None]:
        """Hold the lock for the block. A shared hold on a store that cannot be written
        (read-only mount, archived copy) goes ahead without the lock: no writer, gc
        or repair can run through that path either."""
        deadline = time.monotonic() + timeout
        fd = self._open(self.path, exclusive)
        if fd is None:
            yield
            return
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            gate = self._open(self.gate, exclusive=True)  # never None: only a read-only store gives None
            assert gate is not None
            try:
                if not (flock_within(gate, mode, deadline - time.monotonic())
                        and flock_within(fd, mode, deadline - time.monotonic())):
                    kind = "exclusive" if exclusive else "shared"
                    raise LockTimeoutError(
                        f"could not take the {kind} repository lock {self.path} within "
                        f"{timeout:.0f}s; another ckptvcs process "
                        f"({'a commit, fsck or gc' if exclusive else 'gc or repair'}) holds or awaits it"
                    )
            finally:
                os.close(gate)  # through the gate: it never stays closed behind a holder
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _open(path: Path, exclusive: bool) -> int | None:
        """A lock file's descriptor (never through a link, never a FIFO); None when a
        shared hold finds the store read-only."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise CorruptObjectError(
                    f"{path} is a symbolic link; ckptvcs never follows links inside a repository"
                ) from None
            if not exclusive and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return None
            raise StorageError(_describe(err, f"opening the repository lock {path}")) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptObjectError(f"{path} is not a regular file")
        return fd

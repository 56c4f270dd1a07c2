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
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import LockTimeoutError, StorageError

__all__ = [
    "storage_errors",
    "fsync_file",
    "fsync_dir",
    "write_all",
    "atomic_write",
    "append_durably",
    "durable_rename",
    "RefLock",
    "RepoLock",
    "temp_name",
    "EarlyWriteback",
]

# Primitives, looked up at call time so tests can replace them.
_fsync = os.fsync
_replace = os.replace
_write = os.write


def _describe(err: OSError, what: str) -> str:
    if err.errno == errno.ENOSPC:
        return f"disk full while {what}; free space and retry (the repository is unchanged)"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded while {what}; the repository is unchanged"
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


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write fewer than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = _write(fd, view)
        view = view[written:]


def durable_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` over ``dst`` and fsync the destination directory."""
    _replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_all(fd, data)
            fsync_file(fd)
        finally:
            os.close(fd)
        durable_rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def append_durably(path: str | os.PathLike[str], line: bytes) -> None:
    """Append one record with a single write() and fsync it (reflog entries)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        write_all(fd, line)
        fsync_file(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RefLock:
    """A git-style ``<ref>.lock`` file taken with O_CREAT|O_EXCL.

    The lock file doubles as the staging file of the new ref value: ``commit()``
    writes the value into it, fsyncs and renames it over the ref (the atomic commit
    point); ``release()`` without commit removes it. A lock left by a process that
    died on this host is broken automatically; one held by a live process is waited
    for up to ``timeout`` seconds, then LockTimeoutError names the holder.

    The holder also keeps an ``flock`` on the lock file for as long as it holds it (the
    kernel drops it when the process dies). That identifies a dead holder even when its
    owner line is gone: killed between creating the file and writing the line, or in
    ``commit()`` after the new value replaced the line but before the rename.
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
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            # The owner line is only a hint for stale-lock detection; the value
            # written by commit() replaces it.
            write_all(self._fd, owner)
            return self

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _break_if_stale(self) -> bool:
        holder = self._holder().split()
        if len(holder) == 2 and holder[1].isdigit() and holder[0] != "ref:":
            if holder[0] != socket.gethostname():
                return False
            pid = int(holder[1])
            if pid == os.getpid() or _pid_alive(pid):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True
        return self._break_if_unlocked()

    def _break_if_unlocked(self, grace: float = 1.0) -> bool:
        """Break a lock without an owner line if no live process holds its flock.

        ``grace`` seconds after creation the lock is left alone: its creator may not have
        taken the flock yet.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # released meanwhile: try again
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live process holds it
            info = os.fstat(fd)
            if time.time() - info.st_mtime < grace:
                return False
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == info.st_ino:  # still the file we checked
                    os.unlink(self.path)
            return True
        finally:
            os.close(fd)

    def commit(self, data: bytes) -> None:
        """Replace the target with ``data`` durably, then release the lock."""
        assert self._fd is not None, "commit() on a lock that is not held"
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            write_all(fd, data)
            fsync_file(fd)
        finally:
            os.close(fd)
        try:
            durable_rename(self.path, self.target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise

    def release(self) -> None:
        """Give the lock up without changing the target."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> RefLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RepoLock:
    """A whole-repository flock: shared for writers that only add, exclusive for gc.

    flock locks die with their process, so a crash never leaves this one stale.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool, timeout: float = 60.0) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        kind = "exclusive" if exclusive else "shared"
                        raise LockTimeoutError(
                            f"could not take the {kind} repository lock {self.path} within "
                            f"{timeout:.0f}s; another ckptvcs process (gc?) is running"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

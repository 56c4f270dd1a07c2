"""FsspecBackend: the backend protocol on fsspec (S3 and its compatibles, memory://, local paths).

A URL names a folder: ``s3://bucket/prefix``, ``memory://name``, ``/path`` or
``file:///path``; every key lives under it. On S3 (s3fs):

- ``put`` is one PUT (a multipart upload for a large ``open_writer`` object): S3 makes an
  object visible whole, at the end, and acknowledges it only once it is durable.
  ``if_absent`` sends ``If-None-Match: *``, so of two writers of a key exactly one creates it.
- ``compare_and_swap`` reads the value and its ETag in one GET, compares, then writes with
  ``If-Match: <etag>`` (``If-None-Match: *`` when the key should be absent; a delete with
  ``If-Match``). A 412 Precondition Failed means another writer won: ConcurrentUpdate.
  This is safe between machines on AWS S3 (conditional writes, 2024) and on SeaweedFS,
  MinIO and others that implement them; ``conditional_put=True`` says so.
- the endpoint comes from ``endpoint_url`` (explicit) or ``AWS_ENDPOINT_URL``; credentials
  and region from the usual AWS variables and files (botocore).

On other fsspec file systems (memory://, local paths) there is no conditional write:
compare-and-swap and ``if_absent`` are emulated under a lock (a process-wide lock, plus an
``flock`` on ``.cas.lock`` in the folder for local paths), which is safe between threads and,
for local paths, between processes of one host; ``conditional_put=False`` says so.
No backend here offers advisory locks or a local path for LMDB.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ckptvcs.backends.base import Capabilities, ConcurrentUpdate, KeyMissing, check_key, check_prefix
from ckptvcs.errors import CorruptObjectError

__all__ = ["FsspecBackend", "S3_CAPABILITIES", "EMULATED_CAPABILITIES"]

S3_CAPABILITIES = Capabilities(
    atomic_rename=False, fsync=False, conditional_put=True, advisory_locks=False, local_path=False, appends=False
)
EMULATED_CAPABILITIES = Capabilities(
    atomic_rename=False, fsync=False, conditional_put=False, advisory_locks=False, local_path=False, appends=False
)
_SPOOL_IN_MEMORY = 8 << 20  # an open_writer object larger than this is spooled to a temporary file
_SINGLE_PUT = 64 << 20  # larger S3 objects go up as a multipart upload of parts this size (visible at completion)
_PROCESS_LOCK = threading.RLock()
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3")


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocol)


def _error_code(err: BaseException) -> str | None:
    """The S3 error code behind an s3fs error (``PreconditionFailed``, ``NoSuchKey``...), if any."""
    for cause in (err, err.__cause__, err.__context__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code) if code is not None else None
    return None


class _RangeReader:
    """Ranged reads of one object (a pack on the remote): one GET with a Range per read."""

    def __init__(self, backend: FsspecBackend, key: str, size: int) -> None:
        self._backend = backend
        self._key = key
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, fewer only where the object ends (the protocol's rule:
        callers check the count); a short answer before the end is an I/O error."""
        if offset < 0 or size < 0:
            raise ValueError(f"read of {size} bytes at {offset}")
        size = max(0, min(size, self._size - offset))
        if size == 0:
            return b""
        data = self._backend._cat(self._key, offset, offset + size)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read: {len(data)} of {size} bytes at {offset}", self._key)
        return bytes(data)

    def readinto(self, buffers: list[bytearray | memoryview], offset: int) -> int:
        views = [memoryview(buf).cast("B") for buf in buffers]
        data = self.read(offset, sum(len(v) for v in views))
        pos = 0
        for view in views:
            piece = data[pos : pos + len(view)]
            view[: len(piece)] = piece
            pos += len(piece)
            if len(piece) < len(view):
                break
        return len(data)

    def close(self) -> None:
        pass


class _Writer:
    """An object streamed to a spooled temporary file and uploaded whole at ``commit``."""

    def __init__(self, backend: FsspecBackend, key: str) -> None:
        self._backend = backend
        self._key = key
        self._spool: tempfile.SpooledTemporaryFile[bytes] | None = tempfile.SpooledTemporaryFile(_SPOOL_IN_MEMORY)

    def write(self, data: bytes | memoryview) -> None:
        if self._spool is None:
            raise OSError(errno.EBADF, "writer already committed or aborted", self._key)
        self._spool.write(data)

    def commit(self) -> None:
        if self._spool is None:
            raise OSError(errno.EBADF, "writer already committed or aborted", self._key)
        spool, self._spool = self._spool, None
        try:
            size = spool.tell()
            spool.seek(0)
            self._backend._upload(self._key, spool, size)
        finally:
            spool.close()

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


class FsspecBackend:
    """Keys under one fsspec URL; see the module docstring for what each operation promises."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            endpoint = storage_options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL") or None
            if endpoint:
                client_kwargs = dict(storage_options.pop("client_kwargs", None) or {})
                client_kwargs.setdefault("endpoint_url", endpoint)
                storage_options["client_kwargs"] = client_kwargs
            # Never answer from a stale listing cache: refs and packs change under us.
            storage_options.setdefault("use_listings_cache", False)
            storage_options.setdefault("skip_instance_cache", True)
        else:
            storage_options.pop("endpoint_url", None)
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self._s3 = _is_s3(self.fs)
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))
        self.capabilities = S3_CAPABILITIES if self._s3 else EMULATED_CAPABILITIES

    # -- plumbing ---------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}" if self.root else check_key(key)

    def _s3_location(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self.fs.split_path(self._path(key))
        return bucket, path

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Missing keys as KeyMissing; everything else an OSError with an errno."""
        try:
            yield
        except (KeyMissing, ConcurrentUpdate):
            raise
        except FileNotFoundError:
            raise KeyMissing(key) from None
        except OSError as err:
            if _error_code(err) in ("NoSuchKey", "404"):
                raise KeyMissing(key) from None
            if err.errno is None:
                raise OSError(errno.EIO, f"{self.describe()}: {err}", key) from err
            raise
        except Exception as err:
            # botocore's connection errors (server down, DNS, timeouts) are no OSError: make them one.
            if type(err).__module__.split(".")[0] in _CLIENT_MODULES:
                raise OSError(errno.EIO, f"{self.describe()}: {err}", key) from err
            raise

    def _cat(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._errors(key):
            return bytes(self.fs.cat_file(self._path(key), start=start, end=end))

    def _upload(self, key: str, stream: Any, size: int) -> None:
        with self._errors(key):
            path = self._path(key)
            if self._s3 and size <= _SINGLE_PUT:
                bucket, name = self._s3_location(key)
                self.fs.call_s3("put_object", Bucket=bucket, Key=name, Body=stream.read())
                return
            if not self._s3 and "/" in path:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(path, "wb", **({"block_size": _SINGLE_PUT} if self._s3 else {})) as f:
                while block := stream.read(8 << 20):
                    f.write(block)

    @contextlib.contextmanager
    def _emulation_lock(self) -> Iterator[None]:
        """Serialises emulated conditional writes: threads here, processes too on a local path."""
        with _PROCESS_LOCK:
            if not self._local:
                yield
                return
            os.makedirs(self.root or ".", exist_ok=True)
            fd = os.open(os.path.join(self.root or ".", ".cas.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # -- protocol ---------------------------------------------------------------------------

    def describe(self) -> str:
        return self.url

    def local_root(self) -> Path | None:
        return None

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        """The whole object; larger than ``max_size``: CorruptObjectError naming the key, as every
        backend (checked before the read, and again on what came back: it may have changed)."""
        if max_size is None:
            return self._cat(key)
        size = self.size(key)
        if size is None:
            raise KeyMissing(key)
        data = self._cat(key) if size <= max_size else None
        if data is None or len(data) > max_size:
            held = size if data is None else len(data)
            raise CorruptObjectError(f"{key} holds {held} bytes, more than the {max_size} its kind may hold")
        return data

    def open_reader(self, key: str) -> _RangeReader:
        size = self.size(key)
        if size is None:
            raise KeyMissing(key)
        return _RangeReader(self, key, size)

    def size(self, key: str) -> int | None:
        try:
            with self._errors(key):
                info = self.fs.info(self._path(key))
        except KeyMissing:
            return None
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    def list(self, prefix: str = "") -> Iterator[str]:
        prefix = check_prefix(prefix)
        base = self._path(prefix) if prefix else self.root
        try:
            with self._errors(prefix or "."):
                found = self.fs.find(base) if base else self.fs.find("")
        except KeyMissing:
            return iter(())
        start = len(self.root) + 1 if self.root else 0
        keys = []
        for path in found:
            path = path.lstrip("/") if not self.root.startswith("/") else path
            key = path[start:] if path.startswith(self.root) else path
            # Only keys under the prefix: a store may list the folder itself (SeaweedFS keeps
            # an emptied folder as a marker object), which is no key.
            if prefix and not key.startswith(prefix + "/"):
                continue
            if key and not key.endswith("/") and not key.rsplit("/", 1)[-1].startswith(".cas.lock"):
                keys.append(key)
        return iter(sorted(keys))

    def list_modified(self, prefix: str = "") -> dict[str, float]:
        """Every key under ``prefix`` with its last-modified time (seconds since the epoch, the
        store's own clock: S3 ``LastModified``, a file's mtime, memory's creation time).
        Not in the Backend protocol: remote gc's grace period needs it."""
        prefix = check_prefix(prefix)
        base = self._path(prefix) if prefix else self.root
        try:
            with self._errors(prefix or "."):
                found = self.fs.find(base or "", detail=True)
        except KeyMissing:
            return {}
        start = len(self.root) + 1 if self.root else 0
        out: dict[str, float] = {}
        for path, info in found.items():
            path = path.lstrip("/") if not self.root.startswith("/") else path
            key = path[start:] if path.startswith(self.root) else path
            if (prefix and not key.startswith(prefix + "/")) or not key or key.endswith("/") \
                    or key.rsplit("/", 1)[-1].startswith(".cas.lock") or info.get("type") == "directory":
                continue
            out[key] = _modified(info)
        return out

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if not if_absent:
            self._upload(key, io.BytesIO(data), len(data))
            return True
        if self._s3:
            bucket, path = self._s3_location(key)
            try:
                with self._errors(key):
                    self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfNoneMatch="*")
            except FileExistsError:
                return False
            except OSError as err:
                if _error_code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
            return True
        with self._emulation_lock():
            if self.size(key) is not None:
                return False
            self._upload(key, io.BytesIO(data), len(data))
            return True

    def open_writer(self, key: str) -> _Writer:
        check_key(key)
        return _Writer(self, key)

    def delete(self, key: str) -> bool:
        if self.size(key) is None:
            return False
        try:
            with self._errors(key):
                self.fs.rm_file(self._path(key))
        except KeyMissing:
            return False
        return True

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete several keys one by one (each delete is durable when it returns); how many existed."""
        return sum(1 for key in list(keys) if self.delete(key))

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        if self._s3:
            self._s3_compare_and_swap(key, expected, new)
            return
        with self._emulation_lock():
            current = self._get_or_none(key)
            if current != expected:
                raise ConcurrentUpdate(key, current)
            if new is None:
                if current is not None:
                    self.delete(key)
            else:
                self._upload(key, io.BytesIO(new), len(new))

    def _get_or_none(self, key: str) -> bytes | None:
        try:
            return self._cat(key)
        except KeyMissing:
            return None

    def _s3_get_with_etag(self, key: str) -> tuple[bytes | None, str | None]:
        bucket, path = self._s3_location(key)
        try:
            with self._errors(key):
                response = self.fs.call_s3("get_object", Bucket=bucket, Key=path)
        except KeyMissing:
            return None, None
        body = response["Body"]
        try:
            data = _read_body(self.fs, body)
        finally:
            body.close()
        return bytes(data), response["ETag"]

    def _s3_compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        current, etag = self._s3_get_with_etag(key)
        if current != expected:
            raise ConcurrentUpdate(key, current)
        bucket, path = self._s3_location(key)
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            with self._errors(key):
                if new is None:
                    if etag is not None:
                        self.fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=etag)
                else:
                    self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=new, **condition)
        except (FileExistsError, KeyMissing, OSError) as err:
            if not isinstance(err, (FileExistsError, KeyMissing)) and _error_code(err) not in (
                "PreconditionFailed", "412", "ConditionalRequestConflict"
            ):
                raise
            after, _ = self._s3_get_with_etag(key)
            if after == new:
                return  # our own write landed and a retry of it saw it (lost response)
            raise ConcurrentUpdate(key, after) from None

    def append(self, key: str, data: bytes) -> None:
        while True:
            current = self._get_or_none(key)
            try:
                self.compare_and_swap(key, current, (current or b"") + data)
                return
            except ConcurrentUpdate:
                continue

    def lock(self, name: str, *, exclusive: bool, timeout: float) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError(f"{self.describe()} offers no advisory locks (object storage)")


def _read_body(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body from sync code, on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        return bytes(await body.read())

    return bytes(sync(fs.loop, read))


def _modified(info: dict[str, Any]) -> float:
    """A listing entry's last-modified time in seconds since the epoch; unknown: infinity (the
    newest possible: a grace period then protects the key forever, never the other way)."""
    for name in ("LastModified", "mtime", "created", "last_modified"):
        value = info.get(name)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            return float(value)
    return float("inf")

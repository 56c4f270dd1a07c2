"""The chunk store: content-addressed chunks in packs, found through the index.

Writing hashes every chunk, skips those already stored, encodes the rest and appends
them to a pack; the index learns about a pack only after the pack is sealed. Reading
decodes straight into the caller's buffer and re-hashes every chunk, so damaged bytes
raise IntegrityError instead of being returned. Hashing, encoding and decoding run on
a thread pool (BLAKE3 and zstd release the GIL); pack appends stay in order on the
calling thread.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from . import _fs, codec
from .errors import CorruptObjectError, IntegrityError
from .index import ChunkIndex
from .pack import PackEntry, PackFiles, PackWriter

__all__ = ["ChunkStore", "WriteSession", "WriteStats", "Progress", "chunk_hash"]

PACK_TARGET_SIZE = 256 << 20

Progress = Callable[[int, int], None]
"""A progress callback: ``(bytes done, bytes total)``."""


def chunk_hash(data: bytes | memoryview) -> bytes:
    """The 32-byte BLAKE3 id of a chunk's raw bytes."""
    return blake3.blake3(data).digest()


@dataclass
class WriteStats:
    """What a write session did: bytes seen, chunks new, bytes appended to packs."""

    logical_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0
    packs: list[str] = field(default_factory=list)


@dataclass
class _Encoded:
    chunk_id: bytes
    raw_len: int
    codec: int = codec.RAW
    payload: bytes | memoryview | None = None  # None: already stored, nothing to write


class ChunkStore:
    """Chunks stored in ``packs/``, located through the LMDB index in ``index/``."""

    def __init__(self, root: Path, *, chunk_size: int, verify_encoding: bool = True, workers: int | None = None):
        self.root = root
        self.chunk_size = chunk_size
        self.verify_encoding = verify_encoding
        self._index: ChunkIndex | None = None
        self.packs = PackFiles(root / "packs")
        self._workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None

    @property
    def index(self) -> ChunkIndex:
        """The LMDB chunk index, opened on first use (so ``repair index`` can run when
        the old one does not open at all)."""
        if self._index is None:
            self._index = ChunkIndex(self.root / "index")
        return self._index

    def close_index(self) -> None:
        """Release the index (before ``repair index`` swaps it); reopened on next use."""
        if self._index is not None:
            self._index.close()
            self._index = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ckptvcs")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.packs.close()
        self.close_index()

    def split(self, nbytes: int) -> list[tuple[int, int]]:
        """``(start, end)`` byte ranges of the chunks of a blob of ``nbytes``."""
        return [(s, min(s + self.chunk_size, nbytes)) for s in range(0, nbytes, self.chunk_size)]

    def write_session(self) -> WriteSession:
        return WriteSession(self)

    # -- reading -------------------------------------------------------------

    def read_into(self, chunk_ids: Sequence[bytes], out: memoryview, *, describe: Callable[[], str]) -> list[Future[int]]:
        """Schedule decoding ``chunk_ids`` into ``out`` (one blob); returns futures of bytes filled.

        ``describe`` names the blob in error messages (tensor path, commit).
        Each chunk is verified against its id after decoding.
        """
        ranges = self.split(len(out))
        if len(ranges) != len(chunk_ids):
            raise CorruptObjectError(
                f"{describe()}: {len(chunk_ids)} chunks listed for {len(out)} bytes"
            )
        entries = self._locate(chunk_ids, describe)
        return [
            self.pool.submit(self._read_chunk, entry, out[start:end], describe)
            for entry, (start, end) in zip(entries, ranges)
        ]

    def _locate(self, chunk_ids: Sequence[bytes], describe: Callable[[], str]) -> list[PackEntry]:
        entries = []
        for cid in chunk_ids:
            entry = self.index.get(cid)
            if entry is None:
                raise IntegrityError(f"{describe()}: chunk {cid.hex()} is missing from the store")
            entries.append(entry)
        return entries

    def _read_chunk(self, entry: PackEntry, out: memoryview, describe: Callable[[], str]) -> int:
        try:
            return self._read_chunk_at(entry, out, describe)
        except IntegrityError:
            # gc in another process may have moved the chunk to a new pack (and deleted
            # the old one) after we looked it up: look again, once.
            if self.packs.path(entry.pack).exists():
                raise
            moved = self.index.get(entry.chunk_id)
            if moved is None or moved == entry:
                raise
            return self._read_chunk_at(moved, out, describe)

    def _read_chunk_at(self, entry: PackEntry, out: memoryview, describe: Callable[[], str]) -> int:
        if entry.raw_len != len(out):
            raise IntegrityError(
                f"{describe()}: chunk {entry.chunk_id.hex()} holds {entry.raw_len} bytes, expected {len(out)}"
            )
        try:
            with _fs.storage_errors(f"reading pack {entry.pack}"):
                if entry.codec == codec.RAW:
                    self.packs.read_raw_into(entry, out)  # straight into the tensor, no copy
                else:
                    codec.decode_into(entry.codec, self.packs.read_payload(entry), out)
        except CorruptObjectError as err:
            raise IntegrityError(f"{describe()}: chunk {entry.chunk_id.hex()}: {err}") from None
        if chunk_hash(out) != entry.chunk_id:
            raise IntegrityError(
                f"{describe()}: chunk {entry.chunk_id.hex()} in pack {entry.pack} fails its BLAKE3 check"
            )
        return len(out)


class WriteSession:
    """Stores the chunks of one commit; ``finish()`` seals and indexes the last pack.

    Packs that fill up are sealed and indexed as the session goes: an indexed chunk
    in a sealed pack is durable, and without a ref pointing at it, merely garbage.
    """

    def __init__(self, store: ChunkStore) -> None:
        self._store = store
        self._writer: PackWriter | None = None
        self._written: set[bytes] = set()
        self.stats = WriteStats()

    def put_blobs(self, blobs: Sequence[memoryview], progress: Progress | None = None) -> list[list[bytes]]:
        """Store many blobs, pipelining hashing and encoding across the thread pool.

        ``progress(done_bytes, total_bytes)`` is called as chunks are stored.
        """
        store = self._store
        window = 2 * store._workers + 2
        pending: deque[tuple[int, Future[_Encoded]]] = deque()
        result: list[list[bytes]] = []
        total = sum(len(b) for b in blobs)
        done = 0

        def drain_one() -> None:
            nonlocal done
            blob_no, fut = pending.popleft()
            enc = fut.result()
            result[blob_no].append(enc.chunk_id)
            self._append(enc)
            done += enc.raw_len
            if progress is not None:
                progress(done, total)

        for blob in blobs:
            result.append([])
            self.stats.logical_bytes += len(blob)
            for start, end in store.split(len(blob)):
                if len(pending) >= window:
                    drain_one()
                pending.append((len(result) - 1, store.pool.submit(self._encode, blob[start:end])))
        while pending:
            drain_one()
        return result

    def _encode(self, raw: memoryview) -> _Encoded:
        cid = chunk_hash(raw)
        if cid in self._written or self._store.index.get(cid) is not None:
            return _Encoded(cid, len(raw))
        kind, payload = codec.encode(raw, cid, verify=self._store.verify_encoding)
        return _Encoded(cid, len(raw), kind, payload)

    def _append(self, enc: _Encoded) -> None:
        self.stats.chunks += 1
        if enc.payload is None or enc.chunk_id in self._written:
            return
        if self._writer is None:
            with _fs.storage_errors("creating a pack"):
                self._writer = PackWriter(self._store.root / "tmp", self._store.root / "packs")
        with _fs.storage_errors(f"writing pack {self._writer.name}"):
            self._writer.add(enc.chunk_id, enc.codec, enc.raw_len, enc.payload)
        self._written.add(enc.chunk_id)
        self.stats.new_chunks += 1
        self.stats.new_raw_bytes += enc.raw_len
        self.stats.new_stored_bytes += len(enc.payload)
        if self._writer.size >= PACK_TARGET_SIZE:
            self._seal()

    def _seal(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            with _fs.storage_errors(f"sealing pack {writer.name}"):
                writer.seal()
        except BaseException:
            writer.abort()
            raise
        self._store.index.add(writer.entries)
        self.stats.packs.append(writer.name)

    def finish(self) -> WriteStats:
        """Seal and index the open pack; after this every chunk written is durable."""
        self._seal()
        return self.stats

    def abort(self) -> None:
        """Drop the unsealed pack, if any (sealed ones stay as garbage for gc)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

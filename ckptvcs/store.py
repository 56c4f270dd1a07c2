"""The chunk store: content-addressed chunks in packs, found through the index.

Writing hashes every chunk, skips those already stored (indexed with their whole delta
chain; an unchanged tensor costs only its hash), encodes the rest and appends them to a
pack; the index learns about a pack only after the pack is sealed. A new chunk may be stored as an XOR delta against a
*base*: the chunk at the same place in the parent commit, as long as the base's delta
chain stays shorter than the repository's keyframe interval. Reading decodes straight
into the caller's buffer and re-hashes every chunk, so damaged bytes raise
IntegrityError instead of being returned; a delta chain is decoded in one pass and
only its result hashed, and decoded again level by level (every base verified) only
when that fails, to name the damaged chunk. Hashing, encoding and
decoding run on a thread pool (BLAKE3, zstd and numpy release the GIL); pack appends
stay in order on the calling thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np

from . import _fs, codec, layout, planes, scratch
from .backends import Backend, LocalBackend
from .errors import CkptvcsError, CorruptObjectError, IntegrityError
from .index import ChunkIndex, SessionLookups
from .pack import PackEntry, PackFiles, PackWriter
from .pack_index import index_sealed_pack
from .store_index import sync_index

__all__ = ["BlobRead", "ChunkStore", "WriteSession", "WriteStats", "Progress", "chunk_hash"]

PACK_TARGET_SIZE = 256 << 20
DEFAULT_KEYFRAME_INTERVAL = 4
# No reader follows a delta chain longer than this, whatever the config says: a cycle or
# an absurd chain can only come from damage.
MAX_CHAIN_LENGTH = 64

Progress = Callable[[int, int], None]
"""A progress callback: ``(bytes done, bytes total)``."""


def _damage(describe: Callable[[], str], subject: str, problem: str, *, entry: PackEntry | None = None,
            chunk_id: bytes | None = None, on_disk: bool = False) -> IntegrityError:
    """``IntegrityError("<describe()>: <subject> <problem>")`` naming the damaged chunk as fields.

    ``entry`` (the chunk's pack entry) or ``chunk_id`` (a chunk the index lacks) says
    which chunk ``problem`` is about; fsck reads the fields, never the message.
    """
    cid = entry.chunk_id if entry is not None else chunk_id
    return IntegrityError(
        f"{describe()}: {subject} {problem}",
        chunk_id=None if cid is None else cid.hex(),
        pack=None if entry is None else entry.pack,
        offset=None if entry is None else entry.offset,
        damaged_on_disk=on_disk,
        problem=problem,
    )


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
    delta_chunks: int = 0  # new chunks stored as a delta against a base
    hashed_bytes: int = 0  # bytes read and hashed (all of them, but for the chunks ids were given for)
    known_chunks: int = 0  # chunks whose ids the caller gave (put_blobs ``known``): not read at all
    packs: list[str] = field(default_factory=list)
    blob_new_stored_bytes: list[int] = field(default_factory=list)  # per blob of put_blobs: what it added


@dataclass
class _Encoded:
    chunk_id: bytes
    raw_len: int
    codec: int = codec.RAW
    payload: bytes | memoryview | None = None  # None: already stored, nothing to write
    base: bytes | None = None
    buffer: bytearray | None = None  # the recycled buffer holding the payload, if any
    known: bool = False  # the caller gave the id: the bytes were not read


def _known(chunk_id: bytes, raw_len: int) -> Future[list[_Encoded]]:
    """A finished future of a chunk whose id the caller gave (nothing to hash or write)."""
    done: Future[list[_Encoded]] = Future()
    done.set_result([_Encoded(chunk_id, raw_len, known=True)])
    return done


# Payloads below this size get their own small buffer instead of a recycled chunk-sized one.
_SMALL_PAYLOAD = 64 * 1024

# put_blobs encodes consecutive chunks shorter than _GROUP_CHUNK in one pool task, up to
# _GROUP_BYTES of them: a pool task's submit, hand-over and wake-up cost as much as
# encoding a few-KB chunk (a tiny state is ~200 such chunks).
_GROUP_CHUNK = 64 * 1024
_GROUP_BYTES = 256 * 1024


def _copy_when_done(
    futures: dict[int, Future[int]], repeats: list[tuple[int, int]], ranges: list[tuple[int, int]], out: memoryview
) -> Future[int]:
    """A future that, once the decodes ``repeats`` copy from have finished, copies each
    decoded chunk to its repeated positions; its result is the bytes copied.

    A blob that references one chunk many times (a zero tensor) thus decodes and
    verifies it once, and a crafted manifest repeating a chunk costs memcpy, not decodes.
    Resolved by a callback, not a pool task, so it never waits on the pool it is part of.
    """
    done: Future[int] = Future()
    sources = {j for j, _ in repeats}
    pending = [len(sources)]
    lock = threading.Lock()

    def finish(_: Future[int]) -> None:
        with lock:
            pending[0] -= 1
            if pending[0]:
                return
        if not done.set_running_or_notify_cancel():
            return  # the reader gave up (cancelled)
        try:
            for j in sources:
                futures[j].result()
            _copy_repeats(repeats, ranges, out)
        except BaseException as err:  # the decode's own error; the caller sees it there too
            done.set_exception(err)
        else:
            done.set_result(sum(ranges[i][1] - ranges[i][0] for _, i in repeats))

    for j in sources:
        futures[j].add_done_callback(finish)
    return done


def _copy_repeats(repeats: list[tuple[int, int]], ranges: list[tuple[int, int]], out: memoryview) -> None:
    """Copy chunk ``j``'s bytes to chunk ``i`` for each ``(j, i)``, one numpy copy per source."""
    size = ranges[0][1] - ranges[0][0]
    grid = np.frombuffer(out, dtype=np.uint8)[: (len(out) // size) * size].reshape(-1, size)
    targets: dict[int, list[int]] = {}
    for j, i in repeats:
        if ranges[i][1] - ranges[i][0] == size:
            targets.setdefault(j, []).append(i)
        else:  # the short last chunk
            out[ranges[i][0]:ranges[i][1]] = out[ranges[j][0]:ranges[j][1]]
    for j, rows in targets.items():
        grid[rows] = grid[j]


@dataclass(frozen=True)
class BlobRead:
    """One blob to decode: its chunk ids, the buffer it fills (exactly its size), and a
    function naming it for error messages (tensor path, commit)."""

    chunk_ids: Sequence[bytes]
    out: memoryview
    describe: Callable[[], str]


class _FoundEntries:
    """Index look-ups of a read task: the entries found up front, then the index itself.

    The entries were true when the read began; one that gc has since moved fails its
    decode, and the retry path asks the index again (``_decode_with_retry``).
    """

    def __init__(self, found: dict[bytes, PackEntry], index: ChunkIndex) -> None:
        self._found = found
        self._index = index

    def get(self, chunk_id: bytes) -> PackEntry | None:
        entry = self._found.get(chunk_id)
        return entry if entry is not None else self._index.get(chunk_id)


class ChunkStore:
    """Chunks stored in ``packs/``, located through the LMDB index in ``index/``.

    Packs go through ``backend`` (default: the local directory ``root``). The index is
    local, derived data: it lives in ``index_dir`` (default ``root/index``), which for a
    backend without local files is a cache directory rebuilt from the packs.
    """

    def __init__(
        self,
        root: Path,
        *,
        chunk_size: int,
        backend: Backend | None = None,
        index_dir: Path | None = None,
        verify_encoding: bool = True,
        workers: int | None = None,
        keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL,
    ):
        self.root = root
        self.backend: Backend = backend if backend is not None else LocalBackend(root)
        self.index_dir = index_dir if index_dir is not None else root / layout.INDEX
        self.chunk_size = chunk_size
        self.verify_encoding = verify_encoding
        # A delta chain holds at most keyframe_interval - 1 deltas: every K-th version
        # of a chunk (at the latest) is a keyframe. 1 disables deltas.
        self.keyframe_interval = keyframe_interval
        # Chunks under a sixteenth of the chunk size (in practice a small tensor's only
        # chunk: a bias, a norm's weight) are stored self-contained: a delta would save a
        # few KB at the price of reading and decoding its base chain, which is most of a
        # small state's commit time (docs/performance.md, "Tiny commits, fifth pass").
        self.min_delta_bytes = max(1, chunk_size // 16)
        self._index: ChunkIndex | None = None
        self.packs = PackFiles(self.backend)
        self._workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        # The write session whose task this thread runs (its index look-ups: SessionLookups).
        self._session = threading.local()

    @property
    def index(self) -> ChunkIndex:
        """The LMDB chunk index, opened on first use (so ``repair index`` can run when
        the old one does not open at all)."""
        if self._index is None:
            self._index = ChunkIndex(self.index_dir)
        return self._index

    def refresh_index(self) -> int:
        """Reopen a swapped index (``ChunkIndex.refresh``) and, in a store without local
        files, bring the index up to date with ``packs/``.

        A local store has one index on disk that every writer adds to. A store without
        local files (memory, S3) keeps its index in a local cache (``index_cache``) that
        records which packs it has read; Repo handles learn here of packs other handles
        wrote (the ranks of a multi-host writer) and of packs gc deleted: one listing of
        ``packs/``, then one GET of ``packs/<name>.idx`` per new pack, in parallel
        (``store_index.sync_index``; a pack without a readable index falls back to a
        walk of its entry headers; a damaged pack is left to fsck and ``repair index``).
        Rows of deleted packs are dropped. Chunks the index already holds keep their
        rows. Returns how many chunks were added.
        """
        self.index.refresh()
        if self.backend.capabilities.local_path:
            return 0
        return sync_index(self.backend, self.index, self.index_dir.parent / "sync.lock")

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

    def _entry(self, chunk_id: bytes) -> PackEntry | None:
        """The index entry of ``chunk_id``: through the write session or the read this thread
        works for (one read transaction for all of it), else straight from the index."""
        lookups: SessionLookups | _FoundEntries | None = getattr(self._session, "lookups", None)
        return (lookups or self.index).get(chunk_id)

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
        return self.read_blobs([BlobRead(chunk_ids, out, describe)])

    def read_blobs(self, blobs: Sequence[BlobRead]) -> list[Future[int]]:
        """Schedule decoding many blobs at once; returns futures of bytes filled.

        Every chunk is verified against its id after decoding. The chunks (and the delta
        bases their chains need) are looked up in one index read transaction, and
        chunks shorter than ``_GROUP_CHUNK`` (a small tensor's only chunk) are decoded
        in pool tasks of up to ``_GROUP_BYTES``: a task's hand-over costs as much as
        decoding a few KB, and a state of 100,000 small tensors would otherwise pay it,
        and a transaction, 100,000 times.
        """
        found = self._locate(blobs)
        futures: list[Future[int]] = []
        group: list[tuple[PackEntry, memoryview, Callable[[], str]]] = []
        group_bytes = 0

        def submit_group() -> Future[int]:
            nonlocal group, group_bytes
            fut = self.pool.submit(self._read_group, group, found)
            futures.append(fut)
            group, group_bytes = [], 0
            return fut

        for blob in blobs:
            ranges = self.split(len(blob.out))
            first: dict[bytes, int] = {}  # chunk id → the position it is decoded at
            repeats: list[tuple[int, int]] = []  # (decoded position, position that copies it)
            decoding: dict[int, Future[int]] = {}
            small: list[int] = []  # positions decoded by the group being filled
            for i, (cid, (start, end)) in enumerate(zip(blob.chunk_ids, ranges)):
                j = first.setdefault(cid, i)
                if j != i and ranges[j][1] - ranges[j][0] == end - start:
                    repeats.append((j, i))  # one chunk referenced again (zeros): decode once, copy
                    continue
                group.append((found[cid], blob.out[start:end], blob.describe))
                group_bytes += end - start
                small.append(i)
                if end - start >= _GROUP_CHUNK or group_bytes >= _GROUP_BYTES:
                    fut = submit_group()
                    decoding.update((k, fut) for k in small)
                    small = []
            if small and repeats:  # a repeat waits on its source: submit it now
                fut = submit_group()
                decoding.update((k, fut) for k in small)
            if repeats:
                futures.append(_copy_when_done(decoding, repeats, ranges, blob.out))
        if group:
            submit_group()
        return futures

    def _read_group(self, items: list[tuple[PackEntry, memoryview, Callable[[], str]]],
                    found: dict[bytes, PackEntry]) -> int:
        """One pool task: decode and verify each chunk of ``items``; returns the bytes filled."""
        local = self._session
        local.lookups = _FoundEntries(found, self.index)
        try:
            return sum(self._read_chunk(entry, out, describe) for entry, out, describe in items)
        finally:
            local.lookups = None

    def _locate(self, blobs: Sequence[BlobRead]) -> dict[bytes, PackEntry]:
        """The index entries of every chunk of ``blobs`` and of their delta chains, in one
        read transaction; a missing chunk raises IntegrityError naming its blob."""
        for blob in blobs:
            if -(-len(blob.out) // self.chunk_size) != len(blob.chunk_ids):  # as many as split() makes
                raise CorruptObjectError(
                    f"{blob.describe()}: {len(blob.chunk_ids)} chunks listed for {len(blob.out)} bytes"
                )
        wanted = [cid for blob in blobs for cid in blob.chunk_ids]
        found = self.index.get_many(wanted, base_levels=MAX_CHAIN_LENGTH)
        if len(found) < len(set(wanted)) and not self.backend.capabilities.local_path:
            self.refresh_index()  # another handle on this store may have written them: look once
            found.update(self.index.get_many([c for c in wanted if c not in found], base_levels=MAX_CHAIN_LENGTH))
        for blob in blobs:
            for cid in blob.chunk_ids:
                if cid not in found:
                    raise _damage(blob.describe, f"chunk {cid.hex()}", "is missing from the store", chunk_id=cid)
        return found

    def _read_chunk(self, entry: PackEntry, out: memoryview, describe: Callable[[], str]) -> int:
        self._decode_checked(entry, out, describe)
        return len(out)

    def _decode_checked(self, entry: PackEntry, out: memoryview, describe: Callable[[], str]) -> None:
        """Decode one chunk into ``out`` and verify it; IntegrityError names any damage.

        A keyframe is decoded and hashed once. A delta chain is first decoded in one
        pass in the plane domain (codec.ChainDecoder) and only the result is hashed
        against the chunk's id: that hash alone proves ``out`` right, whatever the
        levels below held. If anything fails on that path (a hash mismatch, a malformed
        payload, a missing base, a pack gc moved), the chain is decoded again level by
        level, each level verified against its own id, so the error names the damaged
        chunk (or the retry finds the moved one).
        """
        if entry.base is not None:
            try:
                if self._decode_chain_fast(entry, out):
                    return
            except CkptvcsError:
                pass
        self._decode_with_retry(entry, out, describe, depth=0)

    def _decode_chain_fast(self, entry: PackEntry, out: memoryview) -> bool:
        """Decode ``entry``'s whole delta chain at once; True when ``out`` hashes to its id."""
        if entry.raw_len != len(out):
            return False
        chain = [entry]
        while chain[-1].base is not None:
            if len(chain) > MAX_CHAIN_LENGTH:
                return False
            base = self._entry(chain[-1].base)
            if base is None or base.raw_len != len(out):
                return False
            chain.append(base)
        decoder = codec.ChainDecoder(out)
        with _fs.storage_errors("reading a delta chain"):
            for level in reversed(chain):
                if not decoder.add(level.codec, self.packs.read_payload_reusing(level)):
                    return False
        decoder.finish()
        return chunk_hash(out) == entry.chunk_id

    def _decode_with_retry(self, entry: PackEntry, out: memoryview, describe: Callable[[], str], depth: int) -> None:
        try:
            self._decode_verified(entry, out, describe, depth)
        except IntegrityError:
            # gc in another process may have moved the chunk (or, for a delta, its base:
            # each level retries on its own) to a new pack and deleted the old one after
            # we looked it up: look again, once.
            if self.packs.exists(entry.pack):
                raise
            if not self.backend.capabilities.local_path:
                self.refresh_index()  # another handle's gc: learn where it moved the chunk
            moved = self.index.get(entry.chunk_id)
            if moved is None or moved == entry:
                raise
            self._decode_verified(moved, out, describe, depth)

    def _decode_verified(self, entry: PackEntry, out: memoryview, describe: Callable[[], str], depth: int) -> None:
        """Decode one chunk into ``out`` (its base first, recursively) and check its BLAKE3."""
        if entry.raw_len != len(out):
            raise _damage(describe, f"chunk {entry.chunk_id.hex()}", f"holds {entry.raw_len} bytes, expected {len(out)}",
                          entry=entry)
        base_bytes = None
        if entry.base is not None:
            if depth >= MAX_CHAIN_LENGTH:
                raise _damage(describe, f"chunk {entry.chunk_id.hex()}", f"has a delta chain longer than {MAX_CHAIN_LENGTH}",
                              entry=entry)
            base_entry = self._entry(entry.base)
            if base_entry is None:
                raise _damage(describe, f"base chunk {entry.base.hex()} of chunk {entry.chunk_id.hex()}",
                              "is missing from the store", chunk_id=entry.base)
            # One scratch buffer per chain level: a level's base is in use while the
            # level below it decodes.
            base_bytes = scratch.buffer(f"base-{depth}", len(out))
            self._decode_with_retry(base_entry, memoryview(base_bytes), describe, depth + 1)
        elif entry.codec in codec.USES_BASE:
            raise _damage(describe, f"delta chunk {entry.chunk_id.hex()}", "names no base", entry=entry)
        try:
            with _fs.storage_errors(f"reading pack {entry.pack}"):
                if entry.codec == codec.RAW:
                    self.packs.read_raw_into(entry, out)  # straight into the tensor, no copy
                else:
                    codec.decode_into(entry.codec, self.packs.read_payload_reusing(entry), out, base=base_bytes)
        except CorruptObjectError as err:
            raise IntegrityError(f"{describe()}: chunk {entry.chunk_id.hex()}: {err}", chunk_id=entry.chunk_id.hex(),
                                 pack=entry.pack, offset=entry.offset, damaged_on_disk=True,
                                 problem=f"is damaged: {err}") from None
        if chunk_hash(out) != entry.chunk_id:
            raise _damage(describe, f"chunk {entry.chunk_id.hex()} in pack {entry.pack}", "fails its BLAKE3 check",
                          entry=entry, on_disk=True)

    def read_chunk(self, chunk_id: bytes, *, describe: Callable[[], str], reuse: bool = False) -> memoryview:
        """One chunk's raw bytes, decoded (bases included) and verified.

        With ``reuse`` the bytes live in this thread's scratch space: valid only until
        the thread's next ``read_chunk(..., reuse=True)`` (the commit pipeline reads a
        delta base and uses it at once).
        """
        entry = self._entry(chunk_id)
        if entry is None:
            raise _damage(describe, f"chunk {chunk_id.hex()}", "is missing from the store", chunk_id=chunk_id)
        # The chain below uses the "base-N" slots, never this one.
        out = scratch.buffer("read-chunk", entry.raw_len) if reuse else np.empty(entry.raw_len, dtype=np.uint8)
        self._decode_checked(entry, memoryview(out), describe)
        return memoryview(out)

    def has_complete_chain(self, chunk_id: bytes) -> bool:
        """Whether the index holds ``chunk_id`` and every delta base its decoding needs.

        The dedup test of a commit: a chunk is skipped as already stored only when this
        holds. An index row whose chain is broken (a delta whose base gc released, or
        a rebuilt index that found an orphaned delta) names bytes no one can read back,
        so the chunk is stored again instead (its new row replaces the broken one).
        Index look-ups only; the packs are not read.
        """
        entry = self._entry(chunk_id)
        for _ in range(MAX_CHAIN_LENGTH + 1):
            if entry is None:
                return False
            if entry.base is None:
                return True
            base = self._entry(entry.base)
            if base is not None and base.raw_len != entry.raw_len:
                return False
            entry = base
        return False  # longer than any reader follows: only damage makes such a chain

    def chain_length(self, entry: PackEntry) -> int:
        """How many deltas decoding ``entry`` resolves (0 for a keyframe), from the index alone."""
        return self.chain_end(entry)[0]

    def chain_end(self, entry: PackEntry) -> tuple[int, PackEntry]:
        """``(chain length, last entry of the chain)`` of ``entry``, from the index alone.

        The last entry is the keyframe the chain starts from (or, when the index lacks
        a base, the last entry found).
        """
        length = 0
        while entry.base is not None and length <= MAX_CHAIN_LENGTH:
            base = self._entry(entry.base)
            if base is None:
                break
            entry, length = base, length + 1
        return length, entry


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
        # Payload buffers go back here once written: fresh MiB-sized buffers cost page
        # faults on every use (see scratch.py), recycled ones do not.
        self._spare: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        # Every index look-up of this session, in one read transaction (the caller holds
        # the repository lock shared for the whole session: see SessionLookups).
        self._lookups = SessionLookups(store.index)

    def put_blobs(
        self,
        blobs: Sequence[memoryview],
        progress: Progress | None = None,
        *,
        dtypes: Sequence[str | None] | None = None,
        bases: Sequence[Sequence[bytes | None] | None] | None = None,
        known: Sequence[Sequence[bytes] | None] | None = None,
    ) -> list[list[bytes]]:
        """Store many blobs, pipelining hashing, encoding and writing across the thread pool.

        ``dtypes[i]`` (the element type of blob ``i``) selects byte-plane coding for
        floats; ``bases[i][j]`` is the chunk id to try an XOR delta against for chunk
        ``j`` of blob ``i`` (the chunk at the same place in the parent commit), or None.
        At most a bounded window of pool tasks is in flight (a task is one chunk, or a run
        of small chunks up to ``_GROUP_BYTES``), so no second copy of the state is ever
        held. ``progress(done_bytes, total_bytes)`` is called as chunks are stored.
        ``known[i]``, when given, is the list of blob ``i``'s chunk ids, already stored with
        their chains (the caller checked it: ckptvcs.reuse): the blob is not read at all.
        """
        store = self._store
        window = 2 * store._workers + 2
        pending: deque[tuple[list[int], Future[list[_Encoded]]]] = deque()
        result: list[list[bytes]] = []
        total = sum(len(b) for b in blobs)
        done = 0
        group: list[tuple[memoryview, int, bytes | None]] = []
        group_blobs: list[int] = []
        group_bytes = 0

        def drain_one() -> None:
            nonlocal done
            blob_nos, fut = pending.popleft()
            for blob_no, enc in zip(blob_nos, fut.result()):
                result[blob_no].append(enc.chunk_id)
                self.stats.hashed_bytes += enc.raw_len if not enc.known else 0
                before = self.stats.new_stored_bytes
                self._append(enc)
                self.stats.blob_new_stored_bytes[first + blob_no] += self.stats.new_stored_bytes - before
                done += enc.raw_len
                if progress is not None:
                    progress(done, total)

        def submit_group() -> None:
            nonlocal group, group_blobs, group_bytes
            if len(pending) >= window:
                drain_one()
            pending.append((group_blobs, store.pool.submit(self._encode_group, group)))
            group, group_blobs, group_bytes = [], [], 0

        first = len(self.stats.blob_new_stored_bytes)
        self.stats.blob_new_stored_bytes += [0] * len(blobs)
        for blob_no, blob in enumerate(blobs):
            result.append([])
            self.stats.logical_bytes += len(blob)
            layout = planes.layout_for_dtype(dtypes[blob_no] if dtypes is not None else None)
            blob_bases = bases[blob_no] if bases is not None else None
            blob_known = known[blob_no] if known is not None else None
            for chunk_no, (start, end) in enumerate(store.split(len(blob))):
                if blob_known is not None:
                    if group:  # keep the chunks in order
                        submit_group()
                    if len(pending) >= window:
                        drain_one()
                    pending.append(([blob_no], _known(blob_known[chunk_no], end - start)))
                    self.stats.known_chunks += 1
                    continue
                base_id = blob_bases[chunk_no] if blob_bases is not None and chunk_no < len(blob_bases) else None
                group.append((blob[start:end], layout, base_id))
                group_blobs.append(blob_no)
                group_bytes += end - start
                if end - start >= _GROUP_CHUNK or group_bytes >= _GROUP_BYTES:
                    submit_group()
        if group:
            submit_group()
        while pending:
            drain_one()
        return result

    def _encode_group(self, chunks: list[tuple[memoryview, int, bytes | None]]) -> list[_Encoded]:
        """One pool task: consecutive chunks of put_blobs, each encoded as by ``_encode``."""
        return [self._encode(raw, layout, base_id) for raw, layout, base_id in chunks]

    def _encode(self, raw: memoryview, layout: int = planes.BYTES, base_id: bytes | None = None) -> _Encoded:
        """One chunk's pool task: hash, dedup check, delta base, encode (see put_blobs)."""
        local = self._store._session
        local.lookups = self._lookups
        try:
            return self._encode_chunk(raw, layout, base_id)
        finally:
            local.lookups = None

    def _encode_chunk(self, raw: memoryview, layout: int, base_id: bytes | None) -> _Encoded:
        cid = chunk_hash(raw)
        if cid in self._written or self._store.has_complete_chain(cid):
            return _Encoded(cid, len(raw))
        base, plain_estimate = self._delta_base(base_id, cid, len(raw))
        taken: list[bytearray] = []

        def allocate(n: int) -> memoryview:
            if n < _SMALL_PAYLOAD:  # a fresh chunk-sized buffer would cost more than the encoding
                return memoryview(bytearray(n))
            try:
                buf = self._spare.get_nowait()
            except queue.Empty:
                buf = bytearray(self._store.chunk_size)
            if len(buf) < n:
                buf = bytearray(n)
            taken.append(buf)
            return memoryview(buf)[:n]

        enc = codec.encode(
            raw, cid, layout=layout, base=base, plain_estimate=plain_estimate,
            verify=self._store.verify_encoding, allocate=allocate,
        )
        payload_buffer = None
        for buf in taken:  # at most one holds the payload; the others go straight back
            if isinstance(enc.payload, memoryview) and enc.payload.obj is buf:
                payload_buffer = buf
            else:
                self._spare.put(buf)
        return _Encoded(cid, len(raw), enc.codec, enc.payload, enc.base, payload_buffer)

    def _delta_base(
        self, base_id: bytes | None, chunk_id: bytes, raw_len: int
    ) -> tuple[tuple[bytes, memoryview] | None, float | None]:
        """``((base id, base bytes), plain estimate)`` when a delta against ``base_id`` is allowed.

        Allowed when the chunk is at least ``min_delta_bytes`` long, the base is stored,
        has the chunk's length, and a delta on top of
        it keeps its chain within ``keyframe_interval - 1`` deltas (so every K-th
        version of a chunk, at the latest, is a keyframe). A base that fails its own
        verification is not built upon: the chunk becomes a keyframe instead (None).
        The plain estimate is the stored fraction of the chain's keyframe: what a
        self-contained encoding of this chunk is likely to reach (codec.encode skips
        computing one when the delta clearly beats it).
        """
        store = self._store
        if base_id is None or base_id == chunk_id or store.keyframe_interval <= 1 or raw_len < store.min_delta_bytes:
            return None, None
        entry = store._entry(base_id)
        if entry is None or entry.raw_len != raw_len:
            return None, None
        length, keyframe = store.chain_end(entry)
        if length + 1 > store.keyframe_interval - 1:
            return None, None
        try:
            base = base_id, store.read_chunk(base_id, describe=lambda: "delta base", reuse=True)
        except IntegrityError:
            return None, None
        estimate = keyframe.stored_len / keyframe.raw_len if keyframe.base is None and keyframe.raw_len else None
        return base, estimate

    def _append(self, enc: _Encoded) -> None:
        try:
            self._write_chunk(enc)
        finally:
            if enc.buffer is not None:
                enc.payload = None
                self._spare.put(enc.buffer)

    def _write_chunk(self, enc: _Encoded) -> None:
        self.stats.chunks += 1
        if enc.payload is None or enc.chunk_id in self._written:
            return
        if self._writer is None:
            with _fs.storage_errors("creating a pack"):
                self._writer = PackWriter(self._store.backend)
        with _fs.storage_errors(f"writing pack {self._writer.name}"):
            self._writer.add(enc.chunk_id, enc.codec, enc.raw_len, enc.payload, base=enc.base)
        self._written.add(enc.chunk_id)
        self.stats.new_chunks += 1
        self.stats.delta_chunks += enc.base is not None
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
        self._lookups.reset()  # no read transaction of ours open while the index is written
        if self._store.backend.capabilities.local_path:
            self._store.index.add(writer.entries)
        else:
            # Its index object first, before anything (the index, a manifest) names its chunks.
            with _fs.storage_errors(f"writing the index of pack {writer.name}"):
                index_sealed_pack(writer)
            self._store.index.add_pack(writer.name, writer.entries, replace=True)
        self.stats.packs.append(writer.name)

    def finish(self) -> WriteStats:
        """Seal and index the open pack; after this every chunk written is durable."""
        self._seal()
        self._lookups.close()
        return self.stats

    def abort(self) -> None:
        """Drop the unsealed pack, if any (sealed ones stay as garbage for gc)."""
        self._lookups.close()
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

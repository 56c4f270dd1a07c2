"""Repack: reverse the delta chains of branch tips, so the newest checkpoint loads from keyframes.

A commit stores each changed chunk as an XOR delta against the chunk at the same place in
its parent (docs/format.md, section 5.5): the *oldest* version of a chain is the keyframe
and the newest, the one a resume loads, sits deepest. Repack turns such a chain around,
as git's repack does: the tip's chunk is re-encoded whole (a keyframe) and the older
versions become deltas against their newer neighbour. XOR is symmetric, so the delta of
version i against version i+1 is byte for byte the payload version i+1 held against
version i: only the tip's chunk is encoded anew; every other payload is copied verbatim
with its base swapped. Chunk ids are content hashes, so manifests and commits do not
change: only pack entries and index rows do.

Planning works on the index rows alone (:func:`plan`); :func:`write` then reads, encodes,
verifies (every new entry is decoded and must hash to its id) and seals the new packs.
:meth:`ckptvcs.Repo.repack` sequences it under the exclusive repository lock: new packs
sealed first, then one index transaction, then gc's sweep releases the superseded
entries. Rules the plan keeps:

- no cycle: the chain from a tip to its keyframe is a path in a forest (every chunk has at
  most one base); reversing a prefix of that path keeps it a forest;
- every chunk's chain length stays at most ``keyframe_interval - 1``: a chain member is
  turned around only while it, and every other chunk that builds on it, stays within the
  bound (what builds on it gets deeper when it moves up the reversed chain);
- a chunk that is itself some tip's chunk is never made a delta (its own tip keeps it a
  keyframe), so several branches sharing history each load from keyframes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from . import _fs, codec, planes
from .errors import CkptvcsError, IntegrityError
from .objects import Manifest
from .pack import PackEntry, PackWriter
from .store import MAX_CHAIN_LENGTH, PACK_TARGET_SIZE, ChunkStore, chunk_hash

__all__ = ["Chain", "RepackReport", "plan", "write", "SWEEP_DEAD_FRACTION"]

SWEEP_DEAD_FRACTION = 0.25
"""The sweep after a repack rewrites a pack whose dead bytes reach this fraction (gc's own
default is 0.5). Dense updates leave a commit's pack with its deltas superseded and a
few keyframes the writer chose still live: at gc's half, many such packs would keep
their dead deltas (measured: 4-7% more bytes after a repack per save); lower than
this, a pack of mostly unchanged (frozen) chunks would be copied for a small dead part."""


@dataclass(frozen=True)
class Chain:
    """One turned-around chain: ``chunks[0]`` (a tip's chunk) becomes a keyframe and
    ``chunks[i]`` a delta against ``chunks[i - 1]`` whose payload is ``payloads[i - 1]``'s
    (an existing pack entry holding ``chunks[i] XOR chunks[i - 1]``)."""

    chunks: tuple[bytes, ...]
    payloads: tuple[PackEntry, ...]
    layout: int  # byte-plane layout of the new keyframe (from the tip manifest's dtype)
    raw_len: int


@dataclass
class RepackReport:
    """What a repack did (or, with ``dry_run``, would do)."""

    dry_run: bool
    tips: int = 0  # branch tips (and a detached HEAD) looked at
    tip_chunks: int = 0  # distinct chunks of their manifests
    delta_tip_chunks: int = 0  # of those, stored as deltas before the repack
    keyframes: int = 0  # tip chunks (re-)encoded whole
    rebased: int = 0  # older versions turned into deltas against a newer one (payload copied)
    partial: int = 0  # chains turned around only in part (the chain bound, or another tip's chunk)
    stored_bytes_before: int = 0  # payload bytes of the entries replaced
    stored_bytes_after: int = 0  # payload bytes of their replacements
    packs_written: list[str] = field(default_factory=list)
    pack_bytes_before: int = 0
    pack_bytes_after: int = 0
    seconds: float = 0.0
    gc: dict[str, object] | None = None  # what the sweep of the superseded entries did

    def summary(self) -> str:
        if not self.keyframes:
            stuck = f"; {self.delta_tip_chunks} delta chunk(s) whose chain does not resolve (run fsck)"
            return (f"nothing to repack: {self.tip_chunks} chunk(s) of {self.tips} tip(s)"
                    + (stuck if self.delta_tip_chunks else ", every one a keyframe"))
        verb = "would re-encode" if self.dry_run else "re-encoded"
        text = (f"{verb} {self.keyframes} tip chunk(s) of {self.tips} tip(s) as keyframes "
                f"({self.delta_tip_chunks} of {self.tip_chunks} tip chunks were deltas) and "
                f"turned {self.rebased} older version(s) into deltas against newer ones")
        if self.dry_run:
            return text + f"; payload bytes {self.stored_bytes_before} -> about {self.stored_bytes_after} (estimate)"
        return (text + f"; packs {self.pack_bytes_before} -> {self.pack_bytes_after} bytes, "
                f"{len(self.packs_written)} pack(s) written, {self.seconds:.2f} s")


class _Rows:
    """The index rows as the plan rewrites them: base links and which entry holds each
    chunk's delta payload, plus the reverse links (what builds on a chunk)."""

    def __init__(self, rows: Mapping[bytes, PackEntry]) -> None:
        self.rows = rows
        self.base: dict[bytes, bytes | None] = {}
        self.payload: dict[bytes, PackEntry] = {}  # entry holding `chunk XOR base` (deltas only)
        self.children: dict[bytes, set[bytes]] = {}
        for cid, row in rows.items():
            if row.base is not None:
                self.children.setdefault(row.base, set()).add(cid)

    def base_of(self, cid: bytes) -> bytes | None:
        if cid in self.base:
            return self.base[cid]
        row = self.rows.get(cid)
        return None if row is None else row.base

    def payload_of(self, cid: bytes) -> PackEntry:
        return self.payload.get(cid) or self.rows[cid]

    def height(self, cid: bytes, exclude: bytes | None, limit: int) -> int:
        """Longest chain of chunks building on ``cid`` (but not through ``exclude``), up to ``limit``."""
        best = 0
        for child in self.children.get(cid, ()):
            if child == exclude:
                continue
            best = max(best, 1 + (self.height(child, None, limit - 1) if limit > 0 else 0))
            if best > limit:
                break
        return best

    def relink(self, cid: bytes, base: bytes | None) -> None:
        old = self.base_of(cid)
        if old is not None:
            self.children.get(old, set()).discard(cid)
        if base is not None:
            self.children.setdefault(base, set()).add(cid)
        self.base[cid] = base


def plan(rows: Mapping[bytes, PackEntry], tip_chunks: Mapping[bytes, int], keyframe_interval: int) -> list[Chain]:
    """The chains to turn around: one per tip chunk stored as a delta.

    ``rows``: the index (chunk id → entry); ``tip_chunks``: chunk id → byte-plane layout,
    for every chunk of a tip manifest. A chain whose links do not resolve in ``rows``
    (missing base, another length, absurd length: damage fsck reports) is left alone.
    """
    state = _Rows(rows)
    limit = max(0, keyframe_interval - 1)
    chains: list[Chain] = []
    for tip in sorted(tip_chunks):
        path = _path_to_keyframe(state, tip)
        if path is None or len(path) < 2:
            continue
        keep = 0  # how far up the path the reversal goes: path[1..keep] become deltas
        for i in range(1, len(path)):
            member = path[i]
            if i > limit or member in tip_chunks or i + state.height(member, path[i - 1], limit) > limit:
                break
            keep = i
        chunks = path[: keep + 1]
        payloads = tuple(state.payload_of(c) for c in chunks[:-1])  # chunks[i] gets payloads[i - 1]
        for i in range(keep, 0, -1):
            state.payload[chunks[i]] = payloads[i - 1]
            state.relink(chunks[i], chunks[i - 1])
        state.relink(chunks[0], None)
        state.payload.pop(chunks[0], None)
        chains.append(Chain(tuple(chunks), payloads, tip_chunks[tip], rows[tip].raw_len))
    return chains


def _path_to_keyframe(state: _Rows, tip: bytes) -> list[bytes] | None:
    """``[tip, its base, ..., keyframe]`` through the rows, or None when it does not resolve."""
    row = state.rows.get(tip)
    if row is None:
        return None
    path = [tip]
    while (base := state.base_of(path[-1])) is not None:
        base_row = state.rows.get(base)
        if base_row is None or base_row.raw_len != row.raw_len or len(path) > MAX_CHAIN_LENGTH or base in path:
            return None
        path.append(base)
    return path


def tip_layouts(manifests: Iterable[Manifest]) -> dict[bytes, int]:
    """Chunk id → byte-plane layout, for every chunk of the given manifests' blobs."""
    out: dict[bytes, int] = {}
    for manifest in manifests:
        for blob in manifest.blobs:
            layout = planes.layout_for_dtype(blob.get("dtype"))
            for chunk in blob["chunks"]:
                out.setdefault(bytes.fromhex(chunk), layout)
    return out


_Encoded = list[tuple[bytes, int, int, bytes | memoryview, bytes | None]]  # (id, codec, raw_len, payload, base)


def _encode_chain(store: ChunkStore, chain: Chain) -> _Encoded:
    """The new entries of one chain, each verified: its payload decodes (against its new
    base's verified bytes) to bytes whose BLAKE3 is its id."""
    tip = chain.chunks[0]
    raw = store.read_chunk(tip, describe=lambda: f"repack of chunk {tip.hex()}")  # verified read
    enc = codec.encode(raw, tip, layout=chain.layout, verify=True)
    if not _decodes_to(enc.codec, enc.payload, tip, len(raw), None):
        raise IntegrityError(f"repack: the keyframe encoding of chunk {tip.hex()} does not decode to its id; "
                             "nothing was changed", chunk_id=tip.hex())
    payload = enc.payload if isinstance(enc.payload, bytes) else bytes(enc.payload)  # never a scratch buffer
    out: _Encoded = [(tip, enc.codec, len(raw), payload, None)]
    previous = np.frombuffer(raw, dtype=np.uint8)
    for cid, source in zip(chain.chunks[1:], chain.payloads):
        with _fs.storage_errors(f"reading pack {source.pack}"):
            payload = bytes(store.packs.read_payload(source))
        decoded = np.empty(chain.raw_len, dtype=np.uint8)
        try:
            codec.decode_into(source.codec, payload, memoryview(decoded), base=previous)
        except CkptvcsError:
            decoded = None  # type: ignore[assignment]
        if decoded is None or chunk_hash(memoryview(decoded)) != cid:
            raise IntegrityError(
                f"repack: chunk {cid.hex()} does not decode from the payload of chunk {source.chunk_id.hex()} "
                f"(pack {source.pack}) against its newer version; nothing was changed: run `ckptvcs fsck`",
                chunk_id=source.chunk_id.hex(), pack=source.pack, offset=source.offset, damaged_on_disk=True,
            )
        out.append((cid, source.codec, chain.raw_len, payload, chain.chunks[len(out) - 1]))
        previous = decoded
    return out


def _decodes_to(kind: int, payload: bytes | memoryview, chunk_id: bytes, raw_len: int, base: np.ndarray | None) -> bool:
    out = np.empty(raw_len, dtype=np.uint8)
    try:
        codec.decode_into(kind, payload, memoryview(out), base=base)
    except CkptvcsError:
        return False
    return chunk_hash(memoryview(out)) == chunk_id


def write(store: ChunkStore, chains: list[Chain], progress: Callable[[int, int], None] | None = None) -> list[PackWriter]:
    """Encode, verify and write the new entries of ``chains`` into new sealed packs.

    Keyframes and deltas go to separate packs: the next repack turns the keyframes of
    today's tips into deltas, and a pack holding only them is then deleted whole by the
    sweep instead of staying half dead (or being copied). Chains are encoded on the
    store's thread pool, a bounded window ahead of the writers. Nothing is indexed here;
    an error aborts the open packs (sealed ones stay as garbage for gc: nothing indexes
    them).
    """
    sealed: list[PackWriter] = []
    writers: dict[bool, PackWriter] = {}  # is a delta → the open pack
    window = store._workers + 1  # chains in flight: each holds up to K chunk-sized payloads
    pending: deque[Future[_Encoded]] = deque()
    written = 0

    def seal(delta: bool) -> None:
        writer = writers.pop(delta)
        with _fs.storage_errors(f"sealing pack {writer.name}"):
            writer.seal()
        sealed.append(writer)

    def drain_one() -> None:
        nonlocal written
        for cid, kind, raw_len, payload, base in pending.popleft().result():
            delta = base is not None
            if delta not in writers:
                with _fs.storage_errors("creating a pack for repack"):
                    writers[delta] = PackWriter(store.backend)
            writer = writers[delta]
            with _fs.storage_errors(f"writing pack {writer.name}"):
                writer.add(cid, kind, raw_len, payload, base=base)
            if writer.size >= PACK_TARGET_SIZE:
                seal(delta)
        written += 1
        if progress is not None:
            progress(written, len(chains))

    try:
        for chain in chains:
            if len(pending) >= window:
                drain_one()
            pending.append(store.pool.submit(_encode_chain, store, chain))
        while pending:
            drain_one()
        for delta in list(writers):
            seal(delta)
    except BaseException:
        for fut in pending:
            fut.cancel()
        for writer in writers.values():
            writer.abort()
        raise
    return sealed

"""Chunk codecs: how a chunk's raw bytes become the payload stored in a pack.

Codecs (ids are on disk; docs/format.md section 5.2):

* ``RAW`` (0): the bytes as they are;
* ``ZSTD`` (1): one zstd frame;
* ``PLANES`` (2): the bytes grouped into byte planes (nibble planes for fp8, see
  planes.py), each plane a zstd frame or raw, whichever is smaller;
* ``XOR_PLANES`` (3): the XOR of the chunk with a *base* chunk of the same length (the
  chunk at the same tensor and offset in the parent commit), then coded as PLANES.
  Weights that moved by a small step keep their sign, exponent and high mantissa bits,
  so the XOR is zero there and those planes all but vanish.

Every codec is lossless. :func:`encode` tries the candidates that suit the chunk,
keeps the smallest, and verifies it by decoding it again and comparing the BLAKE3 of
the result with the chunk id (hashing releases the GIL; a Python byte compare would
not). A candidate that fails verification is dropped with a warning and the next
smallest is tried; raw bytes are the last resort, so a broken encoder can never store
a chunk that does not decode to its input.
"""

from __future__ import annotations

import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import zstandard

from . import planes, scratch
from .errors import CorruptObjectError, StateChangedError

__all__ = [
    "RAW", "ZSTD", "PLANES", "XOR_PLANES", "CODEC_NAMES", "USES_BASE", "Encoded",
    "EncodingRejectedWarning", "encode", "decode_into", "ChainDecoder", "decompress_object", "compress_object",
]

RAW = 0
ZSTD = 1
PLANES = 2
XOR_PLANES = 3
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd", PLANES: "planes", XOR_PLANES: "xor-planes"}
USES_BASE = frozenset({XOR_PLANES})

ZSTD_LEVEL = 1
# Stored only when it saves at least this fraction; otherwise the chunk (or plane) is
# kept raw, which decodes at memcpy speed.
_MIN_SAVING = 0.02

# A plane is compressed only if a sample of it saves this much (see _worth_compressing).
_SAMPLE_SLICE = 4096
_SAMPLE_MIN_SAVING = 0.03

# The XOR delta is kept without computing the self-contained candidates when it is at
# least this fraction smaller than what they are expected to reach (plain_estimate).
_SKIP_PLAIN_MARGIN = 0.05

_PLANE_HEADER = struct.Struct("<BB")  # layout, plane count
_PLANE_ENTRY = struct.Struct("<BI")  # mode, stored length
_PLANE_RAW = 0
_PLANE_ZSTD = 1

# Planes of float bytes are either near-random (zstd gives up on them at several GB/s)
# or low-entropy with short repeats (the exponent plane). For the latter, zstd's
# default level 1 spends its time finding 3-4 byte matches that gain little over its
# entropy coder; a tiny hash table and 7-byte minimum matches keep the entropy coding
# and drop most of the match search (measured: ~2-4x faster, a slightly smaller output).
_PLANE_PARAMS = dict(strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=8, chain_log=8,
                     search_log=1, min_match=7, target_length=0)

_local = threading.local()


class EncodingRejectedWarning(RuntimeWarning):
    """An encoder produced a payload that does not decode to its input (it was not stored)."""


def _compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects must not be shared between threads.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _plane_compressor() -> zstandard.ZstdCompressor:
    cctx = getattr(_local, "plane_cctx", None)
    if cctx is None:
        params = zstandard.ZstdCompressionParameters(**_PLANE_PARAMS, write_content_size=True)
        cctx = _local.plane_cctx = zstandard.ZstdCompressor(compression_params=params)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


@dataclass(frozen=True)
class Encoded:
    """A chosen encoding: codec id, payload, and the base chunk id it refers to (or None)."""

    codec: int
    payload: bytes | memoryview
    base: bytes | None = None


# -- encoding ------------------------------------------------------------------------


def encode(
    raw: memoryview,
    chunk_id: bytes,
    *,
    layout: int = planes.BYTES,
    base: tuple[bytes, memoryview | bytes | bytearray] | None = None,
    plain_estimate: float | None = None,
    verify: bool = True,
    allocate: Callable[[int], memoryview] | None = None,
) -> Encoded:
    """Return the smallest verified lossless encoding of one chunk.

    ``layout`` (planes.layout_for_dtype) selects byte-plane coding for float data;
    ``base`` is ``(base chunk id, its raw bytes)`` to try an XOR delta against (same
    length as ``raw``). ``plain_estimate`` is the stored fraction a self-contained
    encoding is expected to reach (the delta chain's keyframe's, see the chunk store):
    when the XOR delta is tried first and already beats it clearly, the self-contained
    candidates are not computed at all (they would cost as much again and lose). With
    ``verify``, the winner is decoded again and must hash to ``chunk_id``; failing
    candidates are dropped (with an EncodingRejectedWarning).
    ``allocate(n)`` supplies the buffer a multi-part payload is assembled in (the
    write pipeline recycles them); by default a new one.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    # (codec, payload parts, total length, base id); only the winner's parts are joined.
    candidates: list[tuple[int, list[Any], int, bytes | None]] = []
    base_data = None
    if base is not None:
        base_id, base_bytes = base
        base_data = np.frombuffer(base_bytes, dtype=np.uint8)
        if base_data.shape == data.shape and base_id != chunk_id:
            delta = planes.xor_into(data, base_data, scratch.buffer("xor", data.shape[0]))
            parts = _plane_parts(delta, layout, "split-delta")
            candidates.append((XOR_PLANES, parts, sum(len(p) for p in parts), base_id))
    delta_wins = (
        bool(candidates) and plain_estimate is not None
        and candidates[0][2] <= len(raw) * plain_estimate * (1 - _SKIP_PLAIN_MARGIN)
    )
    if not delta_wins:
        if layout in (planes.BYTES, planes.NIBBLES):
            # For one-byte elements zstd's own entropy coder may beat the nibble split.
            packed = _compressor().compress(raw)
            candidates.append((ZSTD, [packed], len(packed), None))
        if layout != planes.BYTES:
            parts = _plane_parts(data, layout, "split")
            candidates.append((PLANES, parts, sum(len(p) for p in parts), None))
    limit = len(raw) * (1 - _MIN_SAVING)
    rejected = False
    for kind, parts, total, base_ref in sorted(candidates, key=lambda c: c[2]):
        if total > limit:
            break
        candidate = Encoded(kind, parts[0] if len(parts) == 1 else _join(parts, total, allocate), base_ref)
        if not verify or _decodes_to(candidate, chunk_id, len(raw), base_data):
            return candidate
        rejected = True
        warnings.warn(
            f"{CODEC_NAMES[candidate.codec]} encoding of chunk {chunk_id.hex()} does not decode to its input; "
            "not stored (this is a bug in ckptvcs or its compression library)",
            EncodingRejectedWarning,
            stacklevel=2,
        )
    if rejected:
        return _raw_fallback(raw, chunk_id)
    return Encoded(RAW, raw)


def _raw_fallback(raw: memoryview, chunk_id: bytes) -> Encoded:
    """The chunk stored as it is, after every candidate failed verification.

    A candidate also fails when ``raw`` (a view of live tensor memory) changed after it
    was hashed; storing ``raw`` then would put other bytes under ``chunk_id``. So the
    fallback stores a snapshot, and only when the snapshot still hashes to the id;
    otherwise the commit fails (StateChangedError) and nothing is stored.
    """
    snapshot = bytes(raw)
    if blake3.blake3(snapshot).digest() != chunk_id:
        raise StateChangedError(
            f"a tensor changed while it was being committed (chunk {chunk_id.hex()[:16]} no longer has the bytes "
            "it was hashed from); nothing was stored: commit again once the state is not being modified",
            chunk_id.hex(),
        )
    return Encoded(RAW, snapshot)


def _join(parts: list[Any], total: int, allocate: Callable[[int], memoryview] | None) -> bytes | memoryview:
    if allocate is None:
        return b"".join(parts)
    out = allocate(total)
    pos = 0
    for part in parts:
        out[pos : pos + len(part)] = part
        pos += len(part)
    return out


def _decodes_to(candidate: Encoded, chunk_id: bytes, raw_len: int, base: np.ndarray | None) -> bool:
    decoded = scratch.buffer("verify", raw_len)
    try:
        decode_into(candidate.codec, candidate.payload, memoryview(decoded), base=base)
    except CorruptObjectError:
        return False
    return blake3.blake3(decoded).digest() == chunk_id


def encode_planes(data: np.ndarray, layout: int) -> bytes:
    """The PLANES payload of ``data``: header, then each plane zstd-coded or raw, then the raw tail."""
    return b"".join(_plane_parts(data, layout, "split"))


def _plane_parts(data: np.ndarray, layout: int, slot: str) -> list[bytes | memoryview]:
    """The pieces of a PLANES payload, unjoined; raw planes are views of scratch ``slot``."""
    grouped, tail = planes.split(data, layout, scratch.buffer(slot, data.shape[0]) if layout > planes.NIBBLES else None)
    cctx = _plane_compressor()
    header = [_PLANE_HEADER.pack(layout, grouped.shape[0])]
    bodies: list[bytes | memoryview] = []
    for plane in grouped:
        packed = cctx.compress(plane) if _worth_compressing(plane, cctx) else b""
        if packed and len(packed) <= len(plane) * (1 - _MIN_SAVING):
            header.append(_PLANE_ENTRY.pack(_PLANE_ZSTD, len(packed)))
            bodies.append(packed)
        else:
            header.append(_PLANE_ENTRY.pack(_PLANE_RAW, len(plane)))
            bodies.append(memoryview(plane))
    return [b"".join(header), *bodies, memoryview(tail)]


def _worth_compressing(plane: np.ndarray, cctx: zstandard.ZstdCompressor) -> bool:
    """Whether a sample of the plane shrinks enough to make compressing all of it pay.

    The low mantissa planes of trained weights are nearly random: zstd then spends
    about as long as on compressible data to save under 2%. Compressing four spread
    4 KiB slices first (~2% of the work for a 1 MiB chunk) spots them; those planes
    are stored raw without further work.
    """
    n = plane.shape[0]
    if n < 4 * _SAMPLE_SLICE * 4:
        return True
    step = n // 4
    sample = np.concatenate([plane[i * step : i * step + _SAMPLE_SLICE] for i in range(4)])
    return len(cctx.compress(sample)) <= len(sample) * (1 - _SAMPLE_MIN_SAVING)  # type: ignore[arg-type]  # stub: bytes; any buffer works


# -- decoding ------------------------------------------------------------------------


def decode_into(
    codec: int,
    payload: bytes | memoryview,
    out: memoryview,
    *,
    base: memoryview | bytes | bytearray | np.ndarray | None = None,
) -> None:
    """Decode ``payload`` into ``out``, which has exactly the chunk's raw length.

    XOR_PLANES needs ``base``: the base chunk's raw bytes (already verified by the caller).
    Raises CorruptObjectError on any malformed payload.
    """
    if codec == RAW:
        if len(payload) != len(out):
            raise CorruptObjectError(f"raw chunk holds {len(payload)} bytes, expected {len(out)}")
        out[:] = payload
        return
    if codec == ZSTD:
        _zstd_into(payload, out)
        return
    if codec in (PLANES, XOR_PLANES):
        target = np.frombuffer(out, dtype=np.uint8)
        _decode_planes(payload, target)
        if codec == XOR_PLANES:
            if base is None:
                raise CorruptObjectError("delta chunk decoded without its base")
            base_data = base if isinstance(base, np.ndarray) else np.frombuffer(base, dtype=np.uint8)
            if base_data.shape != target.shape:
                raise CorruptObjectError(f"delta base holds {base_data.shape[0]} bytes, expected {len(out)}")
            planes.xor_into(target, base_data, target)
        return
    raise CorruptObjectError(f"unknown chunk codec {codec}; written by a newer ckptvcs?")


def _zstd_into(payload: bytes | memoryview, out: memoryview | np.ndarray) -> None:
    """Decompress one zstd frame straight into ``out``, which it must fill exactly."""
    out = memoryview(out).cast("B") if not isinstance(out, memoryview) else out
    try:
        with _decompressor().stream_reader(payload, read_across_frames=False) as reader:
            filled = 0
            while filled < len(out):
                n = reader.readinto(out[filled:])
                if n == 0:
                    break
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as err:
        raise CorruptObjectError(f"zstd payload does not decode: {err}") from None
    if filled != len(out) or extra:
        raise CorruptObjectError(f"zstd payload decodes to the wrong length (expected {len(out)})")


@dataclass(frozen=True)
class _PlanesHeader:
    """A validated PLANES payload header: layout, each plane's (mode, stored length), lengths."""

    layout: int
    entries: list[tuple[int, int]]
    lengths: list[int]
    tail_len: int
    body_start: int


def _parse_planes(view: memoryview, nbytes: int) -> _PlanesHeader:
    if len(view) < _PLANE_HEADER.size:
        raise CorruptObjectError("planes payload is truncated")
    layout, count = _PLANE_HEADER.unpack_from(view)
    if layout not in planes.LAYOUTS:
        raise CorruptObjectError(f"planes payload has an unknown layout {layout}")
    lengths, tail_len = planes.plane_lengths(layout, nbytes)
    if count != len(lengths):
        raise CorruptObjectError(f"planes payload has {count} planes, layout {layout} needs {len(lengths)}")
    pos = _PLANE_HEADER.size + count * _PLANE_ENTRY.size
    if len(view) < pos:
        raise CorruptObjectError("planes payload header is truncated")
    entries = [_PLANE_ENTRY.unpack_from(view, _PLANE_HEADER.size + i * _PLANE_ENTRY.size) for i in range(count)]
    if pos + sum(stored for _, stored in entries) + tail_len != len(view):
        raise CorruptObjectError("planes payload lengths do not add up")
    for (mode, stored), length in zip(entries, lengths):
        if mode == _PLANE_RAW and stored != length:
            raise CorruptObjectError(f"raw plane holds {stored} bytes, expected {length}")
        if mode not in (_PLANE_RAW, _PLANE_ZSTD):
            raise CorruptObjectError(f"planes payload has an unknown plane mode {mode}")
    return _PlanesHeader(layout, entries, lengths, tail_len, pos)


def _plane_bodies(view: memoryview, header: _PlanesHeader) -> list[tuple[int, memoryview]]:
    """``(mode, stored bytes)`` of each plane, in order."""
    bodies = []
    pos = header.body_start
    for mode, stored in header.entries:
        bodies.append((mode, view[pos : pos + stored]))
        pos += stored
    return bodies


def _decode_planes(payload: bytes | memoryview, out: np.ndarray) -> None:
    view = memoryview(payload)
    header = _parse_planes(view, out.shape[0])
    layout, lengths = header.layout, header.lengths
    count = len(lengths)
    if layout == planes.BYTES:
        rows = out.reshape(1, -1)
    else:
        rows = scratch.buffer("decode-planes", count * lengths[0]).reshape(count, lengths[0])
    decoded: list[np.ndarray] = []  # raw planes are merged straight from the payload
    for row, (mode, body) in zip(rows, _plane_bodies(view, header)):
        if mode == _PLANE_RAW:
            if layout == planes.BYTES:
                row[:] = np.frombuffer(body, dtype=np.uint8)
            decoded.append(np.frombuffer(body, dtype=np.uint8))
        else:
            _zstd_into(body, memoryview(row))
            decoded.append(row)
    if layout != planes.BYTES:
        tail = np.frombuffer(view[len(view) - header.tail_len :], dtype=np.uint8)
        planes.merge_into(decoded, tail, layout, out)


class ChainDecoder:
    """Decodes a whole delta chain in the plane domain: one interleave at the end.

    XOR commutes with the byte-plane split (both only move bits around), so the planes
    of a chunk at the top of a chain are the XOR of the planes of its keyframe and of
    every delta above it. Feeding the keyframe and then each delta (oldest first) to
    :meth:`add` accumulates those planes; :meth:`finish` interleaves them once into
    ``out``. Decoding level by level instead would interleave (and, to verify, hash)
    every level. Only chains whose levels share one plane layout take this path:
    :meth:`add` returns False for anything else, and the caller decodes level by level.
    Nothing here is verified: the caller hashes ``out`` against the top chunk's id.
    """

    def __init__(self, out: memoryview) -> None:
        self._out = np.frombuffer(out, dtype=np.uint8)
        self._layout: int | None = None
        self._rows: np.ndarray | None = None
        self._tail: np.ndarray | None = None

    def add(self, codec: int, payload: bytes | memoryview) -> bool:
        """Fold in the next level of the chain; False when this chain needs the slow path."""
        view = memoryview(payload)
        n = self._out.shape[0]
        if self._layout is None:
            if codec in (RAW, ZSTD):
                decode_into(codec, view, memoryview(self._out))
                self._layout, self._rows, self._tail = planes.BYTES, self._out.reshape(1, -1), self._out[:0]
                return True
            if codec != PLANES:
                return False
            header = _parse_planes(view, n)
            self._layout = header.layout
            if header.layout == planes.BYTES:
                self._rows, self._tail = self._out.reshape(1, -1), self._out[:0]
            else:
                count, length = len(header.lengths), header.lengths[0]
                self._rows = scratch.buffer("chain-planes", count * length).reshape(count, length)
                self._tail = scratch.buffer("chain-tail", header.tail_len)
                self._tail[:] = np.frombuffer(view[len(view) - header.tail_len :], dtype=np.uint8)
            for row, (mode, body) in zip(self._rows, _plane_bodies(view, header)):
                if mode == _PLANE_RAW:
                    row[:] = np.frombuffer(body, dtype=np.uint8)
                else:
                    _zstd_into(body, memoryview(row))
            return True
        if codec != XOR_PLANES:
            return False
        header = _parse_planes(view, n)
        if header.layout != self._layout:
            return False
        assert self._rows is not None and self._tail is not None
        for row, (mode, body) in zip(self._rows, _plane_bodies(view, header)):
            if mode == _PLANE_RAW:
                planes.xor_into(row, np.frombuffer(body, dtype=np.uint8), row)
            else:
                delta = scratch.buffer("chain-delta", row.shape[0])
                _zstd_into(body, memoryview(delta))
                planes.xor_into(row, delta, row)
        if header.tail_len:
            planes.xor_into(self._tail, np.frombuffer(view[len(view) - header.tail_len :], dtype=np.uint8), self._tail)
        return True

    def finish(self) -> None:
        """Interleave the accumulated planes into ``out``."""
        if self._layout is None or self._rows is None or self._tail is None:
            raise CorruptObjectError("delta chain decoded without a keyframe")
        if self._layout != planes.BYTES:
            planes.merge_into(list(self._rows), self._tail, self._layout, self._out)


# -- metadata objects ------------------------------------------------------------------


def compress_object(data: bytes) -> bytes:
    """Compress a small metadata object (commit, manifest, tag)."""
    return _compressor().compress(data)


def decompress_object(data: bytes, max_size: int) -> bytes:
    """Decompress a metadata object, refusing to expand past ``max_size`` bytes.

    The limit holds before any allocation: zstandard sizes its output from the size a
    frame declares (ignoring ``max_output_size``), so a declared size over the limit is
    refused from the header, and a frame that declares none is streamed to the limit.
    """
    try:
        declared = zstandard.get_frame_parameters(data).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN:
            if declared > max_size:
                raise CorruptObjectError(f"object declares {declared} bytes, over its limit of {max_size}")
            return _decompressor().decompress(data, max_output_size=max_size)
        with _decompressor().stream_reader(data) as reader:
            out = reader.read(max_size + 1)
        if len(out) > max_size:
            raise CorruptObjectError(f"object expands past its limit of {max_size} bytes")
        return out
    except zstandard.ZstdError as err:
        raise CorruptObjectError(f"object does not decompress: {err}") from None


def decompress_prefix(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) of a compressed metadata object, decoding no more."""
    try:
        out = b""
        with _decompressor().stream_reader(data) as reader:
            while len(out) < size:
                block = reader.read(size - len(out))
                if not block:
                    break
                out += block
        return out
    except zstandard.ZstdError as err:
        raise CorruptObjectError(f"object does not decompress: {err}") from None

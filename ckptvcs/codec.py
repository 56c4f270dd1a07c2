"""Chunk codecs: how a chunk's raw bytes become the payload stored in a pack.

Every codec is lossless and every encoding is verified by decoding it again before it
is stored (a compressor bug must not turn into silent corruption). The codec id is
recorded with each stored chunk; ids 2 and up are reserved for tensor-aware codecs
(byte planes, XOR delta against a base chunk) and readers refuse ids they don't know.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from .errors import CorruptObjectError

__all__ = ["RAW", "ZSTD", "CODEC_NAMES", "encode", "decode_into", "decompress_object", "compress_object"]

RAW = 0
ZSTD = 1
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd"}

ZSTD_LEVEL = 1
# Stored only when it saves at least this fraction; otherwise the chunk is kept raw,
# which decodes at memcpy speed.
_MIN_SAVING = 0.02

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects must not be shared between threads.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode(raw: memoryview, chunk_id: bytes, *, verify: bool = True) -> tuple[int, bytes | memoryview]:
    """Return ``(codec, payload)`` for a chunk, choosing the smallest lossless form.

    With ``verify``, a compressed payload is decoded again and must hash to
    ``chunk_id`` (hashing releases the GIL; a byte-by-byte compare would not).
    """
    compressed = _compressor().compress(raw)
    if len(compressed) > len(raw) * (1 - _MIN_SAVING):
        return RAW, raw
    if verify:
        decoded = _decompressor().decompress(compressed, max_output_size=len(raw))
        if blake3.blake3(decoded).digest() != chunk_id:
            raise CorruptObjectError("zstd produced an encoding that does not decode to its input")
    return ZSTD, compressed


def decode_into(codec: int, payload: bytes | memoryview, out: memoryview) -> None:
    """Decode ``payload`` into ``out``, which has exactly the chunk's raw length."""
    if codec == RAW:
        if len(payload) != len(out):
            raise CorruptObjectError(f"raw chunk holds {len(payload)} bytes, expected {len(out)}")
        out[:] = payload
        return
    if codec == ZSTD:
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
        return
    raise CorruptObjectError(f"unknown chunk codec {codec}; written by a newer ckptvcs?")


def compress_object(data: bytes) -> bytes:
    """Compress a small metadata object (commit, manifest, tag)."""
    return _compressor().compress(data)


def decompress_object(data: bytes, max_size: int) -> bytes:
    """Decompress a metadata object, refusing to expand past ``max_size`` bytes."""
    try:
        return _decompressor().decompress(data, max_output_size=max_size)
    except zstandard.ZstdError as err:
        raise CorruptObjectError(f"object does not decompress: {err}") from None

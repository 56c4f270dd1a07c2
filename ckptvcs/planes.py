"""Byte-plane (and nibble-plane) grouping of a chunk's bytes, and the XOR used by deltas.

A float stores sign, exponent and mantissa in fixed bytes of each element. Weights of a
trained model share a narrow range of exponents, so the byte holding the exponent is
very repetitive across elements while the low mantissa bytes are close to random. Raw
bytes interleave the two and a compressor sees noise; grouping byte *i* of every
element into plane *i* puts the compressible bytes together, so each plane can be
compressed (or stored raw) on its own. One-byte floats (fp8) are split into their high
and low nibbles instead, for the same reason.

The transforms here are pure array shuffles (numpy releases the GIL for them); they
never compress and never check ids. ``layout`` numbers are part of the on-disk format
(docs/format.md, section 5.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import scratch

__all__ = ["BYTES", "NIBBLES", "LAYOUTS", "layout_for_dtype", "split", "merge_into", "plane_lengths", "xor_into"]

BYTES = 0  # one plane: the bytes as they are
NIBBLES = 1  # two planes: high nibbles, low nibbles, each packed two to a byte
LAYOUTS = (BYTES, NIBBLES, 2, 4, 8)  # 2/4/8: byte planes of elements of that width

_FLOAT_WIDTHS = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 2, "complex64": 4, "complex128": 8,
    "float8_e4m3fn": NIBBLES, "float8_e5m2": NIBBLES, "float8_e4m3fnuz": NIBBLES,
    "float8_e5m2fnuz": NIBBLES, "float8_e8m0fnu": NIBBLES,
    # numpy dtype strings (byte order included)
    "<f2": 2, "<f4": 4, "<f8": 8, "<c8": 4, "<c16": 8, ">f2": 2, ">f4": 4, ">f8": 8, ">c8": 4, ">c16": 8,
}


_UINT: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

# Up to this many bytes, split and merge_into use one strided copy (per plane) instead of
# shifts: the shifts' numpy calls and scratch buffers cost more than the bytes in a small
# chunk (measured, fp32: 2 against 6 us to split 3.6 KB, 2.4 against 11 us to merge).
_SMALL = 32 * 1024
# Elements this wide or wider take the strided copies at every size: with numpy 2.4 they
# beat the shifts per byte too (measured per MiB, merging into fresh memory as a load
# does: fp32 0.59 against 0.63 ms, fp64 0.65 against 0.77; splitting: fp32 0.31 against
# 0.38, fp64 0.31 against 0.72). Two-byte elements keep the shifts (0.46 against 0.51
# to merge, 0.22 against 0.31 to split).
_STRIDED_WIDTH = 4


def layout_for_dtype(dtype: str | None) -> int:
    """The plane layout that suits a blob's element type: byte planes for floats, else BYTES."""
    return _FLOAT_WIDTHS.get(dtype or "", BYTES)


def plane_lengths(layout: int, nbytes: int) -> tuple[list[int], int]:
    """``(length of each plane, length of the raw tail)`` for ``nbytes`` bytes in ``layout``.

    Byte planes cover the whole elements; the ``nbytes % width`` bytes left over (only
    in a blob's odd last chunk) are kept raw after the planes.
    """
    if layout == BYTES:
        return [nbytes], 0
    if layout == NIBBLES:
        half = (nbytes + 1) // 2
        return [half, half], 0
    count, tail = divmod(nbytes, layout)
    return [count] * layout, tail


def split(data: np.ndarray, layout: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``data`` (uint8, 1-D) into planes; returns ``(planes as rows of a 2-D array, raw tail)``.

    Byte planes are written into ``out`` (uint8, at least ``len(data)`` bytes) when given.
    """
    n = data.shape[0]
    if layout == BYTES:
        return data.reshape(1, n), data[:0]
    if layout == NIBBLES:
        padded = data if n % 2 == 0 else np.concatenate([data, np.zeros(1, np.uint8)])
        high = (padded[0::2] & 0xF0) | (padded[1::2] >> 4)
        low = (padded[0::2] << 4) | (padded[1::2] & 0x0F)
        return np.stack([high, low]), data[:0]
    count = n // layout
    if out is None:
        grouped = np.empty((layout, count), dtype=np.uint8)
    else:
        grouped = out[: layout * count].reshape(layout, count)
    if n <= _SMALL or layout >= _STRIDED_WIDTH:
        np.copyto(grouped, data[: count * layout].reshape(count, layout).T)
        return grouped, data[count * layout :]
    # Plane i is byte i of each element in memory order, i.e. bits 8i..8i+7 of the
    # little-endian integer: for two-byte elements a shift and a truncating cast per
    # plane beats a strided transpose copy.
    elements = data[: count * layout].view(_UINT[layout])
    shifted = scratch.buffer("split-shift", count * layout).view(_UINT[layout])  # no fresh temporary per plane
    np.copyto(grouped[0], elements, casting="unsafe")
    for i in range(1, layout):
        np.right_shift(elements, 8 * i, out=shifted)
        np.copyto(grouped[i], shifted, casting="unsafe")
    return grouped, data[count * layout :]


def merge_into(planes: Sequence[np.ndarray], tail: np.ndarray, layout: int, out: np.ndarray) -> None:
    """Inverse of :func:`split`: interleave ``planes`` (one 1-D uint8 array each) and ``tail`` into ``out``."""
    n = out.shape[0]
    if layout == BYTES:
        out[:] = planes[0]
        return
    if layout == NIBBLES:
        high, low = planes
        out[0::2] = ((high & 0xF0) | (low >> 4))[: (n + 1) // 2]
        out[1::2] = ((high << 4) | (low & 0x0F))[: n // 2]
        return
    count = n // layout
    if n <= _SMALL or layout >= _STRIDED_WIDTH:
        columns = out[: count * layout].reshape(count, layout)
        for i, plane in enumerate(planes):
            columns[:, i] = plane
    else:
        _combine(planes, out[: count * layout].view(_UINT[layout]))
    out[count * layout :] = tail


def _combine(planes: Sequence[np.ndarray], out: np.ndarray | None) -> np.ndarray:
    """The elements whose byte ``i`` is ``planes[i]``, built pairwise with shifts and ORs.

    Two halves are combined into integers of twice their width: ``out = high << w | low``.
    For two-byte elements the whole-array integer operations beat writing each plane
    into a strided byte column (see ``_STRIDED_WIDTH`` for the wider ones).
    ``out`` (unsigned integers ``len(planes)`` bytes wide, one per plane entry) receives
    the result; a single plane is returned as it is (``out`` is None then).
    """
    width = len(planes)
    if width == 1:
        return planes[0]
    assert out is not None
    half = width // 2
    count = planes[0].shape[0]
    low = _combine(planes[:half], _scratch_uint(f"merge-low-{half}", count, half))
    high = _combine(planes[half:], _scratch_uint(f"merge-high-{half}", count, half))
    np.copyto(out, high, casting="unsafe")
    np.left_shift(out, 8 * half, out=out)
    np.bitwise_or(out, low, out=out)
    return out


def _scratch_uint(slot: str, count: int, width: int) -> np.ndarray | None:
    """A scratch array of ``count`` unsigned integers of ``width`` bytes (None for bytes: the plane itself)."""
    return None if width == 1 else scratch.buffer(slot, count * width).view(_UINT[width])


def xor_into(data: np.ndarray, base: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = data XOR base`` (uint8 arrays of one length), eight bytes at a time where aligned."""
    n = data.shape[0]
    wide = n - n % 8
    if wide:
        np.bitwise_xor(data[:wide].view(np.uint64), base[:wide].view(np.uint64), out=out[:wide].view(np.uint64))
    if n - wide:
        np.bitwise_xor(data[wide:], base[wide:], out=out[wide:])
    return out

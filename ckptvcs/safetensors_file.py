"""Read and write the safetensors file format without the ``safetensors`` library.

ckptvcs imports and exports ``.safetensors`` checkpoints, but must not depend on the
``safetensors`` package, so the (small) format is implemented here:

    8 bytes   little-endian unsigned header length N
    N bytes   UTF-8 JSON object: name -> {"dtype", "shape", "data_offsets": [begin, end]},
              plus an optional "__metadata__": {str: str}
    rest      the byte buffer; offsets are relative to its start, data is little-endian
              and row-major contiguous

Files are untrusted input: the header is validated completely (sizes, dtypes, shapes,
offsets, overlaps) before the buffer is allocated, and every violation becomes a
one-line ``InvalidInputError`` naming the file. Reads use plain file reads, not mmap,
so the returned tensors own their memory and stay valid if the file changes later.
Only little-endian hosts are supported.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from . import _fs
from .errors import InvalidInputError, StorageError

__all__ = ["SAFETENSORS_DTYPES", "read_safetensors", "write_safetensors"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# The fp8 variants the ckptvcs state format stores, under the names of the reference
# implementation (safetensors' Rust Dtype): AMD's fnuz formats and the MX scale type.
SAFETENSORS_DTYPES.update({
    name: getattr(torch, attr)
    for name, attr in (("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                       ("F8_E8M0", "float8_e8m0fnu"))
    if isinstance(getattr(torch, attr, None), torch.dtype)
})

_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# The reference implementation's limit; it keeps a hostile header length from
# allocating gigabytes before anything has been checked.
MAX_HEADER_SIZE = 100_000_000
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# torch sizes and strides are int64: a shape whose extent exceeds this cannot be built.
_MAX_EXTENT = 2**63 - 1


def _require_little_endian(path: str) -> None:
    if sys.byteorder != "little":
        raise InvalidInputError(f"{path}: safetensors I/O is only supported on little-endian hosts")


# ---------------------------------------------------------------------------- reading


class _Entry:
    __slots__ = ("name", "dtype_name", "shape", "begin", "end")

    def __init__(self, name: str, dtype_name: str, shape: list[int], begin: int, end: int) -> None:
        self.name = name
        self.dtype_name = dtype_name
        self.shape = shape
        self.begin = begin
        self.end = end


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, a subclass of int; they are not sizes.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_header(path: str, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{err.reason} at byte {err.start}"
        raise InvalidInputError(f"{path}: header is not valid UTF-8 ({where})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as err:
        raise InvalidInputError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header


def _parse_metadata(path: str, value: Any) -> dict[str, str]:
    # The reference reader accepts an explicit null as "no metadata".
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{path}: __metadata__ must be an object of string values")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidInputError(
                f"{path}: __metadata__ value for {key!r} is {type(item).__name__}, expected a string"
            )
    return dict(value)


def _checked_numel(path: str, name: str, shape: list[int]) -> int:
    numel = 1
    extent = 1  # product of the non-zero dims: what torch's stride computation sees
    for dim in shape:
        numel *= dim
        extent *= max(dim, 1)
        if extent > _MAX_EXTENT:
            raise InvalidInputError(f"{path}: tensor {name!r} shape {shape} is too large")
    return numel


def _parse_entry(path: str, name: str, info: Any, buffer_len: int) -> _Entry:
    if not isinstance(info, dict):
        raise InvalidInputError(f"{path}: tensor {name!r} entry is not an object")
    keys = set(info)
    if keys != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - keys), sorted(keys - _ENTRY_KEYS)
        what = f"lacks {missing}" if missing else f"has unknown fields {extra}"
        raise InvalidInputError(f"{path}: tensor {name!r} entry {what}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise InvalidInputError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidInputError(
            f"{path}: tensor {name!r} shape {shape!r} is not a list of non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise InvalidInputError(f"{path}: tensor {name!r} data_offsets {offsets!r} are not two integers")
    begin, end = offsets
    if begin > end:
        raise InvalidInputError(
            f"{path}: tensor {name!r} data_offsets [{begin}, {end}] end before they begin"
        )
    if begin < 0 or end > buffer_len:
        raise InvalidInputError(
            f"{path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside the "
            f"{buffer_len}-byte data buffer (file truncated?)"
        )
    nbytes = _checked_numel(path, name, shape) * SAFETENSORS_DTYPES[dtype_name].itemsize
    if end - begin != nbytes:
        raise InvalidInputError(
            f"{path}: tensor {name!r} data_offsets [{begin}, {end}] do not match shape "
            f"{shape} of {dtype_name} ({nbytes} bytes)"
        )
    return _Entry(name, dtype_name, shape, begin, end)


def _check_no_overlap(path: str, entries: list[_Entry]) -> None:
    # entries are sorted by begin; empty entries occupy no bytes and cannot overlap.
    last: _Entry | None = None
    for entry in entries:
        if entry.begin == entry.end:
            continue
        if last is not None and entry.begin < last.end:
            raise InvalidInputError(
                f"{path}: tensors {last.name!r} [{last.begin}, {last.end}] and "
                f"{entry.name!r} [{entry.begin}, {entry.end}] overlap"
            )
        if last is None or entry.end > last.end:
            last = entry


def _read_exactly(path: str, f: Any, size: int, what: str) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    filled = 0
    while filled < size:
        n = f.readinto(view[filled:])
        if not n:
            raise InvalidInputError(
                f"{path}: file ended after {filled} of {size} bytes of {what} (truncated?)"
            )
        filled += n
    return buf


def _make_tensor(path: str, entry: _Entry, data: torch.Tensor) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES[entry.dtype_name]
    if entry.begin == entry.end:
        return torch.empty(entry.shape, dtype=dtype)
    raw = data[entry.begin : entry.end]
    if raw.data_ptr() % dtype.itemsize or entry.begin % dtype.itemsize:
        # torch cannot reinterpret a misaligned byte slice; a fresh allocation is aligned.
        raw = raw.clone()
    if dtype is torch.bool and bool((raw > 1).any()):
        # Any other byte value is undefined behaviour for a torch.bool tensor.
        raise InvalidInputError(f"{path}: tensor {entry.name!r} of dtype BOOL holds bytes other than 0 and 1")
    return raw.view(dtype).reshape(entry.shape)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file into CPU tensors and its metadata.

    Returns ``(tensors, metadata)``: tensors ordered by their data offset (then name),
    each owning its memory (no mmap: the file may change afterwards), and the
    ``__metadata__`` string map (empty when absent). The header is fully validated
    before the data buffer is allocated; a malformed or unreadable file, or a
    big-endian host, raises ``InvalidInputError`` with a one-line message naming ``path``.
    """
    name = os.fspath(path)
    _require_little_endian(name)
    try:
        with open(name, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise InvalidInputError(
                    f"{name}: file is {file_size} bytes, too short for a safetensors header length"
                )
            header_len = int.from_bytes(_read_exactly(name, f, 8, "header length"), "little")
            if header_len > MAX_HEADER_SIZE:
                raise InvalidInputError(
                    f"{name}: header length {header_len} exceeds the {MAX_HEADER_SIZE}-byte limit"
                )
            if 8 + header_len > file_size:
                raise InvalidInputError(
                    f"{name}: header length {header_len} runs past the end of the {file_size}-byte file"
                )
            header = _parse_header(name, bytes(_read_exactly(name, f, header_len, "header")))
            buffer_len = file_size - 8 - header_len
            metadata = _parse_metadata(name, header.pop(_METADATA_KEY, None))
            entries = [_parse_entry(name, key, info, buffer_len) for key, info in header.items()]
            entries.sort(key=lambda e: (e.begin, e.name))
            _check_no_overlap(name, entries)
            # Bytes past the last tensor (if any) are never read, let alone allocated.
            used = max((e.end for e in entries), default=0)
            data_bytes = _read_exactly(name, f, used, "tensor data")
    except OSError as err:
        raise InvalidInputError(f"{name}: cannot read: {err.strerror or err}") from None
    data = torch.frombuffer(data_bytes, dtype=torch.uint8) if used else torch.empty(0, dtype=torch.uint8)
    tensors = {entry.name: _make_tensor(name, entry, data) for entry in entries}
    return tensors, metadata


# ---------------------------------------------------------------------------- writing


def _prepare_tensor(path: str, key: Any, value: Any) -> torch.Tensor:
    if not isinstance(key, str):
        raise InvalidInputError(f"{path}: tensor key {key!r} is {type(key).__name__}, expected a string")
    if key == _METADATA_KEY:
        raise InvalidInputError(f"{path}: {_METADATA_KEY!r} is reserved and cannot name a tensor")
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{path}: value for {key!r} is {type(value).__name__}, not a tensor")
    if value.dtype not in _DTYPE_NAMES:
        raise InvalidInputError(
            f"{path}: tensor {key!r} has dtype {value.dtype}, which safetensors cannot store"
        )
    if value.layout is not torch.strided or value.is_nested:
        raise InvalidInputError(
            f"{path}: tensor {key!r} has layout {value.layout}; only dense tensors can be stored"
        )
    if value.is_meta:
        raise InvalidInputError(f"{path}: tensor {key!r} is on the meta device and has no data")
    return value


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # conj/neg bits are lazy views that .contiguous() keeps; materialize them first.
    t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _build_header(
    path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None
) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA_KEY] = metadata
    offset = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.dtype.itemsize
        header[key] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInputError(
            f"{path}: a tensor name or metadata string is not valid Unicode ({err.reason})"
        ) from None
    # Padding to 8 keeps the buffer, and with it every tensor, aligned for mmap readers.
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise InvalidInputError(
            f"{path}: header would be {len(raw)} bytes, over the {MAX_HEADER_SIZE}-byte limit"
        )
    return raw


def _check_metadata(path: str, metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"{path}: metadata is {type(metadata).__name__}, expected a mapping")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInputError(f"{path}: metadata entry {key!r}: {value!r} is not a string to a string")
    return dict(metadata)


def _write_file(path: str, header: bytes, tensors: list[tuple[str, torch.Tensor]]) -> None:
    opened = False
    try:
        # One atomic writer for every export (_fs.atomic_file): temp file, fsync, rename,
        # fsync of the directory; the umask decides the final permissions.
        with _fs.atomic_file(path) as f:
            opened = True
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for _, tensor in tensors:
                f.write(_tensor_bytes(tensor))
    except OSError as err:
        what = "cannot write" if opened else "cannot create temporary file"
        raise StorageError(f"{path}: {what}: {err.strerror or err}") from None


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (and optional string ``metadata``) to ``path`` as safetensors.

    Tensors may live on any device and need not be contiguous; tensors sharing storage
    are each written in full. They are laid out like the reference implementation
    (largest dtype first, then by name) so every tensor is aligned in the file. The file
    is written to a temporary name in the same directory and renamed into place, so a
    failure never leaves a partial file at ``path``. Non-string keys, non-tensor values,
    dtypes safetensors cannot represent, bad metadata or a big-endian host raise
    ``InvalidInputError`` (before anything is written); OS failures raise ``StorageError``.
    """
    name = os.fspath(path)
    _require_little_endian(name)
    checked_metadata = _check_metadata(name, metadata)
    items = [(key, _prepare_tensor(name, key, value)) for key, value in tensors.items()]
    items.sort(key=lambda item: (-item[1].dtype.itemsize, item[0]))
    header = _build_header(name, items, checked_metadata)
    _write_file(name, header, items)

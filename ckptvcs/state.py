"""Trainer state ⇄ manifest tree and raw blobs, without pickle.

``encode_state`` walks a nested structure of dicts, lists, tuples, tensors, arrays and
plain values, and produces a JSON tree (the manifest's ``root``) plus the byte blobs
the tree refers to. Torch tensors that share storage (tied weights, views) are stored
as one blob holding the span of storage they cover, and each tensor records its byte
offset, shape and strides in it; ``decode_state`` rebuilds them as views of one storage
again. Anything the format cannot represent is refused with its key path before a
single byte is written. Node encodings are specified in docs/format.md.
"""

from __future__ import annotations

import argparse
import enum
import math
import pathlib
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from . import _gcpause
from ._lazy import LazyMapping, LazyModule
from .errors import CorruptObjectError, InvalidInputError, UnsupportedValueError

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # imported on first use: reading manifests needs no torch

__all__ = [
    "BlobSource",
    "EncodedState",
    "encode_state",
    "decode_state",
    "blob_kinds",
    "select_keys",
    "validate_tree",
    "iter_tensors",
    "TORCH_DTYPES",
    "DTYPE_ITEMSIZE",
    "MapLocation",
]

MapLocation: TypeAlias = "str | torch.device | Mapping[str, str] | Callable[[str], str] | None"


# Bytes per element of every torch dtype the format names, known without importing torch.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float16": 2, "float32": 4, "float64": 8, "bfloat16": 2, "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
}


def _torch_dtypes() -> dict[str, torch.dtype]:
    """The dtypes of DTYPE_ITEMSIZE this torch build has."""
    return {
        name: getattr(torch, name)
        for name in DTYPE_ITEMSIZE
        if isinstance(getattr(torch, name, None), torch.dtype)
    }


TORCH_DTYPES: Mapping[str, torch.dtype] = LazyMapping(_torch_dtypes)
_NUMPY_KINDS = "biufc"
_INLINE_BYTES_LIMIT = 64 << 10
_MAX_INT_DIGITS = 4300  # Python's default int_max_str_digits: json refuses longer ints
_MAX_INT = 10**_MAX_INT_DIGITS
_SPAN_ALIGN = 16  # a multiple of every itemsize, so each view's offset stays aligned
MAX_STATE_DEPTH = 64  # nested containers in a state; each takes 3 JSON levels of the manifest


@dataclass
class BlobSource:
    """Bytes to store as one blob: a zero-copy view of the caller's memory where possible."""

    data: memoryview
    dtype: str  # element type of the bytes, a hint for tensor-aware codecs
    keepalive: Any = None  # the tensor or array that owns ``data``


@dataclass
class EncodedState:
    root: Any
    blobs: list[BlobSource] = field(default_factory=list)
    tensors: int = 0

    @property
    def nbytes(self) -> int:
        return sum(len(b.data) for b in self.blobs)


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class _Encoder:
    def __init__(self) -> None:
        self.state = EncodedState(root=None)
        # Storage groups: (device, storage pointer) → tensors that view that storage.
        self._groups: dict[tuple[str, int], list[tuple[dict[str, Any], torch.Tensor]]] = {}
        self._active: set[int] = set()  # containers on the current path, for cycle detection
        # The exact tensor types, for a fast path in _value: None when torch is not imported
        # (then no value can be a tensor); subclasses still go the long way and are refused.
        loaded = sys.modules.get("torch")
        self._tensor_type = None if loaded is None else loaded.Tensor
        self._parameter_type = None if loaded is None else loaded.nn.Parameter
        # Read once: a LazyModule looks up attributes that are not classes anew every time.
        self._strided: Any = None if loaded is None else loaded.strided
        self._uint8: Any = None if loaded is None else loaded.uint8
        self._dtype_names: dict[Any, str | None] = {}  # torch.dtype → its supported name, or None

    def encode(self, value: Any) -> EncodedState:
        self.state.root = self._value(value, "")
        self._emit_torch_blobs()
        return self.state

    def _blob(self, source: BlobSource) -> int:
        self.state.blobs.append(source)
        return len(self.state.blobs) - 1

    def _value(self, value: Any, path: str) -> Any:
        cls = type(value)  # fast paths for the commonest exact types; the checks below decide the same
        if cls is str:
            _check_utf8(value, path)
            return value
        if cls is self._tensor_type or cls is self._parameter_type:
            return self._tensor(value, path)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, enum.Enum):  # before int and str: IntEnum and StrEnum members are both
            return self._enum(value, path)
        if isinstance(value, np.generic) and value.dtype.kind in _NUMPY_KINDS:
            return self._npscalar(value, path)  # before float: np.float64 is a float subclass
        if isinstance(value, int):
            if not -_MAX_INT < value < _MAX_INT:
                raise UnsupportedValueError(
                    path, f"integer has more than {_MAX_INT_DIGITS} digits (JSON readers refuse it)"
                )
            return int(value)
        if isinstance(value, float):
            return {"float": _float(value)}
        if isinstance(value, str):
            _check_utf8(value, path)
            return value
        if isinstance(value, (bytes, bytearray)):
            return self._bytes(bytes(value), path)
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path)
        if isinstance(value, np.generic):
            return self._npscalar(value, path)
        if isinstance(value, torch.dtype):
            return {"dtype": _torch_dtype_name(value)}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, torch.Size):
            return {"size": [int(s) for s in value]}
        if isinstance(value, (dict, list, tuple)):
            return self._container(value, path)
        if isinstance(value, pathlib.PurePath):
            return self._path(value, path)
        if type(value) is argparse.Namespace:
            return {"namespace": self._items(vars(value), path)}
        raise UnsupportedValueError(
            path,
            f"type {type(value).__module__}.{type(value).__qualname__} is not supported; turn it into a dict "
            "of plain values (numbers, strings, tensors, arrays), e.g. its state_dict(), or, if it has "
            "state_dict()/load_state_dict(), register it with CheckpointManager(state={name: obj})",
        )

    def _container(self, value: dict[Any, Any] | list[Any] | tuple[Any, ...], path: str) -> Any:
        if id(value) in self._active:
            raise UnsupportedValueError(path, "the structure contains itself (a reference cycle)")
        if len(self._active) >= MAX_STATE_DEPTH:
            raise UnsupportedValueError(path, f"containers nest deeper than {MAX_STATE_DEPTH} levels")
        self._active.add(id(value))
        try:
            if isinstance(value, dict):
                if type(value) not in (dict, OrderedDict):
                    return self._dict_subclass(value, path)
                items = self._items(value, path)
                if isinstance(value, OrderedDict):
                    body: dict[str, Any] = {"items": items}
                    meta = getattr(value, "_metadata", None)
                    if meta is not None:
                        # nn.Module.state_dict() keeps per-module versions here.
                        body["meta"] = self._value(meta, _join(path, "_metadata"))
                    return {"odict": body}
                return {"dict": items}
            if type(value) not in (list, tuple):
                raise UnsupportedValueError(
                    path, f"{type(value).__qualname__} is not supported (use a plain list, tuple or dict)"
                )
            kind = "list" if isinstance(value, list) else "tuple"
            return {kind: [self._value(v, _join(path, i)) for i, v in enumerate(value)]}
        finally:
            self._active.discard(id(value))

    def _items(self, mapping: Mapping[Any, Any], path: str) -> list[list[Any]]:
        return [[self._key(k, path), self._value(v, _join(path, k))] for k, v in mapping.items()]

    def _dict_subclass(self, value: dict[Any, Any], path: str) -> Any:
        """A dict subclass that is a plain dict plus a name (Lightning's AttributeDict): its
        items and its class, which loading finds again among the imported modules."""
        cls = type(value)
        name = _class_name(cls, path)
        if isinstance(value, OrderedDict) or getattr(value, "__dict__", None) or not _rebuilds(cls, value):
            raise UnsupportedValueError(
                path, f"dict subclass {cls.__qualname__} holds state besides its items (attributes, order or a "
                "default factory); store dict(value) or its parts"
            )
        return {"dictsub": {"type": name, "items": self._items(value, path)}}

    def _enum(self, value: enum.Enum, path: str) -> Any:
        return {"enum": {"type": _class_name(type(value), path), "value": self._value(value.value, _join(path, "value"))}}

    def _path(self, value: pathlib.PurePath, path: str) -> Any:
        kind = type(value).__name__
        if kind not in _PATH_TYPES or type(value) is not getattr(pathlib, kind):
            raise UnsupportedValueError(path, f"path type {type(value).__qualname__} is not supported")
        text = str(value)
        _check_utf8(text, path)
        return {"path": {"type": kind, "value": text}}

    def _key(self, key: Any, path: str) -> Any:
        if type(key) is str:  # the common case, decided as below
            _check_utf8(key, path)
            return key
        if isinstance(key, bytes) and len(key) > _INLINE_BYTES_LIMIT:
            # Keys are decoded without blobs, so they must stay inline.
            raise UnsupportedValueError(_join(path, repr(key[:16]) + "..."), "bytes dict keys longer than 64 KiB")
        if isinstance(key, (str, int, float, bytes, type(None))) or (
            isinstance(key, tuple) and all(isinstance(k, (str, int, float, bool, type(None))) for k in key)
        ):
            return self._value(key, path)
        raise UnsupportedValueError(_join(path, repr(key)), f"dict key of type {type(key).__qualname__}")

    def _bytes(self, data: bytes, path: str) -> Any:
        if len(data) <= _INLINE_BYTES_LIMIT:
            return {"bytes": data.hex()}
        array = np.frombuffer(data, dtype=np.uint8)
        return {"bytes_blob": self._blob(BlobSource(memoryview(array), "uint8", array))}

    def _ndarray(self, array: np.ndarray, path: str) -> Any:
        if array.dtype.kind not in _NUMPY_KINDS or array.dtype.fields is not None:
            raise UnsupportedValueError(path, f"numpy dtype {array.dtype} is not supported")
        contiguous = np.ascontiguousarray(array)
        flat = contiguous.reshape(-1).view(np.uint8)
        blob = self._blob(BlobSource(memoryview(flat), array.dtype.str, contiguous))
        return {"ndarray": {"dtype": array.dtype.str, "shape": list(array.shape), "blob": blob}}

    def _npscalar(self, value: np.generic, path: str) -> Any:
        if value.dtype.kind not in _NUMPY_KINDS:
            raise UnsupportedValueError(path, f"numpy scalar of dtype {value.dtype} is not supported")
        return {"npscalar": {"dtype": value.dtype.str, "hex": value.tobytes().hex()}}

    def _tensor(self, t: torch.Tensor, path: str) -> Any:
        kind = type(t)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            raise UnsupportedValueError(path, f"tensor subclass {type(t).__qualname__} is not supported")
        if t.is_nested:
            raise UnsupportedValueError(path, "nested tensors are not supported (store their unbind() list)")
        if self._strided is None:
            self._strided, self._uint8 = torch.strided, torch.uint8
        if t.layout != self._strided:
            raise UnsupportedValueError(path, f"{t.layout} tensors are not supported (convert with .to_dense())")
        if t.is_quantized:
            raise UnsupportedValueError(path, "quantized tensors are not supported (store int_repr() and scales)")
        on_cpu = t.is_cpu  # a flag: reading t.device builds a device object
        device = "cpu" if on_cpu else str(t.device)
        if not on_cpu and t.device.type == "meta":
            raise UnsupportedValueError(path, "meta tensors have no data to store")
        name = self._dtype_name(t.dtype)
        if name is None:
            raise UnsupportedValueError(path, f"dtype {t.dtype} is not supported")
        node: dict[str, Any] = {"dtype": name, "shape": list(t.shape)}
        if not on_cpu:
            node["device"] = device
        if kind is torch.nn.Parameter:  # the exact type: subclasses were refused above
            node["param"] = True
        if t.requires_grad:
            node["requires_grad"] = True
        data = t.detach()
        if data.is_conj() or data.is_neg():
            data = data.resolve_conj().resolve_neg()  # the lazy bit is not in storage
        self.state.tensors += 1
        if data.numel() == 0:
            empty = torch.empty(0, dtype=torch.uint8)
            node.update(stride=[1] * data.dim(), offset=0, blob=self._blob(BlobSource(memoryview(empty.numpy()), name, empty)))
            return {"tensor": node}
        key = (device, data.untyped_storage().data_ptr())  # detaching and resolving keep the device
        self._groups.setdefault(key, []).append((node, data))
        return {"tensor": node}

    def _dtype_name(self, dtype: torch.dtype) -> str | None:
        """The format's name of a torch dtype, None when the format lacks it (memoized)."""
        try:
            return self._dtype_names[dtype]
        except KeyError:
            name = _torch_dtype_name(dtype)
            found = self._dtype_names[dtype] = name if name in TORCH_DTYPES else None
            return found

    def _emit_torch_blobs(self) -> None:
        """Store each storage group once, as the byte span its tensors cover."""
        for members in self._groups.values():
            if len(members) == 1 and self._emit_alone(*members[0]):
                continue
            spans = [_byte_span(t) for _, t in members]
            lo = min(s for s, _ in spans) // _SPAN_ALIGN * _SPAN_ALIGN
            hi = max(e for _, e in spans)
            # Storages that start at one address (from_numpy of views of one array)
            # can differ in size: view the span through the largest.
            first = max((t for _, t in members), key=lambda t: t.untyped_storage().nbytes())
            raw = torch.empty(0, dtype=torch.uint8, device=first.device).set_(
                first.untyped_storage(), lo, (hi - lo,), (1,)
            )
            if raw.device.type != "cpu":
                raw = raw.cpu()  # the one staging copy of device memory
            blob = self._blob(BlobSource(memoryview(raw.numpy()), members[0][0]["dtype"], raw))
            for (node, t), (start, _) in zip(members, spans):
                node.update(stride=list(t.stride()), offset=start - lo, blob=blob)

    def _emit_alone(self, node: dict[str, Any], t: torch.Tensor) -> bool:
        """Emit a tensor alone in its storage group when it is contiguous CPU memory starting
        on a _SPAN_ALIGN boundary (most tensors of a state): the span the general path
        computes is then exactly its own bytes, viewed here without building a storage
        view. False: leave it to the general path."""
        if not t.is_cpu or not t.is_contiguous() or (t.storage_offset() * t.element_size()) % _SPAN_ALIGN:
            return False
        try:
            raw = t.reshape(-1).view(self._uint8)  # bytes [start, start + nbytes) of the storage: a view
        except RuntimeError:
            return False
        blob = self._blob(BlobSource(memoryview(raw.numpy()), node["dtype"], raw))
        node.update(stride=list(t.stride()), offset=0, blob=blob)
        return True


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` bytes of storage a non-empty tensor reaches."""
    item = t.element_size()
    start = t.storage_offset() * item
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * item  # type: ignore[return-value]  # torch says int | SymInt; eager tensors give int


_PATH_TYPES = {"PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath", "WindowsPath"}


def _class_name(cls: type, path: str) -> str:
    """``module:qualname`` of a class that loading can find again without importing anything."""
    qualname = cls.__qualname__
    if "<locals>" in qualname:
        raise UnsupportedValueError(
            path, f"class {qualname} is defined inside a function; define it at module level so loading can find it"
        )
    return f"{cls.__module__}:{qualname}"


def _rebuilds(cls: type[dict[Any, Any]], value: dict[Any, Any]) -> bool:
    """Whether ``cls(items)`` gives back an equal value of the same class, as loading builds it."""
    try:
        copy: dict[Any, Any] = cls(list(value.items()))
    except Exception:  # noqa: BLE001 (any failure means: cannot be rebuilt)
        return False
    return type(copy) is cls and dict(copy) == dict(value) and not getattr(copy, "__dict__", None)


def _float(x: float) -> float | str:
    if math.isfinite(x):
        return float(x)
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _check_utf8(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValueError(path, "string is not valid Unicode (lone surrogate)") from None


def encode_state(state: Any) -> EncodedState:
    """Validate and encode ``state``; raises UnsupportedValueError naming the key path."""
    with _gcpause.paused():  # every node it allocates lives on: no garbage to collect meanwhile
        return _Encoder().encode(state)


# -- decoding ---------------------------------------------------------------------


def _corrupt(what: str) -> CorruptObjectError:
    return CorruptObjectError(f"manifest is malformed: {what}")


def _single(node: Any) -> tuple[str, Any]:
    if not isinstance(node, dict) or len(node) != 1:
        raise _corrupt(f"unexpected node {str(node)[:80]}")
    tag = next(iter(node))
    return tag, node[tag]


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key, child) pairs of a container node; nothing for leaves."""
    if node is None or isinstance(node, (bool, int, str)):
        return
    tag, body = _single(node)
    if tag in ("dict", "odict"):
        for key, child in _dict_items(tag, body):
            # A plain key (str, int, bool, None) decodes to itself: skip building a decoder.
            yield (key if key is None or isinstance(key, (bool, int, str)) else _decode_plain(key)), child
    elif tag in ("list", "tuple"):
        if not isinstance(body, list):
            raise _corrupt(f"{tag} body is not a list")
        yield from enumerate(body)
    elif tag == "namespace":
        yield from _children({"dict": body})
    elif tag == "dictsub":
        yield from _children({"dict": body.get("items") if isinstance(body, dict) else None})
    elif tag == "enum" and isinstance(body, dict):
        yield "value", body.get("value")


def _dict_items(tag: str, body: Any) -> list[list[Any]]:
    """The ``[key, value]`` pairs of a dict or odict node body, validated."""
    items = body.get("items") if tag == "odict" and isinstance(body, dict) else body
    if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise _corrupt(f"{tag} items are not a list of [key, value] pairs")
    return items


def _decode_plain(node: Any) -> Any:
    """Decode a node that holds no blob (dict keys)."""
    return _Decoder({}, None).value(node, "")


def _array_body(tag: str, body: Any, path: str) -> dict[str, Any]:
    """The body of a tensor/ndarray node, checked to be an object with an integer blob index."""
    blob = body.get("blob") if isinstance(body, dict) else None
    if not isinstance(body, dict) or isinstance(blob, bool) or not isinstance(blob, int):
        raise _corrupt(f"{tag} node at {path or '<root>'} has no valid blob index")
    return body


def iter_tensors(node: Any, path: str = "") -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield ``(path, kind, body)`` for every tensor and ndarray node below ``node``."""
    if isinstance(node, dict) and len(node) >= 1:
        tag = next(iter(node))
        if tag in ("tensor", "ndarray"):
            yield path, tag, _array_body(tag, node[tag], path)
            return
    for key, child in _children(node):
        child_path = _join(path, key)
        if isinstance(child, dict) and len(child) >= 1:  # a leaf answered here: no generator per tensor
            tag = next(iter(child))
            if tag in ("tensor", "ndarray"):
                yield child_path, tag, _array_body(tag, child[tag], child_path)
                continue
        yield from iter_tensors(child, child_path)


def blob_kinds(node: Any) -> dict[int, str]:
    """The blobs that decoding ``node`` reads: index → ``"torch"`` or ``"numpy"`` memory."""
    kinds = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict) and len(n) >= 1:
            tag = next(iter(n))
            body = n[tag]
            if tag in ("tensor", "ndarray"):
                kinds[_array_body(tag, body, "")["blob"]] = "torch" if tag == "tensor" else "numpy"
                continue
            if tag == "bytes_blob":
                if isinstance(body, bool) or not isinstance(body, int):
                    raise _corrupt(f"bytes_blob node holds {type(body).__name__}, not a blob index")
                kinds[body] = "numpy"
                continue
        stack.extend(child for _, child in _children(n))
    return kinds


def dict_items_shifted(root: Any, offset: int) -> list[list[Any]]:
    """The ``[key, value]`` pairs of a plain-dict root node, every blob index raised by
    ``offset``: the pieces of a state combined from several (Repo.combine_staged)."""
    tag, body = _single(root)
    if tag != "dict":
        raise InvalidInputError("only states whose top level is a plain dict can be combined")
    return [[key, _shift_blobs(node, offset)] for key, node in _dict_items(tag, body)]


def _shift_blobs(node: Any, offset: int) -> Any:
    if isinstance(node, list):
        return [_shift_blobs(n, offset) for n in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        tag, body = next(iter(node.items()))
        if tag in ("tensor", "ndarray"):
            return {tag: {**_array_body(tag, body, ""), "blob": body["blob"] + offset}}
        if tag == "bytes_blob":
            if isinstance(body, bool) or not isinstance(body, int):
                raise _corrupt(f"bytes_blob node holds {type(body).__name__}, not a blob index")
            return {tag: body + offset}
    return {key: _shift_blobs(value, offset) for key, value in node.items()}


def select_keys(root: Any, keys: list[str] | None) -> Any:
    """The root node restricted to the named top-level entries (all when ``keys`` is None)."""
    if keys is None:
        return root
    tag, body = _single(root)
    if tag not in ("dict", "odict"):
        raise KeyError("keys= needs a state whose top level is a dict")
    wanted = list(dict.fromkeys(keys))
    present = {_decode_plain(pair[0]): pair for pair in _dict_items(tag, body)}
    missing = [k for k in wanted if k not in present]
    if missing:
        raise KeyError(f"no top-level entr{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))}")
    selected = [present[k] for k in wanted]
    return {"dict": selected} if tag == "dict" else {"odict": {**body, "items": selected}}


def _resolve_device(saved: str, map_location: MapLocation) -> str:
    if map_location is None:
        return saved
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    if isinstance(map_location, Mapping):
        return str(map_location.get(saved, saved))
    return str(map_location(saved))


# torch.device's device types, for fsck's torch-free check of saved device values.
_DEVICE = re.compile(
    r"^(cpu|cuda|mkldnn|opengl|opencl|ideep|hip|ve|fpga|maia|xla|lazy|vulkan|metal|xpu|mps|meta|hpu|mtia|ipu"
    r"|privateuseone)(:[0-9]+)?$"
)
_VIEW_FLOOR = 64 << 20  # bytes of elements the tensors of one decode may address, at least...
_VIEW_FACTOR = 16  # ...or this many times the bytes their blobs hold (docs/format.md, Reader limits)


class _Decoder:
    def __init__(self, blobs: Mapping[int, Any], map_location: MapLocation) -> None:
        self.blobs = blobs  # blob index → torch.uint8 tensor or numpy uint8 array
        self.map_location = map_location
        self._moved: dict[tuple[int, str], torch.Tensor] = {}
        # Views (stride 0, overlapping strides, tied weights) address more elements than
        # their blobs hold; whoever copies them out (export, diff) materialises them all.
        self._view_budget = max(_VIEW_FLOOR, _VIEW_FACTOR * sum(int(b.nbytes) for b in blobs.values()))
        self._views: set[tuple[Any, ...]] = set()  # (blob, offset, shape, stride) already counted: tied copies count once

    def value(self, node: Any, path: str) -> Any:
        if node is None or isinstance(node, (bool, int, str)):
            return node
        tag, body = _single(node)
        if tag == "float":
            if isinstance(body, str):
                if body not in ("nan", "inf", "-inf"):
                    raise _corrupt(f"bad float {body!r} at {path}")
                return float(body)
            if isinstance(body, bool) or not isinstance(body, (int, float)):
                raise _corrupt(f"bad float at {path}")
            return float(body)
        if tag in ("dict", "odict"):
            items = [(k, self.value(v, _join(path, k))) for k, v in _children(node)]
            if tag == "dict":
                return dict(items)
            result = OrderedDict(items)
            if "meta" in body:
                result._metadata = self.value(body["meta"], _join(path, "_metadata"))  # type: ignore[attr-defined]
            return result
        if tag == "list":
            return [self.value(v, _join(path, i)) for i, v in _children(node)]
        if tag == "tuple":
            return tuple(self.value(v, _join(path, i)) for i, v in _children(node))
        if tag == "bytes":
            try:
                return bytes.fromhex(body)
            except (TypeError, ValueError):
                raise _corrupt(f"bad bytes at {path}") from None
        if tag == "bytes_blob":
            return self._blob(body, path, np.ndarray).tobytes()
        if tag == "tensor":
            return self._tensor(body, path)
        if tag == "ndarray":
            return self._ndarray(body, path)
        if tag == "npscalar":
            dtype = self._np_dtype(body.get("dtype"), path)
            try:
                raw = bytes.fromhex(body["hex"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(f"bad numpy scalar at {path}") from None
            if len(raw) != dtype.itemsize:
                raise _corrupt(f"numpy scalar size mismatch at {path}")
            return np.frombuffer(raw, dtype=dtype)[0]
        if tag == "dtype":
            if not isinstance(body, str) or body not in TORCH_DTYPES:
                raise _corrupt(f"unknown dtype {body!r} at {path}")
            return TORCH_DTYPES[body]
        if tag == "device":
            try:
                return torch.device(body)
            except (TypeError, ValueError, RuntimeError):
                raise _corrupt(f"bad device {body!r} at {path}") from None
        if tag == "size":
            return torch.Size(_int_list(body, "size", path))
        if tag in _PYTHON_NODES:
            return self._python(tag, body, path)
        raise _corrupt(f"unknown node kind {tag!r} at {path}")

    def _python(self, tag: str, body: Any, path: str) -> Any:
        """Enums, paths, argparse Namespaces and plain dict subclasses (docs/format.md 4.2)."""
        if tag == "namespace":
            items = [(k, self.value(v, _join(path, k))) for k, v in _children({"dict": body})]
            if not all(isinstance(k, str) for k, _ in items):
                raise _corrupt(f"namespace at {path} has a key that is not a string")
            return argparse.Namespace(**dict(items))
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise _corrupt(f"bad {tag} node at {path}")
        if tag == "path":
            kind, text = body["type"], body.get("value")
            if kind not in _PATH_TYPES or not isinstance(text, str):
                raise _corrupt(f"bad path at {path}")
            if kind in ("PosixPath", "WindowsPath"):  # concrete paths of another system load as pure ones
                kind = "Path" if kind == type(pathlib.Path()).__name__ else "Pure" + kind
            return getattr(pathlib, kind)(text)
        if tag == "enum":
            value = self.value(body.get("value"), _join(path, "value"))
            cls = self._find_class(body["type"], enum.Enum, path)
            if cls is None:
                return value
            try:
                return cls(value)
            except (ValueError, TypeError):
                raise _corrupt(f"{body['type']} has no member of value {value!r} (at {path})") from None
        # dictsub
        items = [(k, self.value(v, _join(path, k))) for k, v in _children({"dict": body.get("items")})]
        cls = self._find_class(body["type"], dict, path)
        if cls is None:
            return dict(items)
        try:
            return cls(items)
        except Exception as err:  # noqa: BLE001 (the class's own constructor refused the items)
            raise _corrupt(f"{body['type']} at {path} cannot be rebuilt from its items ({str(err)[:120]})") from None

    def _find_class(self, name: str, base: type, path: str) -> type | None:
        return _find_class(name, base, path)

    def _blob(self, index: Any, path: str, kind: type) -> Any:
        if isinstance(index, bool) or not isinstance(index, int) or index not in self.blobs:
            raise _corrupt(f"blob reference {index!r} at {path} is out of range")
        blob = self.blobs[index]
        if not isinstance(blob, kind):
            raise _corrupt(f"blob {index} is shared between a tensor and an array at {path}")
        return blob

    @staticmethod
    def _np_dtype(name: Any, path: str) -> np.dtype[Any]:
        try:
            dtype: np.dtype[Any] = np.dtype(name)
        except (TypeError, ValueError):
            raise _corrupt(f"bad numpy dtype {name!r} at {path}") from None
        if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
            raise _corrupt(f"bad numpy dtype {name!r} at {path}")
        return dtype

    def _ndarray(self, body: Any, path: str) -> np.ndarray:
        if not isinstance(body, dict):
            raise _corrupt(f"bad ndarray at {path}")
        dtype = self._np_dtype(body.get("dtype"), path)
        shape = _int_list(body.get("shape"), "shape", path)
        blob: np.ndarray = self._blob(body.get("blob"), path, np.ndarray)
        if blob.nbytes != math.prod(shape) * dtype.itemsize:
            raise _corrupt(f"ndarray at {path} does not match its blob size")
        try:
            return blob.view(dtype).reshape(shape)
        except (ValueError, TypeError, OverflowError, MemoryError) as err:
            raise _corrupt(f"ndarray at {path} has an impossible shape ({str(err)[:120]})") from None

    def _tensor(self, body: Any, path: str) -> torch.Tensor:
        if not isinstance(body, dict) or not isinstance(body.get("dtype"), str) or body["dtype"] not in TORCH_DTYPES:
            raise _corrupt(f"bad tensor at {path}")
        dtype = TORCH_DTYPES[body["dtype"]]
        blob_index = body.get("blob")
        blob = self._blob(blob_index, path, torch.Tensor)
        shape, stride, offset, item = self._tensor_layout(body, path, blob.numel())
        device = _resolve_device(str(body.get("device", "cpu")), self.map_location)
        blob = self._on_device(blob_index, blob, device)  # type: ignore[arg-type]  # an int: _blob checked it
        try:
            t = torch.empty(0, dtype=dtype, device=blob.device).set_(blob.untyped_storage(), offset // item, shape, stride)
        except (RuntimeError, ValueError, OverflowError) as err:
            raise _corrupt(f"tensor at {path} has an impossible layout ({str(err).splitlines()[0][:120]})") from None
        if body.get("param"):
            return torch.nn.Parameter(t, requires_grad=bool(body.get("requires_grad")))
        if body.get("requires_grad"):
            t.requires_grad_(True)
        return t

    def _tensor_layout(self, body: dict[str, Any], path: str, blob_nbytes: int) -> tuple[list[int], list[int], int, int]:
        """Shape, stride, offset and item size of a tensor node, checked against its blob's size
        (every element inside it) and the decode's view budget. Torch-free: fsck runs it too."""
        shape = _int_list(body.get("shape"), "shape", path)
        stride = _int_list(body.get("stride"), "stride", path)
        offset = body.get("offset")
        if len(stride) != len(shape) or isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise _corrupt(f"bad tensor layout at {path}")
        item = DTYPE_ITEMSIZE[body["dtype"]]
        numel = math.prod(shape)
        if len(shape) > 64 or (numel == 0 and any(n >= 1 << 62 for n in shape)):
            raise _corrupt(f"tensor at {path} has an impossible shape")
        if numel > 0:
            last = sum((n - 1) * s for n, s in zip(shape, stride))
            if offset % item or offset + (last + 1) * item > blob_nbytes:
                raise _corrupt(f"tensor at {path} reaches outside its blob")
            self._spend_view((body.get("blob"), offset, tuple(shape), tuple(stride), item), numel * item, path)
        return shape, stride, offset, item

    def _spend_view(self, view: tuple[Any, ...], nbytes: int, path: str) -> None:
        """Count the bytes a distinct view's elements span against the decode's budget."""
        if view in self._views:
            return
        self._views.add(view)
        self._view_budget -= nbytes
        if self._view_budget < 0:
            raise _corrupt(
                f"tensor at {path}: the tensors address far more elements than their stored bytes hold "
                f"(over {_VIEW_FACTOR}x, or {_VIEW_FLOOR >> 20} MiB); refusing to materialise them"
            )

    def _on_device(self, index: int, blob: torch.Tensor, device: str) -> torch.Tensor:
        """Move a blob to ``device`` once, so tensors sharing it share it there too."""
        if torch.device(device) == blob.device:
            return blob
        key = (index, device)
        if key not in self._moved:
            self._moved[key] = blob.to(device)
        return self._moved[key]


_PYTHON_NODES = ("enum", "path", "namespace", "dictsub")


def _find_class(name: str, base: type, path: str) -> type | None:
    """The class ``module:qualname`` names, looked up among the modules already imported.

    Loading never imports a module a manifest names (that would run its code); the program
    that defined the class has imported it. When it has not, the plain value is returned
    with a warning (the enum's value, a dict) rather than failing the whole load.
    """
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None and qualname else ():
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, base):
        return obj
    if obj is not None and module_name in sys.modules:
        raise _corrupt(f"{name} at {path} is not a {base.__name__} class")
    warnings.warn(
        f"value at {path or '<root>'} is a {name}, but module {module_name} is not imported: loaded as a plain "
        f"{'value' if base is enum.Enum else 'dict'}; import the module first to get the class back",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


def _int_list(value: Any, what: str, path: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise _corrupt(f"bad {what} at {path}")
    return value


def decode_state(node: Any, blobs: Mapping[int, Any], map_location: MapLocation = None) -> Any:
    """Rebuild the value of ``node`` from loaded blobs (torch.uint8 tensors or numpy arrays)."""
    return _Decoder(blobs, map_location).value(node, "")


class _Validator(_Decoder):
    """Decodes a tree against stand-in blobs of the sizes its manifest records, reading
    no chunk: torch blobs are meta tensors, numpy blobs only their size. Whatever
    ``load`` would refuse in the tree itself is refused here too (fsck's manifest check).
    """

    def __init__(self, blob_sizes: list[int]) -> None:
        super().__init__({}, "meta")
        self.blob_sizes = blob_sizes
        self.kinds: dict[int, str] = {}
        self._view_budget = max(_VIEW_FLOOR, _VIEW_FACTOR * sum(blob_sizes))

    def value(self, node: Any, path: str) -> Any:
        # The node kinds whose decoding needs torch are checked here without it (so
        # `ckptvcs fsck` never imports torch); the rest decode as load decodes them.
        if isinstance(node, dict) and len(node) == 1:
            tag, body = next(iter(node.items()))
            if tag == "bytes_blob":
                self._blob(body, path, "array")
                return b""
            if tag == "dtype":
                if not isinstance(body, str) or body not in DTYPE_ITEMSIZE:
                    raise _corrupt(f"unknown dtype {body!r} at {path}")
                return body
            if tag == "device":
                if not isinstance(body, str) or not _DEVICE.match(body):
                    raise _corrupt(f"bad device {body!r} at {path}")
                return body
            if tag == "size":
                return tuple(_int_list(body, "size", path))
        return super().value(node, path)

    def _blob(self, index: Any, path: str, kind: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.blob_sizes):
            raise _corrupt(f"blob reference {index!r} at {path} is out of range")
        kind = "tensor" if kind not in ("array", np.ndarray) else "array"
        if self.kinds.setdefault(index, kind) != kind:
            raise _corrupt(f"blob {index} is shared between a tensor and an array at {path}")
        return self.blob_sizes[index]

    def _find_class(self, name: str, base: type, path: str) -> type | None:
        if ":" not in name:
            raise _corrupt(f"bad class name {name!r} at {path}")
        return None  # the structure is checked; which classes the reader has imported is not fsck's business

    def _tensor(self, body: Any, path: str) -> None:  # type: ignore[override]
        if not isinstance(body, dict) or not isinstance(body.get("dtype"), str) or body["dtype"] not in DTYPE_ITEMSIZE:
            raise _corrupt(f"bad tensor at {path}")
        self._tensor_layout(body, path, self._blob(body.get("blob"), path, "tensor"))

    def _ndarray(self, body: Any, path: str) -> None:  # type: ignore[override]
        if not isinstance(body, dict):
            raise _corrupt(f"bad ndarray at {path}")
        dtype = self._np_dtype(body.get("dtype"), path)
        shape = _int_list(body.get("shape"), "shape", path)
        if self._blob(body.get("blob"), path, np.ndarray) != math.prod(shape) * dtype.itemsize:
            raise _corrupt(f"ndarray at {path} does not match its blob size")


def validate_tree(root: Any, blob_sizes: list[int]) -> None:
    """Check a manifest tree as ``decode_state`` would, without any tensor data.

    ``blob_sizes`` holds the ``nbytes`` of each blob of the manifest. Raises
    CorruptObjectError for anything loading the whole tree would refuse.
    """
    _Validator(blob_sizes).value(root, "")

"""Differences between two committed states, tensor by tensor and value by value.

Tensors whose stored bytes are provably identical (same layout, same chunk ids) are
never read. The rest are loaded in batches of up to ``COMPARE_BATCH_BYTES`` a side (one
read each: a state of 100,000 small tensors would otherwise pay a read's fixed cost per
tensor) and compared bit by bit: the fraction of
elements whose bits differ, and the largest absolute difference among them (NaN when a
NaN is involved), so a diff of two checkpoints answers "what did training change".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._lazy import LazyMapping, LazyModule
from .errors import CorruptObjectError
from .state import _children, _join, decode_state, iter_tensors

if TYPE_CHECKING:
    import torch

    from .objects import Manifest
else:
    torch = LazyModule("torch")  # only comparing tensor values needs it

__all__ = ["DiffEntry", "DiffStat", "diff_manifests", "stat_manifests", "compare_values"]

_INT_OF_SIZE_TORCH = LazyMapping(lambda: {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64})
_INT_OF_SIZE_NUMPY = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# The bytes of changed tensors loaded at once on each side: a diff holds at most about
# twice this (plus one tensor larger than it) beyond the manifests.
COMPARE_BATCH_BYTES = 64 << 20

# Loads the ``(tensor node, path)`` pairs of one side, returning their decoded values.
NodeLoader = Callable[[list[tuple[Any, str]]], list[Any]]


class _ToCompare(NamedTuple):
    """A tensor of equal dtype and shape on both sides whose stored bytes differ."""

    slot: int  # its place in the result
    path: str
    node_a: dict[str, Any]
    node_b: dict[str, Any]
    nbytes: int  # both sides' blobs together


@dataclass(frozen=True)
class DiffEntry:
    """One difference. ``kind`` is ``tensor`` or ``value``; ``status`` is added/removed/changed.

    For a changed tensor of unchanged dtype and shape, ``fraction_changed`` (0..1) and
    ``max_abs_diff`` are set; when dtype or shape changed, ``detail`` says how.
    """

    path: str
    kind: str
    status: str
    detail: str = ""
    fraction_changed: float | None = None
    max_abs_diff: float | None = None
    old: Any = None
    new: Any = None


def _describe(kind: str, body: dict[str, Any]) -> str:
    dtype = body.get("dtype", "?")
    shape = body.get("shape")
    shape_text = str(list(shape)) if isinstance(shape, list) else "[?]"  # a damaged manifest still prints
    return f"{dtype}{shape_text}" if kind == "tensor" else f"ndarray {dtype}{shape_text}"


def _layout(kind: str, body: dict[str, Any], manifest: Manifest) -> tuple[Any, ...]:
    index = body["blob"]  # an int: iter_tensors checked it
    if not 0 <= index < len(manifest.blobs):
        raise CorruptObjectError(f"manifest {manifest.id} refers to blob {index}, which it lacks")
    blob = manifest.blobs[index]
    return (kind, body.get("dtype"), body.get("shape"), body.get("stride"), body.get("offset"),
            blob["nbytes"], tuple(blob["chunks"]))


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Non-tensor leaf nodes with their paths."""
    if isinstance(node, dict) and len(node) >= 1 and next(iter(node)) in ("tensor", "ndarray"):
        return
    children = list(_children(node))
    is_container = isinstance(node, dict) and next(iter(node), None) in ("dict", "odict", "list", "tuple")
    if not is_container:
        yield path, node
        return
    for key, child in children:
        yield from _leaves(child, _join(path, key))


def compare_values(a: Any, b: Any) -> tuple[float, float]:
    """``(fraction of elements whose bits differ, max |a - b| over them)`` for equal dtype and shape."""
    if isinstance(a, torch.Tensor):
        return _compare_torch(a.detach().cpu().contiguous(), b.detach().cpu().contiguous())
    return _compare_numpy(np.ascontiguousarray(a), np.ascontiguousarray(b))


def _compare_torch(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    if a.numel() == 0:
        return 0.0, 0.0
    if a.is_complex():
        ra, rb = torch.view_as_real(a), torch.view_as_real(b)
        bits = _INT_OF_SIZE_TORCH[ra.element_size()]
        differs = (ra.view(bits) != rb.view(bits)).any(-1)
        magnitude = (a.to(torch.complex128) - b.to(torch.complex128)).abs()
    else:
        bits = _INT_OF_SIZE_TORCH[a.element_size()]
        differs = a.view(bits) != b.view(bits)
        magnitude = (a.double() - b.double()).abs()
    count = int(differs.sum())
    if count == 0:
        return 0.0, 0.0
    return count / a.numel(), float(magnitude[differs].max()) if not magnitude[differs].isnan().any() else float("nan")


def _compare_numpy(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if a.size == 0:
        return 0.0, 0.0
    if a.dtype.kind == "c":
        fa, fb = a.view(a.real.dtype).reshape(*a.shape, 2), b.view(b.real.dtype).reshape(*b.shape, 2)
        bits = _INT_OF_SIZE_NUMPY[fa.dtype.itemsize]
        differs = (fa.view(bits) != fb.view(bits)).any(-1)
        magnitude = np.abs(a.astype(np.complex128) - b.astype(np.complex128))
    else:
        bits = _INT_OF_SIZE_NUMPY[a.dtype.itemsize]
        differs = a.view(bits) != b.view(bits)
        magnitude = np.abs(a.astype(np.float64) - b.astype(np.float64))
    count = int(differs.sum())
    if count == 0:
        return 0.0, 0.0
    return count / a.size, float(np.max(magnitude[differs]))


def diff_manifests(a: Manifest, b: Manifest, load_a: NodeLoader, load_b: NodeLoader) -> list[DiffEntry]:
    """Compare two manifests; ``load_x(nodes)`` decodes tensor nodes (with their paths) of that side."""
    result: list[DiffEntry | None] = []
    compare: list[_ToCompare] = []
    tensors_a = {path: (kind, body) for path, kind, body in iter_tensors(a.root)}
    tensors_b = {path: (kind, body) for path, kind, body in iter_tensors(b.root)}
    for path in list(dict.fromkeys([*tensors_a, *tensors_b])):
        if path not in tensors_b:
            result.append(DiffEntry(path, "tensor", "removed", _describe(*tensors_a[path])))
            continue
        if path not in tensors_a:
            result.append(DiffEntry(path, "tensor", "added", _describe(*tensors_b[path])))
            continue
        (kind_a, body_a), (kind_b, body_b) = tensors_a[path], tensors_b[path]
        layout_a, layout_b = _layout(kind_a, body_a, a), _layout(kind_b, body_b, b)
        if layout_a == layout_b:
            continue
        if (kind_a, body_a.get("dtype"), body_a.get("shape")) != (kind_b, body_b.get("dtype"), body_b.get("shape")):
            result.append(
                DiffEntry(path, "tensor", "changed", f"{_describe(kind_a, body_a)} -> {_describe(kind_b, body_b)}")
            )
            continue
        compare.append(_ToCompare(len(result), path, {kind_a: body_a}, {kind_b: body_b}, layout_a[-2] + layout_b[-2]))
        result.append(None)  # filled below, or dropped when the bits are equal
    for batch in _batches(compare):
        loaded_a = load_a([(item.node_a, item.path) for item in batch])
        loaded_b = load_b([(item.node_b, item.path) for item in batch])
        for item, value_a, value_b in zip(batch, loaded_a, loaded_b):
            fraction, max_abs = compare_values(value_a, value_b)
            if fraction:
                (kind_b, body_b), = item.node_b.items()
                result[item.slot] = DiffEntry(item.path, "tensor", "changed", _describe(kind_b, body_b),
                                              fraction, max_abs)
    entries = [entry for entry in result if entry is not None]
    values_a, values_b = dict(_leaves(a.root)), dict(_leaves(b.root))
    for path in list(dict.fromkeys([*values_a, *values_b])):
        if path in values_a and path in values_b:
            if values_a[path] != values_b[path]:
                old, new = _plain(values_a[path]), _plain(values_b[path])
                entries.append(DiffEntry(path, "value", "changed", f"{old!r} -> {new!r}", old=old, new=new))
        elif path in values_a:
            old = _plain(values_a[path])
            entries.append(DiffEntry(path, "value", "removed", repr(old), old=old))
        else:
            new = _plain(values_b[path])
            entries.append(DiffEntry(path, "value", "added", repr(new), new=new))
    return entries


def _batches(compare: list[_ToCompare]) -> Iterator[list[_ToCompare]]:
    """``compare`` cut into runs of about ``COMPARE_BATCH_BYTES`` a side (a larger tensor alone)."""
    batch: list[_ToCompare] = []
    size = 0
    for item in compare:
        if batch and size + item.nbytes > 2 * COMPARE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.nbytes
    if batch:
        yield batch


def _plain(node: Any) -> Any:
    """Decode a value leaf for display (large bytes stay summarised)."""
    if isinstance(node, dict) and "bytes_blob" in node:
        return "<large bytes>"
    return decode_state(node, {})


@dataclass(frozen=True)
class DiffStat:
    """One difference measured from the manifests alone: no tensor data is read.

    ``nbytes`` is the size of the tensor's stored blob on the newer side (the older when
    removed; a tied group shares one blob); ``changed_bytes`` counts the bytes of that
    blob's chunks whose id differs from the other side's chunk at the same offset (all of
    it when added, removed, or its dtype or shape changed): an upper bound on what
    changed, at chunk granularity. Values (kind ``value``) have no size.
    """

    path: str
    kind: str
    status: str
    nbytes: int = 0
    changed_bytes: int = 0


def stat_manifests(a: Manifest, b: Manifest, chunk_size: int) -> list[DiffStat]:
    """What differs between two manifests, tensor by tensor and value by value, by chunk ids."""
    result: list[DiffStat] = []
    tensors_a = {path: (kind, body) for path, kind, body in iter_tensors(a.root)}
    tensors_b = {path: (kind, body) for path, kind, body in iter_tensors(b.root)}
    for path in list(dict.fromkeys([*tensors_a, *tensors_b])):
        if path not in tensors_b:
            size = _layout(*tensors_a[path], a)[-2]
            result.append(DiffStat(path, "tensor", "removed", size, size))
            continue
        layout_b = _layout(*tensors_b[path], b)
        if path not in tensors_a:
            result.append(DiffStat(path, "tensor", "added", layout_b[-2], layout_b[-2]))
            continue
        layout_a = _layout(*tensors_a[path], a)
        if layout_a == layout_b:
            continue
        size = layout_b[-2]
        if layout_a[:-1] != layout_b[:-1]:  # another dtype, shape or layout: all of it is new
            result.append(DiffStat(path, "tensor", "changed", size, size))
            continue
        changed = sum(
            min(chunk_size, size - i * chunk_size)
            for i, (old, new) in enumerate(zip(layout_a[-1], layout_b[-1]))
            if old != new
        )
        result.append(DiffStat(path, "tensor", "changed", size, changed))
    values_a, values_b = dict(_leaves(a.root)), dict(_leaves(b.root))
    for path in list(dict.fromkeys([*values_a, *values_b])):
        if path not in values_b:
            result.append(DiffStat(path, "value", "removed"))
        elif path not in values_a:
            result.append(DiffStat(path, "value", "added"))
        elif values_a[path] != values_b[path]:
            result.append(DiffStat(path, "value", "changed"))
    return result

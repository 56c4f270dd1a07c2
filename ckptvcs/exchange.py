"""Checkpoint files in and out: ``.pt`` (torch.save) and ``.safetensors``.

Reading a ``.pt`` file uses ``torch.load(weights_only=True)``, PyTorch's restricted
unpickler that refuses arbitrary objects, so no code from the file runs. numpy arrays,
numpy scalars and their dtypes are let through that unpickler's own allow-list (as
transformers does for ``rng_state.pth``): they are rebuilt from raw bytes, never by
running code from the file.

Writing a ``.pt`` file converts what torch's default ``weights_only`` loader refuses
(numpy values) into what it accepts, so ``torch.load(path)`` works in any process:
numpy arrays become tensors of the same dtype, shape and bytes, numpy scalars become
Python scalars. Safetensors exports hold tensors only, write tied tensors once (as
``save_pretrained`` does) and carry string metadata (``format: pt`` by default).
Every export goes through one atomic writer (:func:`ckptvcs._fs.atomic_file`): temp
file, fsync, rename, fsync of the directory; a failed export leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _fs
from ._lazy import LazyModule
from .errors import InvalidInputError, KeyNotFoundError, UnsupportedValueError

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # reading or writing a file needs it; naming formats does not

__all__ = [
    "FORMATS", "ExportResult", "guess_format", "sniff_format", "read_state_file", "write_state_file",
    "export_state", "export_metadata", "subtree",
]

FORMATS = ("pt", "safetensors")
_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_ALLOW_LIST_LOCK = threading.Lock()


def guess_format(path: str | os.PathLike[str]) -> str:
    """``pt`` or ``safetensors`` from a file name; InvalidInputError when unknown."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _PT_SUFFIXES:
        return "pt"
    raise InvalidInputError(
        f"{path}: cannot tell the format from the extension (use .pt, .pth, .bin, .ckpt or .safetensors)"
    )


def read_state_file(path: str | os.PathLike[str], fmt: str | None = None) -> tuple[Any, dict[str, str]]:
    """Read a checkpoint file; returns ``(state, metadata)`` (metadata: safetensors only).

    Without ``fmt`` the extension decides, else the file's first bytes. A file that is
    neither format is refused with a message that says so.
    """
    fmt = fmt or _format_of_input(path)
    if fmt == "safetensors":
        from .safetensors_file import read_safetensors

        try:
            return read_safetensors(path)
        except InvalidInputError as err:
            raise _mislabelled(path, "safetensors") or err from None
    if not Path(path).is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support; the failure, if
            # any, is reported below as one line, so the warning is only noise.
            warnings.simplefilter("ignore", UserWarning)
            # safe_globals swaps a process-wide list in and out: one load at a time, so
            # one thread's exit cannot drop the list from under another's load.
            with _ALLOW_LIST_LOCK, torch.serialization.safe_globals(_numpy_safe_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; all mean "unreadable"
        raise _mislabelled(path, "pt") or InvalidInputError(
            f"{path}: not a readable PyTorch checkpoint ({_load_failure(err)})"
        ) from None
    return state, {}


@functools.lru_cache(maxsize=1)
def _numpy_safe_globals() -> list[Any]:
    """numpy's pickle constructors for arrays, scalars and dtypes, for torch's allow-list.

    The same list transformers passes when it loads ``rng_state.pth``. Each entry only
    rebuilds a value from raw bytes and a dtype; an object array's elements still go
    through the restricted unpickler, so nothing from the file can run code. Arrays
    pickled by numpy 1.x name ``numpy.core``; numpy 2 names ``numpy._core``: both are listed.
    """
    core = getattr(np, "_core", None) or np.core
    entries: list[Any] = [np.ndarray, np.dtype]
    for func in (core.multiarray._reconstruct, core.multiarray.scalar):
        entries.append(func)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            entries.append((func, f"{module}.{func.__name__}"))
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.Float64DType, ...).
    entries += list(dict.fromkeys(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"))
    return entries


def sniff_format(path: str | os.PathLike[str]) -> str | None:
    """``pt`` or ``safetensors`` from a file's first bytes; None when it looks like neither.

    torch.save writes a zip (``PK``) or, in the legacy format, a pickle (``0x80`` and
    a protocol number); safetensors starts with an 8-byte little-endian header length
    followed by the JSON header's ``{``.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "pt"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return None


def _format_of_input(path: str | os.PathLike[str]) -> str:
    """The format of a file to read: from its extension when known, else from its content."""
    try:
        return guess_format(path)
    except InvalidInputError:
        if not Path(path).is_file():
            raise InvalidInputError(f"{path}: no such file") from None
        sniffed = sniff_format(path)
        if sniffed is None:
            raise _neither(path) from None
        return sniffed


def _mislabelled(path: str | os.PathLike[str], expected: str) -> InvalidInputError | None:
    """For a file that failed to read as ``expected``: what it is instead, if that is clear."""
    actual = sniff_format(path)
    if actual == expected or not Path(path).is_file():
        return None
    if actual is None:
        if expected == "safetensors" and _head(path)[8:9] == b"{":
            return None  # a damaged safetensors file: the reader's own message says how
        return _neither(path)
    described = "a safetensors file" if actual == "safetensors" else "a PyTorch checkpoint (torch.save)"
    return InvalidInputError(f"{path}: not a {_NAMES[expected]}: it looks like {described}; pass --format {actual}")


_NAMES = {"pt": "PyTorch checkpoint", "safetensors": "safetensors file"}


def _head(path: str | os.PathLike[str], size: int = 12) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _neither(path: str | os.PathLike[str]) -> InvalidInputError:
    head = _head(path)
    begins = f"; it begins with {head!r}" if head else "; it is empty"
    return InvalidInputError(
        f"{path}: neither a PyTorch checkpoint (torch.save writes a zip or a pickle) "
        f"nor a safetensors file (8-byte header size, then a JSON header){begins}"
    )


def _load_failure(err: Exception) -> str:
    """The useful part of torch.load's (long, multi-paragraph) error message."""
    text = str(err)
    refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", text)
    if refused:
        return f"it holds a Python object ({refused.group(1)}); ckptvcs never unpickles arbitrary objects"
    built = re.search(r"Can only build .*? but got <class '([^']+)'>", text)
    if built:
        return f"it holds a Python object ({built.group(1)}); ckptvcs never unpickles arbitrary objects"
    if "Unsupported operand" in text:
        return ("it is a pickle with constructs the safe loader refuses (arbitrary objects or code); "
                "ckptvcs never unpickles arbitrary objects")
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    elif "failed finding central directory" in text:
        return "truncated or corrupt zip archive"
    reason = " ".join(text.split()) or type(err).__name__
    return reason[:200]


@dataclass
class ExportResult:
    """What an export left out of the file or wrote once for several names."""

    skipped: list[str] = field(default_factory=list)  # key paths safetensors cannot hold
    tied: dict[str, list[str]] = field(default_factory=dict)  # name written → its dropped aliases


def write_state_file(state: Any, path: str | os.PathLike[str], fmt: str | None = None,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` to ``path``; returns the key paths left out (safetensors holds tensors only)."""
    return export_state(state, path, fmt, metadata).skipped


def export_state(state: Any, path: str | os.PathLike[str], fmt: str | None = None,
                 metadata: dict[str, str] | None = None) -> ExportResult:
    """Write ``state`` to ``path`` as a file other tools load, atomically and durably.

    ``.pt``: numpy values converted (module docstring) so that a plain ``torch.load``
    reads it. ``.safetensors``: tensors only, keyed by ``.``-joined paths; tied tensors
    (identical views of one storage) are written once under the first of their names
    in sorted order, as ``save_pretrained`` does; ``metadata`` defaults to
    ``{"format": "pt"}`` (transformers requires it). A missing directory raises
    InvalidInputError; OS failures raise StorageError; nothing is left at ``path``.
    """
    fmt = fmt or guess_format(path)
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise InvalidInputError(f"{path}: directory {parent} does not exist")
    if fmt == "safetensors":
        from .safetensors_file import write_safetensors

        tensors, skipped = _flatten_tensors(state)
        tensors, tied = _drop_tied_aliases(tensors)
        write_safetensors(path, tensors, {"format": "pt", **(metadata or {})})
        return ExportResult(skipped, tied)
    portable = _pt_portable(state, "")
    with _fs.storage_errors(f"writing {path}"), _fs.atomic_file(path) as f:
        torch.save(portable, f)
    return ExportResult()


def export_metadata(config: Any, commit_id: str) -> dict[str, str]:
    """The safetensors metadata to export a commit with.

    The metadata of the ``.safetensors`` file the commit was made from (kept by
    ``ckptvcs commit`` in ``config["safetensors_metadata"]``), else ``format: pt``;
    plus ``ckptvcs.commit``, the commit's id.
    """
    kept = config.get("safetensors_metadata") if isinstance(config, dict) else None
    if isinstance(kept, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in kept.items()):
        base = dict(kept)
    else:
        base = {"format": "pt"}
    return {**base, "ckptvcs.commit": commit_id}


def subtree(state: Any, key: str) -> Any:
    """The value at ``key`` (``/``-separated dict keys, e.g. ``model`` or ``model/encoder``)."""
    node = state
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyNotFoundError(f"the state has no entry {key!r} (no {part!r} there)")
        node = node[part]
    return node


def _pt_portable(value: Any, path: str) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python scalars.

    torch's default ``weights_only`` loader refuses numpy objects, so they cannot be
    in a file meant for a plain ``torch.load``. Containers are rebuilt (same types,
    an OrderedDict keeps its ``_metadata``); tensors are passed through, uncopied,
    so tied tensors stay tied in the file.
    """
    if isinstance(value, np.ndarray):
        return _array_to_tensor(value, path)
    if isinstance(value, np.generic):
        return _scalar_to_python(value, path)
    if isinstance(value, dict):
        items = [(_scalar_to_python(k, path) if isinstance(k, np.generic) else k,
                  _pt_portable(v, f"{path}/{k}" if path else str(k))) for k, v in value.items()]
        if isinstance(value, OrderedDict):
            result: Any = OrderedDict(items)
            meta = getattr(value, "_metadata", None)
            if meta is not None:
                result._metadata = _pt_portable(meta, f"{path}/_metadata")
            return result
        return dict(items)
    if isinstance(value, (list, tuple)):
        items = [_pt_portable(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


def _array_to_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    native = array.astype(array.dtype.newbyteorder("="), copy=False) if not array.dtype.isnative else array
    try:
        return torch.from_numpy(np.ascontiguousarray(native))
    except TypeError:
        raise UnsupportedValueError(
            path or "<root>", f"numpy dtype {array.dtype} has no torch equivalent, so a .pt file "
            "cannot hold it loadably (export to .npz with numpy instead)"
        ) from None


def _scalar_to_python(value: np.generic, path: str) -> Any:
    plain = value.item()
    if isinstance(plain, np.generic):  # longdouble and friends: no exact Python type
        raise UnsupportedValueError(path or "<root>", f"numpy scalar of dtype {value.dtype} has no exact Python equivalent")
    return plain


def _drop_tied_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Keep one name per group of identical views (tied weights), the first in sorted order.

    Mirrors ``save_pretrained``: safetensors files hold no shared storage, and
    transformers re-ties the dropped names on load. Views that only overlap (q, k, v
    slices of one fused weight) are different tensors and are each written.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    tied: dict[str, list[str]] = {}
    for names in groups.values():
        if len(names) > 1:
            keep, *drop = sorted(names)
            tied[keep] = drop
    dropped = {name for names in tied.values() for name in names}
    return {k: v for k, v in tensors.items() if k not in dropped}, tied


def _flatten_tensors(state: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a nested state keyed by ``.``-joined paths (the usual state_dict naming)."""
    from .safetensors_file import SAFETENSORS_DTYPES

    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []

    def visit(value: Any, key: str) -> None:
        if isinstance(value, np.ndarray) and value.dtype.isnative and value.dtype.kind in "biufc":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor) and value.dtype in SAFETENSORS_DTYPES.values():
            if key in tensors:
                raise InvalidInputError(f"two tensors flatten to the same safetensors name {key!r}")
            tensors[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{key}.{i}" if key else str(i))
        else:
            skipped.append(key or "<root>")

    visit(state, "")
    return tensors, skipped

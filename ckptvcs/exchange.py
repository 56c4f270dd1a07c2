"""Checkpoint files in and out: ``.pt`` (torch.save) and ``.safetensors``.

Reading a ``.pt`` file uses ``torch.load(weights_only=True)``, PyTorch's restricted
unpickler that refuses arbitrary objects, so no code from the file runs. Writes go to
a temp file renamed into place, so a failed export never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _fs
from ._lazy import LazyModule
from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # reading or writing a file needs it; naming formats does not

__all__ = ["FORMATS", "guess_format", "read_state_file", "write_state_file"]

FORMATS = ("pt", "safetensors")
_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


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
    """Read a checkpoint file; returns ``(state, metadata)`` (metadata: safetensors only)."""
    fmt = fmt or guess_format(path)
    if fmt == "safetensors":
        from .safetensors_file import read_safetensors

        return read_safetensors(path)
    if not Path(path).is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support; the failure, if
            # any, is reported below as one line, so the warning is only noise.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; all mean "unreadable"
        raise InvalidInputError(f"{path}: not a readable PyTorch checkpoint ({_load_failure(err)})") from None
    return state, {}


def _load_failure(err: Exception) -> str:
    """The useful part of torch.load's (long, multi-paragraph) error message."""
    text = str(err)
    refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", text)
    if refused:
        return f"it holds a Python object ({refused.group(1)}); ckptvcs never unpickles arbitrary objects"
    if "Unsupported operand" in text:
        return ("it is a pickle with constructs the safe loader refuses (arbitrary objects or code); "
                "ckptvcs never unpickles arbitrary objects")
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    elif "failed finding central directory" in text:
        return "truncated or corrupt zip archive"
    reason = " ".join(text.split()) or type(err).__name__
    return reason[:200]


def write_state_file(state: Any, path: str | os.PathLike[str], fmt: str | None = None,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` to ``path``; returns the key paths left out (safetensors holds tensors only)."""
    fmt = fmt or guess_format(path)
    if fmt == "safetensors":
        from .safetensors_file import write_safetensors

        tensors, skipped = _flatten_tensors(state)
        write_safetensors(path, tensors, metadata)
        return skipped
    target = Path(path)
    tmp = target.with_name(_fs.temp_name(f".{target.name}."))
    try:
        with _fs.storage_errors(f"writing {path}"):
            torch.save(state, tmp)
            _fs.durable_rename(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return []


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

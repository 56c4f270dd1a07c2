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

__all__ = ["FORMATS", "guess_format", "sniff_format", "read_state_file", "write_state_file"]

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
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; all mean "unreadable"
        raise _mislabelled(path, "pt") or InvalidInputError(
            f"{path}: not a readable PyTorch checkpoint ({_load_failure(err)})"
        ) from None
    return state, {}


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

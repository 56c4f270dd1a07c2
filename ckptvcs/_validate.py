"""Argument validators shared by the library's entry points (Repo, CheckpointManager, CLI).

One rule per kind of value, so that the same value is accepted or refused the same way
whichever door it comes through:

- an *integer* is an ``int`` or a numpy integer, never a ``bool`` (``True`` is almost
  always a mistake where a step or a size is meant), and never a float, even ``4.0``;
- a *metric* is a real number: an ``int``, ``float``, numpy scalar or one-element
  tensor, converted to ``float``. ``bool``, ``str`` and ``bytes`` are refused
  (``{"acc": True}`` or ``{"loss": "0.5"}`` is far more likely a bug than a number),
  and metric names must be strings;
- a *string* field is a ``str``, nothing converted to one;
- a repository's settings (chunk size, keyframe interval) are integers within their
  bounds, and its path is a local one (a URL is refused until remotes exist).

Torch is not imported here: a value can only be a tensor when torch is loaded already.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import UnsupportedValueError, UsageError

__all__ = [
    "as_int", "check_int", "require_int", "optional_int", "metrics", "require_str", "check_chunk_size",
    "check_keyframe_interval", "refuse_url", "MIN_CHUNK_SIZE", "MAX_CHUNK_SIZE",
]


def as_int(value: Any) -> int | None:
    """``value`` as a plain ``int`` when it is an integer by the rule above, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def check_int(value: Any, name: str, *, minimum: int, maximum: int | None = None, multiple_of: int = 1,
              message: str | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` and a multiple of ``multiple_of``.

    Raises UsageError otherwise, with ``message`` (formatted with ``value``'s repr as
    ``{value}``) or a message naming ``name`` and the bounds.
    """
    number = as_int(value)
    if number is None or number < minimum or (maximum is not None and number > maximum) or number % multiple_of:
        if message is None:
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f"of at least {minimum}"
            grid = f" and a multiple of {multiple_of}" if multiple_of != 1 else ""
            message = f"{name} must be an integer {bounds}{grid}, got {{value}}"
        raise UsageError(message.format(value=repr(value)))
    return number


def require_int(value: Any, name: str) -> int:
    """``value`` as an ``int``; refuses anything else with UnsupportedValueError naming ``name`` (a record field)."""
    number = as_int(value)
    if number is None:
        raise UnsupportedValueError(name, f"expected an integer, got {type(value).__name__}")
    return number


def optional_int(value: Any, name: str) -> int | None:
    """None, or :func:`require_int` of ``value``."""
    return None if value is None else require_int(value, name)


def metrics(values: Mapping[str, Any] | None) -> dict[str, float]:
    """A metrics mapping as ``{name: float}`` by the metric rule above (UnsupportedValueError otherwise)."""
    result: dict[str, float] = {}
    for name, value in (values or {}).items():
        if not isinstance(name, str):
            raise UnsupportedValueError(f"metrics/{name!r}", "metric names must be strings")
        try:
            if _is_tensor(value):
                value = value.item()
            if isinstance(value, (bool, np.bool_, str, bytes)):
                raise TypeError
            result[name] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise UnsupportedValueError(f"metrics/{name}", f"expected a number, got {type(value).__name__}") from None
    return result


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def require_str(value: Any, name: str) -> str:
    """``value`` when it is a string; refuses anything else with UnsupportedValueError naming ``name`` (a record field)."""
    if not isinstance(value, str):
        raise UnsupportedValueError(name, f"expected a string, got {type(value).__name__}")
    return value


# -- repository settings --------------------------------------------------------------------

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 256 << 20
# A URL scheme (s3://, gs://, file://, https://...); Path() folds "//" to "/", so one
# slash is enough. Single-letter schemes are Windows drive letters, not URLs.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def check_chunk_size(value: Any) -> int:
    """A repository's chunk size: a multiple of 16 bytes between 4 KiB and 256 MiB (UsageError otherwise)."""
    return check_int(
        value, "chunk_size", minimum=MIN_CHUNK_SIZE, maximum=MAX_CHUNK_SIZE, multiple_of=16,
        message=f"chunk_size must be a multiple of 16 between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}, got {{value}}",
    )


def check_keyframe_interval(value: Any) -> int:
    """A repository's keyframe interval: 1 (no deltas) to 64 (UsageError otherwise)."""
    return check_int(value, "keyframe_interval", minimum=1, maximum=64)


def refuse_url(path: Any) -> None:
    """Refuse a URL as a repository path (until remotes exist it would become a local
    directory named like ``s3:``)."""
    try:
        text = os.fspath(path)
    except TypeError:
        return
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if _URL.match(text):
        raise UsageError(
            f"{text}: a URL; ckptvcs repositories are local directories for now (remote storage is not supported yet)"
        )

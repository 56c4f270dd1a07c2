"""Storage backends: the only code that touches durable storage (see ``base.Backend``).

``LocalBackend`` (a directory: fsync, rename, lock files, flock), ``MemoryBackend`` (a
dict, for tests) and ``FaultyBackend`` (a wrapper that injects faults) implement it.
"""

from __future__ import annotations

import os

from ckptvcs.backends.base import (
    Backend,
    Capabilities,
    ConcurrentUpdate,
    KeyMissing,
    ObjectWriter,
    RangeReader,
    append_many,
    check_key,
    put_many,
)
from ckptvcs.backends.faults import Fault, FaultyBackend
from ckptvcs.backends.local import LocalBackend
from ckptvcs.backends.memory import MemoryBackend


def backend_of(where: Backend | str | os.PathLike[str]) -> Backend:
    """``where`` itself when it is a backend, else a LocalBackend on that directory (the
    modules that took a repository root before the seam still accept one)."""
    return where if isinstance(where, Backend) else LocalBackend(where)

__all__ = [
    "Backend", "Capabilities", "ConcurrentUpdate", "KeyMissing", "ObjectWriter", "RangeReader", "check_key",
    "put_many", "append_many", "LocalBackend", "MemoryBackend", "FaultyBackend", "Fault", "backend_of",
]

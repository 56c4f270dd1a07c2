"""Storage backends: the only code that touches durable storage (see ``base.Backend``).

``LocalBackend`` (a directory: fsync, rename, lock files, flock), ``MemoryBackend`` (a
dict, for tests) and ``FaultyBackend`` (a wrapper that injects faults) implement it.
"""

from ckptvcs.backends.base import (
    Backend,
    Capabilities,
    ConcurrentUpdate,
    KeyMissing,
    ObjectWriter,
    RangeReader,
    check_key,
)
from ckptvcs.backends.faults import Fault, FaultyBackend
from ckptvcs.backends.local import LocalBackend
from ckptvcs.backends.memory import MemoryBackend

__all__ = [
    "Backend", "Capabilities", "ConcurrentUpdate", "KeyMissing", "ObjectWriter", "RangeReader", "check_key",
    "LocalBackend", "MemoryBackend", "FaultyBackend", "Fault",
]

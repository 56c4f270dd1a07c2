"""Per-thread reusable scratch buffers for the chunk pipeline.

Every chunk passes through several chunk-sized temporaries (byte planes, an XOR delta,
the decoded copy that verification hashes, a delta base, a payload read from a pack).
Allocating them fresh costs more than using them: buffers of a MiB come straight from
``mmap``, and on the VMs we measured, first-touch page faults ran at ~1 GB/s, slower
than zstd. So each worker thread keeps one buffer per named slot and reuses it.

A scratch buffer is valid until the same thread asks for the same slot again: use it
within one call, never hand it to another thread or keep it.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["buffer"]

_local = threading.local()


def buffer(slot: str, nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` owned by this thread's ``slot`` (contents undefined)."""
    slots = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = {}
    buf = slots.get(slot)
    if buf is None or buf.shape[0] < nbytes:
        buf = slots[slot] = np.empty(max(nbytes, 1), dtype=np.uint8)
    return buf[:nbytes]

"""Pausing Python's cyclic garbage collector around allocation-heavy commit phases.

A commit of many small tensors allocates several tracked objects per tensor (the
manifest tree's nodes, blob records, chunk lists) that all survive until the commit
ends. Each of them counts towards the collector's thresholds, so a 100,000-tensor commit
ran a dozen full collections, each walking every object of the process (torch alone has
hundreds of thousands): a cost per tensor that grew with the state (issue 16, "Many
small tensors: the commit side" in docs/performance.md). Nothing those phases allocate
is cyclic garbage, so collecting during them finds nothing.

:func:`paused` disables the collector for the duration of such a phase and re-enables
it afterwards, only if it was enabled when the first of the overlapping pauses began
(pauses nest and may overlap across threads). The pause is process-wide: cyclic garbage
of other threads waits until the phase ends. It is used only around phases whose
length grows with the number of tensors (walking the state, building the manifest);
around the storing of chunks, whose length grows with the state's bytes, only when
:func:`small_items` says the bytes are few per tensor (so that phase, too, lasts a time
bounded by the number of tensors, not by the size of a large model).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["paused", "small_items"]

_lock = threading.Lock()
_depth = 0  # pauses in progress, in every thread
_reenable = False  # whether the collector was enabled when the outermost pause began


# A phase over this many items, of at most this many bytes each on average, is paused:
# below the count the collector barely runs; above the size, bytes dominate the phase.
_MANY_ITEMS = 1024
_SMALL_ITEM_BYTES = 64 << 10


def small_items(count: int, nbytes: int) -> bool:
    """Whether ``count`` items (tensors) holding ``nbytes`` in all are many, small ones."""
    return count >= _MANY_ITEMS and nbytes <= count * _SMALL_ITEM_BYTES


@contextlib.contextmanager
def paused(when: bool = True) -> Iterator[None]:
    """Run the body with the cyclic garbage collector disabled (see the module docstring);
    ``when=False`` runs it unchanged."""
    if not when:
        yield
        return
    global _depth, _reenable
    with _lock:
        if _depth == 0:
            _reenable = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _reenable:
                gc.enable()

"""Pausing Python's cyclic garbage collector around work that builds many objects.

Loading a manifest of 100,000 tensors builds a few hundred thousand dicts and lists,
and each allocation counts towards the collector's next pass; the older generations'
passes walk every live container, so their cost grows with the state and a load or
commit of many small tensors spends a third of its CPU in them (measured at 20,000
tensors: load 1.28 against 0.81 s, commit 2.05 against 1.3-1.5 s). The objects built
there are trees without reference cycles, freed by reference counting alone, so
nothing is lost by not looking for cycles until the work is done.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block if it is enabled; enable it again after.

    Nested or concurrent uses are safe: only the use that disabled it enables it again,
    so the collector is never left off (at worst a concurrent block runs with it on).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()

"""Walks of the commit graph: history newest first, and the set of commits reachable.

Both read commits through a callable (commit id → :class:`~ckptvcs.objects.Commit`, or
→ its parents), so the walk knows nothing of where commits are stored: :class:`ckptvcs.Repo`
passes its object store's reader, with each commit's pruned record attached for ``log``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence

from .objects import Commit

__all__ = ["walk", "reachable"]


def walk(load: Callable[[str], Commit], starts: Iterable[str], n: int | None = None, *,
         hidden: set[str] | None = None) -> list[Commit]:
    """Commits reachable from ``starts`` (parents included), newest first by commit time, at
    most ``n``; ``hidden`` commits are neither listed nor walked past (a range's ``A``)."""
    seen: set[str] = set(hidden or ())
    heap: list[tuple[bytes, str, Commit]] = []

    def push(oid: str) -> None:
        if oid not in seen:
            seen.add(oid)
            commit = load(oid)
            # Negated time via a sort key: newest first with a min-heap.
            heapq.heappush(heap, (_desc(commit.time), oid, commit))

    for oid in starts:
        push(oid)
    result: list[Commit] = []
    while heap and (n is None or len(result) < n):
        _, _, commit = heapq.heappop(heap)
        result.append(commit)
        for parent in commit.parents:
            push(parent)
    return result


def reachable(parents: Callable[[str], Sequence[str]], starts: Iterable[str],
              stop: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Ids of the commits reachable from ``starts`` (parents included), not walking past ``stop``."""
    return set(reachable_in_order(parents, starts, stop))


def reachable_in_order(parents: Callable[[str], Sequence[str]], starts: Iterable[str],
                       stop: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """:func:`reachable`, in the order the depth-first walk meets them (deterministic for the
    same history; parents before children is not implied)."""
    seen: dict[str, None] = {}
    stack = [s for s in starts if s not in stop]
    while stack:
        oid = stack.pop()
        if oid in seen:
            continue
        seen[oid] = None
        stack.extend(p for p in parents(oid) if p not in seen and p not in stop)
    return list(seen)


_INVERT = bytes(255 - b for b in range(256))


def _desc(timestamp: str) -> bytes:
    """A heap key that orders ISO timestamps newest first: each character's code point
    inverted (UTF-32-BE, every byte flipped), so it sorts as the negated code points did."""
    return timestamp.encode("utf-32-be", "surrogatepass").translate(_INVERT)

"""A derived cache for ``Repo.stats()``: each reachable commit's parents and logical bytes.

``stats()`` sums the logical bytes of every reachable commit. Reading 10,000 commit
objects for that costs seconds; a commit object never changes (its id is its hash),
so what stats needs from it (parents, ``stats.logical_bytes``) is kept in
``stats-cache.json`` (docs/format.md, section 15) and only commits not in it are read.
The reachable set is still walked from the current tips on every call (over the
cached parents, in memory), so deleted branches, gc and new commits are all seen.

The cache is derived, informational data, like ``last-fsck.json``: it carries a
BLAKE3 checksum of its entries and is discarded (and rebuilt from the objects) when it
is missing, does not parse, or fails its checksum; nothing but ``stats()`` reads it.
Writing it is best effort (a read-only store keeps none).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import blake3

from . import layout
from .backends import Backend
from .errors import CkptvcsError
from .history import reachable
from .objects import Commit, canonical_json

__all__ = ["Summary", "summarize"]

KEY = layout.STATS_CACHE
VERSION = 1
_MAX_SIZE = 64 << 20

# commit id -> (logical bytes, parent ids)
Entries = dict[str, tuple[int, tuple[str, ...]]]


@dataclass
class Summary:
    """What ``stats()`` reports from the history and the files."""

    commits: int
    logical_bytes: int
    pack_bytes: int
    object_bytes: int


def load(backend: Backend) -> tuple[Entries, dict[str, int], list[str]]:
    """``(commit entries, key sizes, the tips they were walked from)`` from the cache; all
    empty when it is absent, unreadable or fails its checksum."""
    try:
        data = backend.get(KEY, max_size=_MAX_SIZE)
        header_line, _, rest = data.partition(b"\n")
        header = json.loads(header_line)
        body_bytes = rest.removesuffix(b"\n")
        if header.get("version") != VERSION or header.get("checksum") != blake3.blake3(body_bytes).hexdigest():
            return {}, {}, []
        body = json.loads(body_bytes)
        commits = {str(oid): (int(v[0]), tuple(str(p) for p in v[1])) for oid, v in body["commits"].items()}
        return commits, {str(key): int(size) for key, size in body["sizes"].items()}, [str(t) for t in body["tips"]]
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError, IndexError, CkptvcsError):
        return {}, {}, []


def save(backend: Backend, entries: Entries, sizes: dict[str, int], tips: list[str]) -> None:
    """Replace the cache (best effort: a failure only costs the next call its reads)."""
    body = canonical_json({"commits": {oid: [size, list(parents)] for oid, (size, parents) in entries.items()},
                           "sizes": sizes, "tips": tips})
    header = canonical_json({"version": VERSION, "checksum": blake3.blake3(body).hexdigest()})
    with contextlib.suppress(OSError, CkptvcsError):
        backend.put(KEY, header + b"\n" + body + b"\n")


def summarize(backend: Backend, read_commit: Callable[[str], Commit], tips: Iterable[str]) -> Summary:
    """The commits reachable from ``tips`` (count, logical bytes) and the bytes under
    ``packs/`` and ``objects/``, reading only what the cache does not hold.

    Commits missing from the cache are read with ``read_commit`` (its errors propagate,
    as a full walk's would); files are listed every time, and only those the cache
    does not know are sized (objects and packs never change once written: a key names
    one content). The cache is rewritten, holding exactly what is reachable and listed
    now, when that differs from what it held.
    """
    cached, cached_sizes, cached_tips = load(backend)
    tips = sorted(set(tips))
    fresh: Entries = {}

    def parents(oid: str) -> tuple[str, ...]:
        entry = cached.get(oid)
        if entry is None:
            commit = read_commit(oid)
            entry = fresh[oid] = (int(commit.stats.get("logical_bytes", 0)), tuple(commit.parents))
        return entry[1]

    # The cache holds exactly the commits reachable from its tips: same tips, same set.
    seen = set(cached) if cached and tips == cached_tips else reachable(parents, tips)
    entries = {**cached, **fresh}
    folder_bytes = {}
    sizes: dict[str, int] = {}
    for prefix in (layout.PACKS, layout.OBJECTS):
        total = 0
        for key in backend.list(prefix):
            size = cached_sizes.get(key)
            if size is None:
                size = backend.size(key) or 0
            sizes[key] = size
            total += size
        folder_bytes[prefix] = total
    if fresh or len(cached) != len(seen) or sizes != cached_sizes or tips != cached_tips:
        save(backend, {oid: entries[oid] for oid in sorted(seen)}, sizes, tips)
    return Summary(len(seen), sum(entries[oid][0] for oid in seen), folder_bytes[layout.PACKS],
                   folder_bytes[layout.OBJECTS])

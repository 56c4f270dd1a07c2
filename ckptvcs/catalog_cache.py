"""A derived cache of commit summaries, so catalog queries need not read every commit object.

``Repo.find`` / ``Repo.best`` / ``ckptvcs log --where`` walk a history and test each commit
against ``FIELD OP VALUE`` conditions; reading 10,000 commit objects for that (file,
zstd, BLAKE3, JSON, the record) is most of their time. What a query needs from a commit
(its parents and time for the walk; message, author, step, epoch, metrics and data
version for the conditions) is kept here, keyed by commit id. A commit object never
changes (its id is its hash) and gc never deletes one (gc.py), so an entry never goes
stale; one whose commit no ref reaches any more is merely unused.

``catalog-cache.jsonl`` (docs/format.md, section 15): one line per commit,
``c1 <hex BLAKE3 of the JSON, 32 digits> <canonical JSON>``, appended by queries that had
to read new commits. A line that does not parse or fails its checksum is skipped (its
commit is read from its object). The cache selects, objects answer: every commit a query
returns is read from its verified object and compared with its summary, and any
difference drops the cache and answers the query from the objects (a forged cache can
hide a commit from a result, never return a wrong one; see docs/format.md).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import blake3

from . import layout
from .backends import Backend
from .errors import CkptvcsError
from .objects import Commit, canonical_json, decode_float, encode_float

__all__ = ["Summary", "Summaries", "summary_of", "drop"]

KEY = layout.CATALOG_CACHE
_TAG = b"c1"
_MAX_SIZE = 1 << 30


class Summary(NamedTuple):
    """What a catalog query reads of a commit (the fields :mod:`ckptvcs.catalog` tests, but
    config). A named tuple: 10,000 of them are made per query, and a frozen dataclass
    costs several times more to build."""

    id: str
    parents: tuple[str, ...]
    time: str
    message: str
    author: str
    step: int | None
    epoch: int | None
    metrics: dict[str, float]
    data_version: str | None

    def encode(self) -> bytes:
        """The summary's canonical JSON (what a cache line holds and the check compares)."""
        return canonical_json([self.id, list(self.parents), self.time, self.message, self.author, self.step,
                               self.epoch, {k: encode_float(v) for k, v in self.metrics.items()},
                               self.data_version])


def summary_of(commit: Commit) -> Summary:
    return Summary(commit.id, tuple(commit.parents), commit.time, commit.message, commit.author, commit.step,
                   commit.epoch, dict(commit.metrics), commit.data_version)


def _decode(item: list[Any]) -> Summary:
    oid, parents, time, message, author, step, epoch, metrics, data_version = item
    for value in (step, epoch):
        if value is not None and type(value) is not int:
            raise ValueError("step or epoch is not an integer")
    if not (isinstance(oid, str) and isinstance(time, str) and isinstance(message, str) and isinstance(author, str)
            and (data_version is None or isinstance(data_version, str)) and all(isinstance(p, str) for p in parents)):
        raise ValueError("not a commit summary")
    decoded = {str(k): v if type(v) is float else decode_float(v) for k, v in metrics.items()}
    return Summary(oid, tuple(parents), time, message, author, step, epoch, decoded, data_version)


def _line(summary: Summary) -> bytes:
    body = summary.encode()
    return _TAG + b" " + blake3.blake3(body).hexdigest(length=16).encode() + b" " + body + b"\n"


def load(backend: Backend) -> dict[str, Summary]:
    """Every sound line of the cache by commit id; empty when the cache is absent or unreadable."""
    try:
        data = backend.get(KEY, max_size=_MAX_SIZE)
    except (OSError, CkptvcsError):
        return {}
    sound = []
    for line in data.split(b"\n"):
        tag, _, rest = line.partition(b" ")
        digest, _, body = rest.partition(b" ")
        if tag == _TAG and digest == blake3.blake3(body).hexdigest(length=16).encode():
            sound.append(body)
    try:  # one parse for all lines: much faster than one json.loads per line
        items = json.loads(b"[" + b",".join(sound) + b"]")
    except (ValueError, RecursionError):
        return {}
    found: dict[str, Summary] = {}
    for item in items:
        with contextlib.suppress(ValueError, TypeError, AttributeError, CkptvcsError):
            summary = _decode(item)
            found[summary.id] = summary
    return found


class Summaries:
    """Summaries of one repository's commits: from the cache, else from the objects (then
    remembered, and appended to the cache by :meth:`save`)."""

    def __init__(self, backend: Backend, read_commit: Callable[[str], Commit]) -> None:
        self.backend = backend
        self.read_commit = read_commit
        self.cached = load(backend)
        self.fresh: dict[str, Summary] = {}

    def get(self, oid: str) -> Summary:
        summary = self.cached.get(oid) or self.fresh.get(oid)
        if summary is None:
            summary = self.fresh[oid] = summary_of(self.read_commit(oid))
        return summary

    def save(self) -> None:
        """Append the summaries read from objects (best effort: a read-only store keeps none)."""
        if self.fresh:
            with contextlib.suppress(OSError, CkptvcsError):
                self.backend.append(KEY, b"".join(_line(s) for s in self.fresh.values()))
            self.cached.update(self.fresh)
            self.fresh = {}


def drop(backend: Backend) -> None:
    """Delete the cache (it disagreed with an object); the next query rebuilds it."""
    with contextlib.suppress(OSError, CkptvcsError):
        backend.delete(KEY)

"""A derived cache for ``Repo.stats()``, so that it costs the same at 10,000 commits as at 10.

``stats()`` reports the commits reachable from every ref (count, summed logical bytes)
and the bytes under ``packs/`` and ``objects/``. Both used to be linear in the history:
every commit read, every key listed. Two keys (docs/format.md, section 15) keep what the
last call found:

- ``stats-cache.json``, small: the tips it walked from and the totals it found for them,
  and, per folder under ``packs/`` and ``objects/``, the backend's change token, the bytes
  of the files directly in it and its sub-folders;
- ``stats-cache.commits``, compact binary: every reachable commit's id, logical bytes and
  parents. It is read only when the tips moved.

With the same tips the totals are reused (commit objects never change: their id is their
hash); when the tips moved, the reachable set is walked again over the cached parents,
reading only the commits the table lacks. A folder whose token did not change is not
listed (:class:`ckptvcs.backends.base.FolderTokens`; a backend without tokens is listed
every time, and only keys not sized before are sized). So a warm call with unchanged refs
reads one small file and stats one folder per fan-out folder.

The cache is derived, informational data, like ``last-fsck.json``: each part carries a
BLAKE3 checksum (the table's is in the header) and is discarded (and rebuilt from the
objects and the folders) when it is missing, does not parse, or fails its checksum;
nothing but ``stats()`` reads it. Writing it is best effort (a read-only store keeps none).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import blake3

from . import layout
from .backends import Backend
from .backends.base import FolderTokens, folder_tokens_of
from .errors import CkptvcsError
from .history import reachable
from .objects import Commit, canonical_json

__all__ = ["Summary", "summarize"]

KEY = layout.STATS_CACHE
TABLE_KEY = layout.STATS_CACHE_COMMITS
VERSION = 2
_MAX_SIZE = 64 << 20
_MAX_TABLE = 1 << 30
_RECORD = struct.Struct("<32sQB")  # commit id, logical bytes, parent count; then 32 bytes per parent

# commit id -> (logical bytes, parent ids)
Entries = dict[str, tuple[int, tuple[str, ...]]]
# folder key -> (change token, bytes of the files directly in it, sub-folder names)
Folders = dict[str, tuple[str, int, tuple[str, ...]]]


@dataclass
class Summary:
    """What ``stats()`` reports from the history and the files."""

    commits: int
    logical_bytes: int
    pack_bytes: int
    object_bytes: int


@dataclass
class Header:
    """The small part of the cache: totals for one set of tips, and the folder tree."""

    tips: list[str] = field(default_factory=list)
    commits: int = 0
    logical_bytes: int = 0
    table: str = ""  # hex BLAKE3 of stats-cache.commits as written with these tips
    folders: Folders = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # per key, for backends without folder tokens


def load_header(backend: Backend) -> Header | None:
    """The header, or None when it is absent, unreadable, of another version or fails its checksum."""
    try:
        data = backend.get(KEY, max_size=_MAX_SIZE)
        first, _, rest = data.partition(b"\n")
        meta = json.loads(first)
        body_bytes = rest.removesuffix(b"\n")
        if meta.get("version") != VERSION or meta.get("checksum") != blake3.blake3(body_bytes).hexdigest():
            return None
        body = json.loads(body_bytes)
        return Header(
            tips=[_hex_id(t) for t in body["tips"]],
            commits=_count(body["commits"]),
            logical_bytes=_count(body["logical_bytes"]),
            table=str(body["table"]),
            folders=_folders(body["folders"], body["subfolders"]),
            sizes={str(k): _count(v) for k, v in body["sizes"].items()},
        )
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError, IndexError, CkptvcsError):
        return None


def save_header(backend: Backend, header: Header) -> None:
    """Replace the header (best effort: a failure only costs the next call its walks)."""
    body = canonical_json({
        "tips": header.tips, "commits": header.commits, "logical_bytes": header.logical_bytes,
        "table": header.table, "folders": {k: [t, n] for k, (t, n, _) in header.folders.items()},
        "subfolders": {k: list(s) for k, (_, _, s) in header.folders.items() if s},
        "sizes": header.sizes,
    })
    meta = canonical_json({"version": VERSION, "checksum": blake3.blake3(body).hexdigest()})
    with contextlib.suppress(OSError, CkptvcsError):
        backend.put(KEY, meta + b"\n" + body + b"\n")


def encode_table(entries: Entries) -> bytes:
    """The commit table: per commit (sorted by id) its id, logical bytes and parents, in binary."""
    out = bytearray()
    for oid in sorted(entries):
        size, parents = entries[oid]
        out += _RECORD.pack(bytes.fromhex(oid), size, len(parents))
        for parent in parents:
            out += bytes.fromhex(parent)
    return bytes(out)


def load_table(backend: Backend, checksum: str) -> Entries:
    """The commit table if its bytes hash to ``checksum`` (the header's), else empty."""
    try:
        data = backend.get(TABLE_KEY, max_size=_MAX_TABLE)
        if not checksum or blake3.blake3(data).hexdigest() != checksum:
            return {}
        entries: Entries = {}
        view = memoryview(data)
        offset, end, size = 0, len(data), _RECORD.size
        while offset < end:
            oid, logical, count = _RECORD.unpack_from(view, offset)
            offset += size
            parents = tuple(view[offset + 32 * i:offset + 32 * (i + 1)].hex() for i in range(count))
            offset += 32 * count
            if offset > end:
                return {}
            entries[oid.hex()] = (logical, parents)
        return entries
    except (OSError, ValueError, struct.error, CkptvcsError):
        return {}


def summarize(backend: Backend, read_commit: Callable[[str], Commit], tips: Iterable[str]) -> Summary:
    """The commits reachable from ``tips`` (count, logical bytes) and the bytes under
    ``packs/`` and ``objects/``, reading only what the cache cannot vouch for.

    Commits missing from the cache are read with ``read_commit`` (its errors propagate,
    as a full walk's would). The cache is rewritten when what was found differs from
    what it held.
    """
    old = load_header(backend)
    tips = sorted(set(tips))
    new = Header(tips=tips)
    if old is not None and old.tips == tips:
        new.commits, new.logical_bytes, new.table = old.commits, old.logical_bytes, old.table
    else:
        _walk_commits(backend, read_commit, old, new)
    tokens = folder_tokens_of(backend)
    totals = {}
    for prefix in (layout.PACKS, layout.OBJECTS):
        if tokens is not None:
            totals[prefix] = _folder_bytes(tokens, prefix, old.folders if old else {}, new.folders)
        else:
            totals[prefix] = _key_bytes(backend, prefix, old.sizes if old else {}, new.sizes)
    if new != old:
        save_header(backend, new)
    return Summary(new.commits, new.logical_bytes, totals[layout.PACKS], totals[layout.OBJECTS])


def _walk_commits(backend: Backend, read_commit: Callable[[str], Commit], old: Header | None, new: Header) -> None:
    """Walk the reachable set from ``new.tips`` over the cached table, reading only the
    commits it lacks; fill ``new``'s totals and write the table for them."""
    cached = load_table(backend, old.table) if old is not None else {}
    fresh: Entries = {}

    def parents(oid: str) -> tuple[str, ...]:
        entry = cached.get(oid)
        if entry is None:
            commit = read_commit(oid)
            entry = fresh[oid] = (int(commit.stats.get("logical_bytes", 0)), tuple(commit.parents))
        return entry[1]

    seen = reachable(parents, new.tips)
    entries = {oid: fresh.get(oid) or cached[oid] for oid in seen}
    new.commits = len(seen)
    new.logical_bytes = sum(size for size, _ in entries.values())
    if old is not None and not fresh and len(seen) == len(cached):
        new.table = old.table  # the same commits (all came from it): the table stands
        return
    table = encode_table(entries)
    new.table = blake3.blake3(table).hexdigest()
    if old is None or new.table != old.table:
        with contextlib.suppress(OSError, CkptvcsError):
            backend.put(TABLE_KEY, table)


def _folder_bytes(backend: FolderTokens, prefix: str, old: Folders, new: Folders) -> int:
    """Bytes of every file under ``prefix``, listing only folders whose token changed.

    Each token is taken before its folder is listed, so a change made while it is listed
    moves the token away from the one remembered and the next call lists it again.
    """
    total = 0
    parent, _, name = prefix.rpartition("/")
    groups = [(parent, [name])]  # folders to visit, by parent: one batch of tokens each
    while groups:
        parent, names = groups.pop()
        for name, token in zip(names, backend.folder_tokens(parent, names)):
            folder = f"{parent}/{name}" if parent else name
            node = old.get(folder)
            if token is not None and node is not None and node[0] == token:
                nbytes, subs = node[1], node[2]
            else:
                files, folders = backend.list_folder(folder)
                nbytes, subs = sum(size for _, size in files), tuple(folders)
            if token is not None:
                new[folder] = (token, nbytes, subs)
            total += nbytes
            if subs:
                groups.append((folder, list(subs)))
    return total


def _key_bytes(backend: Backend, prefix: str, old: dict[str, int], new: dict[str, int]) -> int:
    """Bytes of every key under ``prefix`` by listing it, sizing only keys not sized before
    (a key of ``packs/`` or ``objects/`` names one content: its size never changes)."""
    total = 0
    for key in backend.list(prefix):
        size = old.get(key)
        if size is None:
            size = backend.size(key) or 0
        new[key] = size
        total += size
    return total


def _folders(folders: dict[str, list[object]], subfolders: dict[str, list[str]]) -> Folders:
    """The header's folder tree, checked for shape (a wrong type must not reach the sums)."""
    out: Folders = {}
    for key, (token, nbytes) in folders.items():
        subs = subfolders.get(key, ())
        if not isinstance(token, str) or type(nbytes) is not int or nbytes < 0:
            raise ValueError("not a folder entry")
        out[key] = (token, nbytes, tuple(subs))
    for subs in subfolders.values():
        if not all(isinstance(sub, str) for sub in subs):
            raise ValueError("not a folder name")
    return out


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("not a count")
    return value


def _hex_id(value: object) -> str:
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError("not a commit id")
    bytes.fromhex(value)
    return value

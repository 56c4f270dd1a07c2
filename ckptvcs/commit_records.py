"""Pruned and staged records: read, write, list and remove, through the repository's backend.

``pruned/<commit id>`` says a retention rule (or gc) released a commit's tensor data;
``staged/<manifest id>`` says a staged state waits to be published (docs/format.md,
sections "Pruned records" and 12). Both are small canonical-JSON objects written with
one atomic, durable ``put``. Repo builds the records (who, when) and delegates their
storage here, under its method names that fsck and gc use (``_pruned_records``,
``_staged_records``, ``_record_collected``, ``_mark_collected``, ``_remove_staged_records``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from . import _fs, layout
from .backends import Backend
from .errors import CkptvcsError, CorruptObjectError
from .objects import canonical_json

__all__ = ["pruned_records", "is_pruned", "read_pruned", "store_pruned", "write_staged", "remove_staged",
           "staged_records", "staged_for_gc", "staged_time"]

_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_MAX_RECORD_SIZE = 1 << 20  # small JSON files


# -- pruned records --------------------------------------------------------------------


def _record_path(backend: Backend, key: str) -> str:
    """How messages name a record: its file in a local store, else its key."""
    local = backend.local_root()
    return key if local is None else str(local / key)


def pruned_records(backend: Backend) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(commit id → record, commit id → why its record is damaged)``."""
    with _fs.storage_errors("listing pruned records"):
        names = [key.rsplit("/", 1)[-1] for key in backend.list(layout.PRUNED) if key.count("/") == 1]
    records: dict[str, dict[str, Any]] = {}
    damaged: dict[str, str] = {}
    for name in names:
        if _HEX_ID.match(name):
            try:
                records[name] = read_pruned(backend, name)
            except CorruptObjectError as err:
                damaged[name] = str(err)
    return records, damaged


def is_pruned(backend: Backend, commit_id: str) -> bool:
    """Whether a pruned record exists for this commit."""
    return _HEX_ID.match(commit_id) is not None and backend.size(layout.pruned_key(commit_id)) is not None


def read_pruned(backend: Backend, commit_id: str) -> dict[str, Any]:
    """The pruned record of a commit; CorruptObjectError when it does not read or is malformed."""
    path = _record_path(backend, layout.pruned_key(commit_id))
    try:
        record = json.loads(backend.get(layout.pruned_key(commit_id), max_size=_MAX_RECORD_SIZE))
    except (OSError, ValueError, RecursionError) as err:
        raise CorruptObjectError(f"pruned record {path} is unreadable: {str(err)[:200]}") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("rule"), str)
        or record.get("commit", commit_id) != commit_id
    ):
        raise CorruptObjectError(f"pruned record {path} is malformed")
    return record


def store_pruned(backend: Backend, commit_id: str, record: dict[str, Any]) -> None:
    """Write ``pruned/<commit id>`` atomically and durably."""
    with _fs.storage_errors(f"recording that commit {commit_id[:12]} was pruned"):
        backend.put(layout.pruned_key(commit_id), canonical_json(record) + b"\n")


# -- staged records (docs/format.md, section 12) ----------------------------------------


def write_staged(backend: Backend, manifest_id: str, record: dict[str, Any]) -> None:
    """Record a stage durably (an atomic put): gc keeps its data for the grace."""
    with _fs.storage_errors(f"recording staged state {manifest_id[:12]}"):
        backend.put(layout.staged_key(manifest_id), canonical_json(record) + b"\n")


def remove_staged(backend: Backend, manifest_ids: Iterable[str]) -> None:
    """Drop staged records (published, or expired and reclaimed by gc)."""
    with _fs.storage_errors("removing staged records"):
        backend.delete_many([layout.staged_key(m) for m in manifest_ids])


def staged_records(backend: Backend) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(manifest id → staged record, name → why its record does not read)``."""
    with _fs.storage_errors("listing staged records"):
        names = [key.rsplit("/", 1)[-1] for key in backend.list(layout.STAGED) if key.count("/") == 1]
    records: dict[str, dict[str, Any]] = {}
    damaged: dict[str, str] = {}
    for name in names:
        if not _HEX_ID.match(name):
            continue  # an interrupted atomic_write's temp file
        try:
            record = json.loads(backend.get(layout.staged_key(name), max_size=_MAX_RECORD_SIZE))
            if not isinstance(record, dict) or record.get("manifest") != name:
                raise ValueError("not a staged record of this manifest")
            staged_time(record)
        except (OSError, ValueError, RecursionError, CkptvcsError) as err:
            damaged[name] = f"staged record staged/{name} is unreadable: {str(err)[:200]}"
            continue
        records[name] = record
    return records, damaged


def staged_for_gc(backend: Backend, expire: float) -> tuple[list[str], list[str]]:
    """``(manifest ids whose staged data gc keeps, names of expired staged records)``.

    A record that does not read expires by its file's modification time (a staged
    state is garbage until published: an unreadable record must not keep it forever).
    """
    records, damaged = staged_records(backend)
    now = time.time()
    keep: list[str] = []
    expired: list[str] = []
    local = backend.local_root()
    for name in [*records, *damaged]:
        try:
            if name in records:
                made = staged_time(records[name])
            else:  # no time to read: the file's, or (no files) expired now
                made = 0.0 if local is None else os.lstat(local / layout.staged_key(name)).st_mtime
        except OSError:
            made = now
        (keep if now - made < expire else expired).append(name)
    return keep, expired


def staged_time(record: dict[str, Any]) -> float:
    """A staged record's time, in seconds since the epoch; ValueError when malformed."""
    when = datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"time {record.get('time')!r} has no time zone")
    return when.timestamp()

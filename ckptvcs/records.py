"""Operational records: what gc, restores and verifications did, kept for the report.

One JSON object per line in ``records/<kind>.jsonl`` (docs/format.md, "Operational
records"): appended through the repository's backend (``Backend.append``: locally one
``write()`` and an fsync), never rewritten. They are
informational: nothing decides what to keep or delete by them, so a damaged line is
skipped (and counted) rather than refused, and a record that cannot be written (a
read-only store) is a warning, never a failed gc or restore.

A repository is untrusted input: a reader looks at the last :data:`MAX_READ_BYTES`
of a file only (the newest records), by ranged reads of the backend (which opens a
regular file only, never a link or a FIFO), and caps the nesting of each line.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .backends import Backend, backend_of
from .errors import CkptvcsError
from .objects import canonical_json, json_depth_exceeds

__all__ = ["RECORDS_DIRNAME", "KINDS", "MAX_READ_BYTES", "RecordLog", "append", "read"]

RECORDS_DIRNAME = layout.RECORDS
KINDS = ("gc", "restore")
"""The record files ckptvcs writes: ``records/gc.jsonl``, ``records/restore.jsonl``."""

MAX_READ_BYTES = 4 << 20
"""A reader parses at most the last 4 MiB of a record file (thousands of records)."""

_MAX_DEPTH = 16
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass
class RecordLog:
    """The readable records of one kind, oldest first, and what could not be read."""

    kind: str
    records: list[dict[str, Any]] = field(default_factory=list)
    damaged_lines: int = 0
    truncated: bool = False  # the file is larger than MAX_READ_BYTES: only its tail was read
    error: str | None = None  # the file itself could not be read (a link, a FIFO, an I/O error)


def _key(kind: str) -> str:
    if not _KIND.match(kind):
        raise ValueError(f"invalid record kind {kind!r}")
    return layout.join(RECORDS_DIRNAME, f"{kind}.jsonl")


def append(where: Backend | str | os.PathLike[str], kind: str, record: dict[str, Any]) -> bool:
    """Append ``record`` durably to ``records/<kind>.jsonl`` (``where``: the repository's
    backend, or its local root); False (with a warning) when it cannot be written."""
    key = _key(kind)
    line = canonical_json(record) + b"\n"
    try:
        backend_of(where).append(key, line)
    except (OSError, CkptvcsError) as err:
        warnings.warn(f"could not record this {kind} in {key}: {err}", RuntimeWarning, stacklevel=2)
        return False
    return True


def read(where: Backend | str | os.PathLike[str], kind: str, limit: int = MAX_READ_BYTES) -> RecordLog:
    """The records of ``kind`` (none when the file does not exist); never raises for bad content."""
    log = RecordLog(kind)
    key = _key(kind)
    try:
        data, log.truncated = _read_tail(backend_of(where), key, limit)
    except FileNotFoundError:
        return log
    except (OSError, CkptvcsError) as err:
        log.error = f"{key} is unreadable: {str(err)[:200]}"
        return log
    lines = data.split(b"\n")
    if log.truncated:
        lines = lines[1:]  # the first line was cut by the limit
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        lines.pop()  # a torn last line (a crash mid-append): not damage, not a record
    for raw in lines:
        record = _parse(raw)
        if record is None:
            log.damaged_lines += 1
        else:
            log.records.append(record)
    return log


def _read_tail(backend: Backend, key: str, limit: int) -> tuple[bytes, bool]:
    """The last ``limit`` bytes of ``key`` by ranged reads (the backend refuses links and FIFOs)."""
    reader = backend.open_reader(key)
    try:
        size = reader.size
        start = max(0, size - limit)
        parts = []
        offset = start
        while offset < size:
            block = reader.read(offset, min(1 << 20, size - offset))
            if not block:
                break
            parts.append(block)
            offset += len(block)
        return b"".join(parts), start > 0
    finally:
        reader.close()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or json_depth_exceeds(record, _MAX_DEPTH):
        return None
    return record


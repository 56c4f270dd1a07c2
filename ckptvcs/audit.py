"""The audit log: an append-only, hash-chained record of security-relevant events.

``audit/log.jsonl`` holds one event per line, each line the canonical JSON of
``{"seq", "time", "who", "event", "data", "prev"}``: ``seq`` counts from 0, ``prev`` is
the BLAKE3 (hex) of the previous line's bytes (its newline excluded; 64 zeros for the
first line). Editing, inserting or removing a line breaks the chain at the next line;
``audit/head.json`` (``{"seq", "hash"}`` of the last line, rewritten atomically after
each append) exposes a truncated tail. Each line is appended through the repository's
backend (locally one ``write`` and an fsync) under its advisory lock ``audit/lock``, so
concurrent writers chain in turn; a backend without locks (an object store) replaces
the log by compare-and-swap instead, with the same effect.

A crash mid-append leaves a torn last line: the next append starts on a new line and
names the fragment's BLAKE3 in ``torn``, so the check can tell a crash from an edit.
The chain detects accidents and edits by anyone who does not rewrite the whole log;
docs/audit.md says what it does not detect (a writer recomputing every hash) and how
an external copy of the head closes that gap.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from . import _fs, layout
from .backends import Backend, ConcurrentUpdate, backend_of
from .errors import AuditLogDamagedError, CkptvcsError, CorruptObjectError, LockTimeoutError
from .refs import ZERO_ID, Refs

__all__ = ["AuditLog", "AuditEvent", "AuditCheck", "AUDIT_DIR", "ZERO_HASH", "REF_EVENT", "REFS_LOG_NAME",
           "check_audit"]

AUDIT_DIR = layout.AUDIT
LOG_NAME = "log.jsonl"
HEAD_NAME = "head.json"
LOCK_NAME = "lock"
ZERO_HASH = "0" * 64
MAX_LINE = 16 << 10  # one event's line; longer data is cut (the "data" values are small)
MAX_LOG = 256 << 20  # what a reader reads of a hostile log
_MAX_HEAD = 4096
_LOCK_TIMEOUT = 30.0
_FIELDS = ("seq", "time", "who", "event", "data", "prev")
REFS_LOG_NAME = "refs.jsonl"
REF_EVENT = "ref.update"
"""The event of a ref move: data ``{"ref", "old", "new", "why"}`` (ids; 64 zeros for none)."""


@dataclass(frozen=True)
class AuditEvent:
    """One audit line: ``event`` (e.g. ``tag.sign``) by ``who`` at ``time`` (UTC ISO 8601) with ``data``."""

    seq: int
    time: str
    who: str
    event: str
    data: dict[str, Any]
    prev: str
    hash: str  # BLAKE3 of this line: the next line's ``prev``

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "who": self.who, "event": self.event, "data": self.data,
                "prev": self.prev, "hash": self.hash}


@dataclass
class AuditCheck:
    """The verdict of :meth:`AuditLog.check`: ``problems`` (empty: the chain holds), the number of
    ``events``, the ``head`` hash (record it elsewhere to detect a rewrite of the whole log) and
    ``notes`` that are not damage (a torn last line from a crash)."""

    events: int = 0
    head: str = ZERO_HASH
    ref_events: int = 0  # of the ref log (check_audit)
    ref_head: str = ZERO_HASH
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _line_hash(line: bytes) -> str:
    return blake3.blake3(line).hexdigest()


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class AuditLog:
    """The audit log of a repository: ``where`` is its backend (or, as before the seam, its root)."""

    def __init__(self, where: Backend | str | os.PathLike[str], name: str = LOG_NAME,
                 head: str | None = HEAD_NAME) -> None:
        self.backend = backend_of(where)
        self.key = layout.join(AUDIT_DIR, name)
        # None (the ref log): no head record; the refs themselves vouch for its tail (check(refs)).
        self.head_key = layout.join(AUDIT_DIR, head) if head is not None else None
        self.lock_key = layout.join(AUDIT_DIR, LOCK_NAME)

    @classmethod
    def of_refs(cls, where: Backend | str | os.PathLike[str]) -> AuditLog:
        """The ref log, ``audit/refs.jsonl``: one ``ref.update`` event per ref move."""
        return cls(where, REFS_LOG_NAME, None)

    # -- writing ---------------------------------------------------------------------

    def append(self, event: str, who: str, data: dict[str, Any]) -> AuditEvent:
        """Append one event durably and chain it to the last line; returns it.

        Where the backend has advisory locks, under ``audit/lock`` with a native append;
        elsewhere (object stores) the new log replaces the old by compare-and-swap, so
        of two concurrent writers one re-reads the tail and chains after the other.

        Raises AuditLogDamagedError when the last complete line does not parse (the
        chain cannot continue from it: ``ckptvcs audit --check`` says where).
        """
        with _fs.storage_errors("appending to the audit log"):
            if self.backend.capabilities.advisory_locks:
                with self._locked():
                    record, line, torn_end = self._next(event, who, data, self._reader_tail())
                    self.backend.append(self.key, (b"\n" if torn_end else b"") + line + b"\n")
                    digest = self._write_head(record, line)
            else:
                while True:
                    try:
                        current: bytes | None = self.backend.get(self.key, max_size=MAX_LOG)
                    except FileNotFoundError:
                        current = None
                    old = current or b""
                    torn_end = old[-1:] not in (b"", b"\n")
                    record, line, torn_end = self._next(event, who, data, (_BytesReader(old), torn_end))
                    new = old + (b"\n" if torn_end else b"") + line + b"\n"
                    try:
                        self.backend.compare_and_swap(self.key, current, new)
                    except ConcurrentUpdate:
                        continue  # another writer appended: chain after its line
                    digest = self._write_head(record, line)
                    break
        return AuditEvent(record["seq"], record["time"], who, event, record["data"], record["prev"], digest)

    def _write_head(self, record: dict[str, Any], line: bytes) -> str:
        digest = _line_hash(line)
        if self.head_key is not None:  # the ref log has no head record (see __init__)
            self.backend.put(self.head_key, _encode({"seq": record["seq"], "hash": digest}) + b"\n")
        return digest

    def _next(self, event: str, who: str, data: dict[str, Any],
              tail: tuple[_Reader | None, bool]) -> tuple[dict[str, Any], bytes, bool]:
        """The next event's record and line after the log that ``tail`` reads (a reader, None
        when there is no log, and whether the log's last byte is not a newline)."""
        reader, torn_end = tail
        try:
            seq, prev, torn = _tail(reader)
        finally:
            if reader is not None:
                reader.close()
        record: dict[str, Any] = {"seq": seq, "time": _utc_now(), "who": who, "event": event, "data": data,
                                  "prev": prev}
        if torn:
            record["torn"] = torn
        line = _encode(record)
        if len(line) > MAX_LINE:
            record["data"] = {"truncated": True, "summary": json.dumps(data)[: MAX_LINE // 2]}
            line = _encode(record)
        return record, line, torn_end

    def _reader_tail(self) -> tuple[_Reader | None, bool]:
        """A reader of the log (None: no log yet) and whether its last byte is not a newline."""
        try:
            reader = self.backend.open_reader(self.key)
        except FileNotFoundError:
            return None, False
        size = reader.size
        return reader, size > 0 and reader.read(size - 1, 1) != b"\n"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            lock = self.backend.lock(self.lock_key, exclusive=True, timeout=_LOCK_TIMEOUT)
            lock.__enter__()
        except LockTimeoutError:
            raise LockTimeoutError(f"another process held the audit log's lock for {_LOCK_TIMEOUT:.0f} s") from None
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    # -- reading ---------------------------------------------------------------------

    def _read(self) -> bytes:
        try:
            return self.backend.get(self.key, max_size=MAX_LOG)
        except FileNotFoundError:
            return b""
        except CorruptObjectError as err:
            raise AuditLogDamagedError(f"the audit log cannot be read: {err}", path=f"{AUDIT_DIR}/{LOG_NAME}") from None

    def events(self) -> Iterator[AuditEvent]:
        """Every event that parses, oldest first (use :meth:`check` to trust the chain)."""
        for line in self._read().split(b"\n"):
            event = _parse(line)
            if event is not None:
                yield event

    def check(self, refs: Refs | None = None, parents: Callable[[str], Sequence[str]] | None = None) -> AuditCheck:
        """Walk the chain: every line parses, counts on, and names the previous line's hash;
        the head record matches; with ``refs``, every ref holds what its last logged move
        set. Returns the verdict (never raises for damage)."""
        result = AuditCheck()
        try:
            data = self._read()
        except AuditLogDamagedError as err:
            result.problems.append(str(err))
            return result
        lines = data.split(b"\n")
        fragment = lines.pop()
        expected_seq, prev = 0, ZERO_HASH
        hashes: list[str] = []
        last_moves: dict[str, AuditEvent] = {}
        pending: list[tuple[int, str]] = []  # lines that do not parse since the last event
        for number, line in enumerate(lines, 1):
            event = _parse(line)
            if event is None:
                pending.append((number, _line_hash(line)))
                continue
            named = _torn_of(line)
            if [h for _, h in pending] != (named or []):
                first = pending[0][0] if pending else number
                result.problems.append(
                    f"line {first} does not parse or is not in canonical form (edited)" if pending and not named else
                    f"line {number} names torn lines that are not the ones before it (lines were edited or removed)")
                return result
            if pending:
                result.notes.append(f"line{'s' if len(pending) > 1 else ''} {', '.join(str(n) for n, _ in pending)}: "
                                    "torn by a crash while appending; the next line names them and the chain continues")
            pending = []
            if event.seq != expected_seq or event.prev != prev:
                result.problems.append(
                    f"line {number} (seq {event.seq}) does not follow line {number - 1}: its prev hash or seq "
                    "does not match, so a line before it was edited, removed or inserted")
                return result
            prev = event.hash
            hashes.append(prev)
            if event.event == REF_EVENT and isinstance(event.data.get("ref"), str):
                last_moves[event.data["ref"]] = event
            expected_seq += 1
        if pending or fragment:
            result.notes.append("the last line is torn (a crash while appending); the next append skips it")
        result.events = expected_seq
        result.head = prev
        if self.head_key is not None:
            result.problems += self._check_head(hashes)
        if refs is not None:
            _check_refs(refs, last_moves, result, parents)
        return result

    def _check_head(self, hashes: list[str]) -> list[str]:
        assert self.head_key is not None
        try:
            head = json.loads(self.backend.get(self.head_key, max_size=_MAX_HEAD))
        except FileNotFoundError:
            if len(hashes) > 1:
                return [f"{AUDIT_DIR}/{HEAD_NAME} is missing while the log holds {len(hashes)} events"]
            return []
        except (OSError, ValueError, RecursionError, CorruptObjectError) as err:
            return [f"{AUDIT_DIR}/{HEAD_NAME} cannot be read: {str(err)[:120]}"]
        seq = head.get("seq") if isinstance(head, dict) else None
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            return [f"{AUDIT_DIR}/{HEAD_NAME} is malformed"]
        if seq >= len(hashes):
            return [f"the audit log was truncated: {AUDIT_DIR}/{HEAD_NAME} records event {seq}, "
                    f"the log ends at event {len(hashes) - 1}"]
        if hashes[seq] != head.get("hash"):
            return [f"event {seq} does not match the hash {AUDIT_DIR}/{HEAD_NAME} recorded for it (edited)"]
        if seq < len(hashes) - 2:
            return [f"{AUDIT_DIR}/{HEAD_NAME} records event {seq} while the log ends at {len(hashes) - 1} (rewound)"]
        return []  # the head may lag one event: a crash between the append and its write


class _Reader(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def close(self) -> None: ...


class _BytesReader:
    """The log's bytes, read like a backend's reader (the compare-and-swap path holds them whole)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]

    def close(self) -> None:
        pass


def _tail(reader: _Reader | None) -> tuple[int, str, list[str] | None]:
    """``(next seq, hash of the last event line, hashes of the torn lines after it or None)``.

    Torn lines are what crashes mid-append left after the last event: the fragments
    of lines that never completed (each later append started on a new line).
    """
    if reader is None:
        return 0, ZERO_HASH, None
    size = reader.size
    window = 4 * (MAX_LINE + 1)
    while True:
        start = max(0, size - window)
        lines = _read_all(reader, start, size - start).split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first piece may be the end of an earlier line
        torn: list[bytes] = []
        while lines and _parse(lines[-1]) is None:
            piece = lines.pop()
            if piece or not lines:  # the empty piece after the final newline is no line
                torn.insert(0, piece)
        torn = [t for t in torn if t]
        if lines or start == 0 or window >= MAX_LOG:
            break
        window *= 4
    hashes = [_line_hash(t) for t in torn] or None
    if not lines:
        if start > 0:
            raise AuditLogDamagedError("no event line in the audit log's last part; run `ckptvcs audit --check`",
                                       path=f"{AUDIT_DIR}/{LOG_NAME}")
        return 0, ZERO_HASH, hashes
    last = _parse(lines[-1])
    assert last is not None
    return last.seq + 1, last.hash, hashes


def _read_all(reader: _Reader, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``, read on until the object ends (a ranged read may return fewer)."""
    parts = []
    while size > 0:
        block = reader.read(offset, size)
        if not block:
            break
        parts.append(block)
        offset += len(block)
        size -= len(block)
    return b"".join(parts)


def check_audit(where: Backend | str | os.PathLike[str], refs: Refs,
                parents: Callable[[str], Sequence[str]] | None = None) -> AuditCheck:
    """Both chains: the event log's verdict (``events``, ``head``) with the ref log's problems and
    notes added (prefixed ``audit/refs.jsonl``), and ``ref_events`` counted. ``parents(commit id)``
    (the repository's commit reader) lets a commit whose logs failed to append pass as a note."""
    result = AuditLog(where).check()
    moves = AuditLog.of_refs(where).check(refs, parents)
    where = f"{AUDIT_DIR}/{REFS_LOG_NAME}"
    result.problems += [f"{where}: {p}" for p in moves.problems]
    result.notes += [f"{where}: {n}" for n in moves.notes]
    result.ref_events = moves.events
    result.ref_head = moves.head
    return result


def _check_refs(refs: Refs, last_moves: dict[str, AuditEvent], result: AuditCheck,
                parents: Callable[[str], Sequence[str]] | None) -> None:
    """Each branch and tag with a logged move holds the id its last logged move set.

    A ref moved outside ckptvcs to a commit that does not lead back to the logged one (a
    rewind, a jump elsewhere, a deletion) fails here. Moves missing at the end are a note, not
    damage, when they are what crashes or failed writes after ref updates leave: the ref's
    reflog, or where its lines are missing too the first parents of its commits, lead from
    the ref's value back to the logged one. Refs with no logged move (made before ckptvcs
    logged ref moves) are not checked.
    """
    for ref, event in sorted(last_moves.items()):
        if not ref.startswith("refs/"):
            continue  # HEAD follows a branch: its moves are logged, its value is the branch's
        try:
            current = refs.read_raw(ref) or ZERO_ID
            if current == event.data.get("new"):
                continue
            missing = _unlogged_moves(refs, ref, current, event.data.get("new"), parents)
        except (CkptvcsError, ValueError):
            continue  # a damaged ref or reflog: fsck names it on its own
        if missing:
            result.notes.append(f"{ref}: its last {missing} move{'s' if missing > 1 else ''} (to {current[:12]}) "
                                f"{'are' if missing > 1 else 'is'} in its reflog or history but not in the audit log "
                                "(a crash or failed write between a ref update and its audit line)")
            continue
        result.problems.append(
            f"{ref} holds {_short(current)} but its last logged move (event {event.seq}) set {_short(event.data.get('new'))}:"
            " the ref was changed outside ckptvcs, or the audit log's last moves were removed")


def _unlogged_moves(refs: Refs, ref: str, current: str, logged: Any,
                    parents: Callable[[str], Sequence[str]] | None, limit: int = 1000) -> int:
    """How many moves lead from ``logged`` to ``current`` (0: none found).

    Steps back from ``current`` along the reflog (newest first), or, where the reflog line
    is missing too (its write failed after the ref update), from a commit to its first
    parent.
    """
    entries = list(itertools.islice(refs.reflog(ref), limit))
    value, i = current, 0
    for steps in range(limit):
        if value == logged:
            return steps
        if i < len(entries) and entries[i].new == value:
            value, i = entries[i].old, i + 1
            continue
        try:
            first = parents(value)[:1] if parents is not None and value != ZERO_ID else ()
        except (CkptvcsError, ValueError):
            first = ()
        if not first:
            return 0
        value = first[0]
    return 0


def _short(value: Any) -> str:
    return "nothing" if value == ZERO_ID else str(value)[:12]


def _torn_of(line: bytes) -> list[str] | None:
    """The ``torn`` field of an event line: the hashes of the torn lines just before it."""
    try:
        value = json.loads(line).get("torn")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _parse(line: bytes) -> AuditEvent | None:
    """The event a line holds, or None when it is not a canonical, well-formed event line."""
    if not line or len(line) > MAX_LINE:
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in _FIELDS) or _encode(record) != line:
        return None
    seq, data = record["seq"], record["data"]
    strings = all(isinstance(record[k], str) for k in ("time", "who", "event", "prev"))
    if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(data, dict) or not strings:
        return None
    return AuditEvent(seq, record["time"], record["who"], record["event"], data, record["prev"], _line_hash(line))

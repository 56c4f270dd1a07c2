"""Refs: branches, tags, HEAD and the reflog, updated only by compare-and-swap.

A ref is a small file (``refs/heads/<name>``, ``refs/tags/<name>``, ``HEAD``) holding
a hex id or, for HEAD, ``ref: refs/heads/<branch>``. Every update takes the ref's lock
file, re-reads the current value under it, and proceeds only if that value is the one
the caller expected (``set_if_equals``): a writer that lost the race gets
RefConflictError and nothing is overwritten. The rename of the lock file over the ref
is the single commit point of every operation.

Every read and write goes through the storage backend (``ckptvcs.backends``): a ref
update is the backend's ``compare_and_swap`` (locally the lock file and rename above; on
an object store a conditional put), a reflog line is its ``append``. Only the hygiene of
folders (empty ref folders, a deleted ref's log in the way of a new one) is local-only:
keys on an object store have no folders to clash.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from . import _fs, layout
from .backends import Backend, ConcurrentUpdate, LocalBackend, append_many
from .errors import CorruptObjectError, InvalidRefNameError, RefConflictError

__all__ = ["Refs", "ReflogEntry", "check_ref_name", "is_valid_ref", "ZERO_ID", "HEAD"]

HEAD = "HEAD"
ZERO_ID = "0" * 64
_SYMREF_PREFIX = "ref: "
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_ref_name(name: str, what: str = "ref") -> str:
    """Validate a branch or tag name by git's rules; returns it or raises InvalidRefNameError."""
    problem = None
    if not name:
        problem = "it is empty"
    elif len(name.encode()) > 200:
        problem = "it is longer than 200 bytes"
    elif _BAD_CHARS.search(name):
        problem = "it contains a space, control character or one of ~ ^ : ? * [ \\"
    elif name.startswith("-"):
        problem = "it starts with '-'"
    elif ".." in name or "@{" in name or "//" in name:
        problem = "it contains '..', '@{' or '//'"
    elif name == "@" or name == HEAD:
        problem = f"'{name}' is reserved"
    elif name.endswith((".", "/", ".lock")) or name.startswith("/"):
        problem = "it starts with '/' or ends with '.', '/' or '.lock'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")):
        problem = "a path component starts with '.' or ends with '.lock'"
    if problem:
        raise InvalidRefNameError(f"invalid {what} name {name!r}: {problem}")
    return name


_MAX_REF_FILE = 4096  # a ref holds 65 bytes, or "ref: " and a name of at most 200 bytes
# One complete reflog line (docs/format.md section 7): old id, new id, time ns, who TAB message.
REFLOG_LINE = re.compile(r"^[0-9a-f]{64} [0-9a-f]{64} [0-9]+ [^\t]*\t[^\t]*$")
# A deleted ref's reflog set aside by Refs.set_aside_stale_logs: <time ns>-<ref, %-quoted>.
_DELETED_LOG = re.compile(r"^deleted/[0-9]+-[A-Za-z0-9._~%-]+$")


def is_valid_ref(ref: str) -> bool:
    """Whether ``ref`` is ``HEAD`` or ``refs/<name>`` with a name :func:`check_ref_name` accepts.

    Every ref path the repository reads or writes passes this check, so no ref name
    (and no ``ref: ...`` value of HEAD) can lead outside ``refs/``.
    """
    if ref == HEAD:
        return True
    if not isinstance(ref, str) or not ref.startswith("refs/"):
        return False
    try:
        check_ref_name(ref[len("refs/"):])
    except InvalidRefNameError:
        return False
    return True


@dataclass(frozen=True)
class ReflogEntry:
    """One ref movement: from ``old`` to ``new`` (ZERO_ID for none)."""

    ref: str
    old: str
    new: str
    time_ns: int
    who: str
    message: str


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").splitlines())


class Refs:
    """The refs of one repository, stored through a backend (a directory path: local)."""

    def __init__(self, backend: Backend | Path, lock_timeout: float = 30.0) -> None:
        self.backend: Backend = LocalBackend(backend) if isinstance(backend, Path) else backend
        self.root = self.backend.local_root()  # None: not a local directory
        self.lock_timeout = lock_timeout
        # Called as on_move(ref, old id, new id, who, why) after each move's reflog line is durable
        # (the Repo records it in the audit log); ZERO_ID stands for "no value".
        self.on_move: Callable[[str, str, str, str, str], None] | None = None

    @property
    def lock_timeout(self) -> float:
        """How long an update waits for a ref lock held by a live process (local backends)."""
        return float(getattr(self.backend, "cas_timeout", self._lock_timeout))

    @lock_timeout.setter
    def lock_timeout(self, value: float) -> None:
        self._lock_timeout = value
        if hasattr(self.backend, "cas_timeout"):
            self.backend.cas_timeout = value

    def _key(self, ref: str) -> str:
        """The key of ``ref``: ``HEAD`` or ``refs/<valid name>``, never anything outside the store."""
        if not is_valid_ref(ref):
            raise InvalidRefNameError(f"invalid ref {ref[:200]!r}: a ref is HEAD or refs/<name> by the ref-name rules")
        return layout.ref_key(ref)

    def _path(self, ref: str) -> Path:
        """The file of ``ref`` in a local store."""
        assert self.root is not None, "a ref file exists only in a local store"
        return self.root / self._key(ref)

    # -- reading ---------------------------------------------------------------

    def read_raw(self, ref: str) -> str | None:
        """The stored value: a hex id, ``ref: <target>`` for a symbolic ref, or None."""
        return self._parse(ref, self._read_bytes(ref))

    def _read_bytes(self, ref: str) -> bytes | None:
        """The stored bytes of ``ref`` (None: absent, or a folder of refs such as refs/heads/a/...)."""
        key = self._key(ref)
        with _fs.storage_errors(f"reading {ref}"):
            try:
                if self.backend.size(key) is None:
                    return None
                return self.backend.get(key, max_size=_MAX_REF_FILE)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            except CorruptObjectError as err:
                raise CorruptObjectError(f"ref {ref} is damaged: {err}", path=key) from None

    def _parse(self, ref: str, data: bytes | None) -> str | None:
        """A ref's value from its stored bytes; damage raises CorruptObjectError naming it."""
        if data is None:
            return None
        path = self._key(ref)
        try:
            value = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorruptObjectError(f"ref {ref} is damaged: it is not UTF-8 text", path=path) from None
        if _HEX_ID.match(value):
            return value
        if value.startswith(_SYMREF_PREFIX) and is_valid_ref(value[len(_SYMREF_PREFIX):]):
            if value[len(_SYMREF_PREFIX):] != HEAD:
                return value
        raise CorruptObjectError(f"ref {ref} is damaged: {value[:80]!r}", path=path)

    def symbolic_target(self, ref: str) -> str | None:
        value = self.read_raw(ref)
        if value is not None and value.startswith(_SYMREF_PREFIX):
            return value[len(_SYMREF_PREFIX):]
        return None

    def follow(self, ref: str) -> tuple[str, str | None]:
        """``(final ref name, id or None)`` after following symbolic refs."""
        for _ in range(5):
            value = self.read_raw(ref)
            if value is None or not value.startswith(_SYMREF_PREFIX):
                return ref, value
            ref = value[len(_SYMREF_PREFIX):]
        raise CorruptObjectError(f"symbolic ref loop at {ref}")

    def names(self, namespace: str) -> list[str]:
        """Short names of the refs under ``refs/<namespace>/`` (``heads`` or ``tags``)."""
        base = layout.join(layout.REFS, namespace)
        found = []
        with _fs.storage_errors(f"listing {base}"):
            for key in self.backend.list(base):
                if key.endswith((".lock", ".tmp")):
                    continue
                if is_valid_ref(key):  # a stray file with an invalid name is no ref
                    found.append(key[len(base) + 1:])
        return sorted(found)

    # -- compare-and-swap updates ------------------------------------------------

    def set_if_equals(
        self, ref: str, expected: str | None, new: str, *, who: str, message: str, log: bool = True
    ) -> None:
        """Point ``ref`` at ``new`` only if it currently holds ``expected`` (None: absent).

        ``new`` is a hex id or ``ref: <target>``. Raises RefConflictError when the
        current value differs. The reflog records the move after it is durable (unless
        ``log`` is False: the caller logs it itself).
        """
        with _fs.storage_errors(f"updating {ref}"):
            current = self._swap(ref, expected, (new + "\n").encode())
            if current != expected:
                raise RefConflictError(
                    f"{ref} moved from {_short(expected)} to {_short(current)} while this operation ran; "
                    "nothing was overwritten, retry on top of the new value"
                )
            if log:
                self.log_move(ref, current, new, who=who, message=message)

    def _swap(self, ref: str, expected: str | None, new: bytes | None) -> str | None:
        """Store ``new`` (None: delete) if ``ref`` holds ``expected``; returns the value found.

        The backend compares stored bytes, the caller values: a lost swap whose new bytes
        still parse to ``expected`` (rewritten in another spelling) is retried on them.
        """
        key = self._key(ref)
        raw = self._read_bytes(ref)
        for _ in range(8):
            current = self._parse(ref, raw)
            if current != expected:
                return current
            try:
                self.backend.compare_and_swap(key, raw, new)
            except ConcurrentUpdate as lost:
                raw = lost.current
                continue
            return current
        return self._parse(ref, raw)

    def remove_if_equals(self, ref: str, expected: str, *, who: str, message: str) -> None:
        """Delete ``ref`` only if it holds ``expected``."""
        with _fs.storage_errors(f"deleting {ref}"):
            current = self._swap(ref, expected, None)
            if current != expected:
                raise RefConflictError(f"{ref} moved while it was being deleted; nothing was deleted")
        self.log_move(ref, current, None, who=who, message=message)
        if self.root is not None:
            self.prune_empty_folders(self._path(ref).parent)

    def prune_empty_folders(self, folder: Path) -> None:
        """Remove ``folder`` and its parents while empty, up to ``refs/<namespace>`` (as git does
        after deleting ``a/b``): an empty ``refs/heads/a/`` would otherwise block a branch ``a``.
        A folder another writer just filled (its ref or lock file) stays. Local stores only."""
        assert self.root is not None
        stop = {self.root / layout.REFS, self.root / layout.HEADS, self.root / layout.TAGS, self.root}
        while folder not in stop and self.root in folder.parents:
            try:
                os.rmdir(folder)
            except OSError:
                return  # not empty (or gone): leave it
            _fs.fsync_dir(folder.parent)
            folder = folder.parent

    # -- reflog ------------------------------------------------------------------

    def _log_key(self, ref: str) -> str:
        """The reflog key of ``ref``, or of a deleted ref's log set aside (``deleted/...``)."""
        if not _DELETED_LOG.match(ref):
            self._key(ref)  # validates the name
        return layout.reflog_key(ref)

    def log_move(self, ref: str, old: str | None, new: str | None, *, who: str, message: str) -> None:
        """Append a durable reflog line for a move of ``ref`` (no-op if nothing moved)."""
        self.log_moves([(ref, old, new)], who=who, message=message)

    def log_moves(self, moves: Sequence[tuple[str, str | None, str | None]], *, who: str, message: str) -> None:
        """:meth:`log_move` for several refs moved by one operation (a branch and the HEAD
        attached to it): their lines are made durable together (the backend's
        ``append_many``: locally every line written, then every file fsynced), then
        ``on_move`` is called for each, in order."""
        def as_id(value: str | None) -> str:
            return value if value and _HEX_ID.match(value) else ZERO_ID

        # Symbolic moves of HEAD (no id changes) are logged by the branch they point at.
        moved = [(ref, as_id(old), as_id(new)) for ref, old, new in moves if as_id(old) != as_id(new)]
        if not moved:
            return
        stamp = time.time_ns()
        lines = [(self._log_key(ref), f"{old} {new} {stamp} {_one_line(who)}\t{_one_line(message)}\n".encode())
                 for ref, old, new in moved]
        with _fs.storage_errors(f"appending to the reflog of {' and '.join(ref for ref, _, _ in moved)}"):
            append_many(self.backend, lines)
        if self.on_move is not None:
            for ref, old, new in moved:
                self.on_move(ref, old, new, _one_line(who), _one_line(message))

    def reflog(self, ref: str, *, strict: bool = False) -> Iterator[ReflogEntry]:
        """Entries newest first; a torn last line (crash mid-append) is skipped.

        Other lines that do not parse are skipped too, unless ``strict`` (gc, whose reflog
        grace must not silently lose an entry): then they raise CorruptObjectError.
        """
        path = self._log_key(ref)
        with _fs.storage_errors(f"reading the reflog of {ref}"):
            try:
                data = self.backend.get(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            except CorruptObjectError as err:
                raise CorruptObjectError(f"reflog of {ref} is damaged: {err}", path=path) from None
        lines = data.decode("utf-8", errors="replace").split("\n")
        if strict:
            bad = [n for n, line in enumerate(lines[:-1], 1) if not REFLOG_LINE.match(line)]
            if bad:
                raise CorruptObjectError(
                    f"reflog of {ref} is damaged: line {bad[0]} of {len(lines) - 1} does not parse"
                    + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                    path=path,
                )
        for line in reversed(lines):
            head, sep, message = line.partition("\t")
            parts = head.split(" ", 3)
            if not sep or len(parts) != 4 or not (_HEX_ID.match(parts[0]) and _HEX_ID.match(parts[1])):
                continue
            try:
                stamp = int(parts[2])
            except ValueError:
                continue
            yield ReflogEntry(ref, parts[0], parts[1], stamp, parts[3], message)

    def set_aside_stale_logs(self, ref: str) -> None:
        """Move deleted refs' reflogs that block ``ref``'s log path into ``logs/deleted/``.

        A deleted ref keeps its reflog (gc's grace needs it), so a new ref ``a/b`` may find
        the log file of a deleted ``a`` where its log directory must go, or ``a`` a folder
        of ``a/...`` logs. They move, whole, to ``logs/deleted/<time ns>-<quoted ref>``.
        Local stores only: object-store keys have no folders to clash.
        """
        if self.root is None:
            return
        logs = self.root / layout.LOGS
        path = self.root / self._log_key(ref)
        blockers = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        blockers += [logs / part for part in Path(ref).parents if part != Path(".") and (logs / part).is_file()]
        if not blockers:
            return
        aside = self.root / layout.DELETED_LOGS
        with _fs.storage_errors(f"setting aside the reflogs of deleted refs in the way of {ref}"):
            _fs.make_dirs(aside)
            for log in blockers:
                name = log.relative_to(logs).as_posix()
                if self.read_raw(name) is None:
                    os.rename(log, aside / f"{time.time_ns()}-{quote(name, safe='')}")
                    _fs.fsync_dir(log.parent)
            _fs.fsync_dir(aside)
            for folder in sorted((p for p in [path, *path.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only empty folders go

    def logged_refs(self) -> list[str]:
        """Every ref with a reflog, deleted refs included (their log outlives them)."""
        found = []
        with _fs.storage_errors("listing the reflogs"):
            for key in self.backend.list(layout.LOGS):
                name = key[len(layout.LOGS) + 1:]
                if is_valid_ref(name) or _DELETED_LOG.match(name):  # stray files are no reflog
                    found.append(name)
        return sorted(found)


def _short(value: str | None) -> str:
    if value is None:
        return "nothing"
    return value[:12] if _HEX_ID.match(value) else value

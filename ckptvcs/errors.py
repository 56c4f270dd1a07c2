"""Typed errors: one base class, one subclass per contract with the user.

Every error carries a one-line, actionable message and a stable exit code that the
CLI returns (borg-style): scripts can branch on the code, people read the line. Errors
about damaged data also carry what they name as fields (``IntegrityError.object_id``,
``chunk_id``, ``pack``, ...), so callers such as fsck decide from fields, never from the
message. docs/errors.md is generated from this module (scripts/errors_table.py).
"""

from __future__ import annotations

__all__ = [
    "CkptvcsError",
    "NotARepositoryError",
    "RepositoryExistsError",
    "UnsupportedFormatError",
    "RevisionNotFoundError",
    "AmbiguousRevisionError",
    "KeyNotFoundError",
    "InvalidRefNameError",
    "RefExistsError",
    "RefConflictError",
    "UnmergedBranchError",
    "UnsupportedValueError",
    "InvalidInputError",
    "UsageError",
    "StepOrderError",
    "PolicyConflictError",
    "IntegrityError",
    "CorruptObjectError",
    "LockTimeoutError",
    "ForkedRepoError",
    "StorageError",
    "CommitPrunedError",
    "CommitCollectedError",
    "AsyncSaveError",
    "ProtectedCommitError",
    "RepositoryDamagedError",
    "IndexMismatchError",
    "StagedDataCollectedError",
    "VerifyFailedError",
    "TagSignatureError",
    "UnsignedTagError",
    "UntrustedKeyError",
    "BadSignatureError",
    "ProtectedRefError",
    "AuditLogDamagedError",
    "NonFastForwardError",
    "RemoteNotFoundError",
    "StateChangedError",
]


class CkptvcsError(Exception):
    """Base of every error ckptvcs raises on purpose; ``exit_code`` is the CLI's."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotARepositoryError(CkptvcsError):
    """The path holds no ckptvcs repository."""

    exit_code = 3


class RepositoryExistsError(CkptvcsError):
    """``init`` was asked to create a repository where something already is."""

    exit_code = 3


class UnsupportedFormatError(CkptvcsError):
    """The repository was written by a newer (or unknown) format version."""

    exit_code = 4


class RevisionNotFoundError(CkptvcsError):
    """A revision (id, prefix, branch, tag, ``REV~N``) names nothing in the repository."""

    exit_code = 5


class AmbiguousRevisionError(RevisionNotFoundError):
    """An id prefix matches more than one object."""


class KeyNotFoundError(CkptvcsError, KeyError):
    """``load(keys=...)`` named a top-level entry the commit does not have."""

    exit_code = 5

    def __str__(self) -> str:
        return self.message


class InvalidRefNameError(CkptvcsError):
    """A branch or tag name breaks the ref-name rules (see docs/format.md)."""

    exit_code = 6


class RefExistsError(CkptvcsError):
    """A branch or tag of that name exists and ``force`` was not given."""

    exit_code = 6


class RefConflictError(CkptvcsError):
    """A compare-and-swap on a ref lost: the ref moved while the operation ran."""

    exit_code = 7


class NonFastForwardError(RefConflictError):
    """A push or pull would move a ref to a commit that does not contain its current one.

    The remote (or local) branch has commits the other side lacks: fetch, look, and push
    to a new branch, or push with ``force``. ``ref`` names it; ``current`` and ``proposed``
    are the commit ids (None: absent or unknown here).
    """

    def __init__(self, message: str, *, ref: str = "", current: str | None = None, proposed: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref
        self.current = current
        self.proposed = proposed


class UnmergedBranchError(CkptvcsError):
    """``delete_branch`` without ``force``: no other branch or tag contains the branch's commits.

    Deleting it would leave them to the reflog's grace and then to gc; ``force=True``
    (``ckptvcs branch -D``) deletes it anyway. ``branch`` and ``commit_id`` name it.
    """

    exit_code = 6

    def __init__(self, branch: str, commit_id: str, message: str) -> None:
        super().__init__(message)
        self.branch = branch
        self.commit_id = commit_id


class UnsupportedValueError(CkptvcsError):
    """A value in the state cannot be represented; ``path`` names where it sits."""

    exit_code = 8

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"cannot store value at {path or '<root>'}: {what}")
        self.path = path


class InvalidInputError(CkptvcsError):
    """An input file (.pt, .safetensors, config JSON) is unreadable or malformed."""

    exit_code = 9


class UsageError(InvalidInputError):
    """A library call or command got an argument value it does not accept (API misuse).

    The caller's mistake, not a bad file: a chunk size off the grid, a keyframe interval
    out of range, a step or metric of the wrong type. A subclass of InvalidInputError
    with the same exit code, so existing ``except InvalidInputError`` and scripts that
    branch on code 9 keep working.
    """


class RemoteNotFoundError(UsageError):
    """No remote of that name is configured (``ckptvcs remote -v`` lists them)."""


class StateChangedError(UsageError):
    """A tensor's bytes changed while a commit was reading them (the caller modified the
    state during ``commit``: e.g. a trainer thread stepping the optimizer meanwhile).

    Nothing was stored under a wrong id; the commit did not happen. ``chunk_id`` is the
    hex id the chunk's bytes had when they were first read. Commit again once the state
    is no longer being modified (or commit a copy, as the async saver does).
    """

    def __init__(self, message: str, chunk_id: str) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id


class StepOrderError(InvalidInputError):
    """A CheckpointManager was given a step lower than the last one saved on its branch.

    ``step`` is the refused step, ``last_step`` the branch's last saved step. A run that
    means to go back restores an earlier commit first (``mgr.restore(rev)``).
    """

    exit_code = 9

    def __init__(self, message: str, step: int, last_step: int) -> None:
        super().__init__(message)
        self.step = step
        self.last_step = last_step


class PolicyConflictError(InvalidInputError):
    """A CheckpointManager was given an explicit policy and a shorthand keyword of the same
    family (``save_policy=`` with ``every_steps=``, ``keep_policy=`` with ``keep_last=``, ...).

    ``family`` is ``"save"`` or ``"keep"``, ``keywords`` the shorthand keywords passed.
    """

    exit_code = 9

    def __init__(self, message: str, family: str, keywords: tuple[str, ...]) -> None:
        super().__init__(message)
        self.family = family
        self.keywords = keywords


class IntegrityError(CkptvcsError):
    """Stored bytes do not match their BLAKE3 id, or are missing: data is damaged.

    Fields name what is damaged, where known (None or empty otherwise): ``object_id``
    (hex id of a commit, manifest or tag object), ``chunk_id`` (hex id of the damaged
    chunk: in a delta chain, the level that failed), ``pack`` and ``offset`` (where
    that chunk's entry sits), ``commit_ids`` (commits that need it), ``path`` (the
    damaged file or ref, relative to the repository where possible).
    ``damaged_on_disk`` is True when the stored bytes themselves fail (they do not
    decompress or do not hash to their id), False when they verify but do not parse
    or are missing. ``problem`` is the finding about the named chunk or object alone,
    without the context that names it (e.g. ``"fails its BLAKE3 check"``).
    """

    exit_code = 10

    def __init__(
        self,
        message: str,
        *,
        object_id: str | None = None,
        chunk_id: str | None = None,
        pack: str | None = None,
        offset: int | None = None,
        commit_ids: tuple[str, ...] = (),
        path: str | None = None,
        damaged_on_disk: bool = False,
        problem: str | None = None,
    ) -> None:
        super().__init__(message)
        self.object_id = object_id
        self.chunk_id = chunk_id
        self.pack = pack
        self.offset = offset
        self.commit_ids = tuple(commit_ids)
        self.path = path
        self.damaged_on_disk = damaged_on_disk
        self.problem = problem


class CorruptObjectError(IntegrityError):
    """A stored object (commit, manifest, tag, pack entry) does not parse."""


class LockTimeoutError(CkptvcsError):
    """Another process holds a lock this operation needs, for longer than the timeout."""

    exit_code = 11


class ForkedRepoError(CkptvcsError):
    """A Repo handle was used in a process forked after it was opened."""

    exit_code = 12


class StorageError(CkptvcsError):
    """The operating system refused a write, read or sync (disk full, I/O error)."""

    exit_code = 13


class CommitPrunedError(CkptvcsError):
    """The commit was pruned by a retention rule: its history stays, its tensor data is gone.

    ``rule`` names the rule that pruned it (e.g. ``keep_last=3``); ``commit_id`` the commit.
    """

    exit_code = 14

    def __init__(self, commit_id: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.commit_id = commit_id
        self.rule = rule


class CommitCollectedError(CommitPrunedError):
    """gc collected the commit's tensor data: no ref or recent reflog entry kept it.

    A state, not damage (``fsck`` stays clean): the history and metadata remain, the
    tensor data is gone for good. ``rule`` is ``"gc"``. Same exit code as a pruned commit.
    """


class AsyncSaveError(CkptvcsError):
    """A background save of a CheckpointManager failed; ``__cause__`` holds the original error.

    Raised at the manager call that follows the failure (or at ``wait()``/``close()``).
    When the commit itself failed, the ref did not move; a failure in tagging or
    retention happens after the commit is durable.
    """

    exit_code = 15


class ProtectedCommitError(CkptvcsError):
    """A commit that a branch, tag or HEAD points at cannot be pruned."""

    exit_code = 16


class RepositoryDamagedError(IntegrityError):
    """``fsck`` found damage (missing, corrupt or mismatching data); the findings say where."""


class IndexMismatchError(IntegrityError):
    """The chunk index disagrees with the packs about a chunk a kept commit needs.

    gc refuses to delete anything then (the index is derived data and may be damaged);
    ``ckptvcs repair index`` rebuilds it from the packs.
    """


class StagedDataCollectedError(CkptvcsError):
    """``publish`` was given a staged state whose data gc collected (its grace expired).

    A state, not damage: nothing was published and no ref moved. Stage the state again.
    ``manifest_id`` names the staged manifest. Same exit code as a collected commit.
    """

    exit_code = 14

    def __init__(self, manifest_id: str, message: str) -> None:
        super().__init__(message)
        self.manifest_id = manifest_id


class VerifyFailedError(CkptvcsError):
    """``verify`` could not restore a commit in a fresh process, or its check failed.

    The failure is recorded (``verified/<commit id>``, docs/audit.md) before this is
    raised. ``commit_id`` names the commit, ``record`` is the recorded verification
    (``ok`` False, ``error``), ``chunk_id`` the damaged chunk when the data failed its
    BLAKE3 check (None otherwise).
    """

    exit_code = 17

    def __init__(self, message: str, commit_id: str, record: dict[str, object], chunk_id: str | None = None) -> None:
        super().__init__(message)
        self.commit_id = commit_id
        self.record = record
        self.chunk_id = chunk_id


class TagSignatureError(CkptvcsError):
    """A signed-tag check failed; the subclasses say how. ``tag`` names the tag."""

    exit_code = 18

    def __init__(self, message: str, tag: str) -> None:
        super().__init__(message)
        self.tag = tag


class UnsignedTagError(TagSignatureError):
    """``verify_tag`` on a tag that carries no signature (a plain annotated tag)."""


class UntrustedKeyError(TagSignatureError):
    """The tag is signed, but by a key that is not among the trusted keys given (or in ``keys/``)."""


class BadSignatureError(TagSignatureError):
    """The tag's signature does not verify with the key it names: the tag object was altered
    (or forged) after signing. Same exit code as the other signature errors."""


class ProtectedRefError(CkptvcsError):
    """Deleting or force-moving a ref that matches a protected pattern (``ckptvcs protect``).

    ``ref`` is the full ref name, ``pattern`` the protection that matched. An explicit
    override (``override_protection=True``, ``--override-protection``) does it anyway
    and is recorded in the reflog and the audit log.
    """

    exit_code = 16

    def __init__(self, message: str, ref: str, pattern: str) -> None:
        super().__init__(message)
        self.ref = ref
        self.pattern = pattern


class AuditLogDamagedError(IntegrityError):
    """The audit log's hash chain is broken: a line was edited, removed or inserted, or its
    tail was truncated (``ckptvcs audit --check`` names the first bad line)."""

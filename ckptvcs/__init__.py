"""ckptvcs: content-addressed, git-like version control for model training checkpoints.

The public API is what this module exports; everything else is internal and may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from . import remotes as remotes  # registers the lazy-clone chunk source with Repo
from ._lazy import lazy_attributes
from .diff import DiffEntry, DiffStat
from .errors import (
    AmbiguousRevisionError,
    AsyncSaveError,
    AuditLogDamagedError,
    BadSignatureError,
    CkptvcsError,
    CommitCollectedError,
    CommitPrunedError,
    CorruptObjectError,
    ForkedRepoError,
    IndexMismatchError,
    IntegrityError,
    InvalidInputError,
    InvalidRefNameError,
    KeyNotFoundError,
    LockTimeoutError,
    NonFastForwardError,
    NotARepositoryError,
    PolicyConflictError,
    ProtectedCommitError,
    ProtectedRefError,
    RefConflictError,
    RefExistsError,
    RemoteNotFoundError,
    RepositoryDamagedError,
    RepositoryExistsError,
    RevisionNotFoundError,
    StagedDataCollectedError,
    StateChangedError,
    StepOrderError,
    StorageError,
    TagSignatureError,
    UnmergedBranchError,
    UnsignedTagError,
    UnsupportedFormatError,
    UnsupportedValueError,
    UntrustedKeyError,
    UsageError,
    VerifyFailedError,
)
from .fsck import Finding, FsckReport
from .gc import GcReport
from .objects import Commit, Tag
from .refs import ReflogEntry
from .repair import RepairReport
from .repo import Repo, RepoStats, Staged
from .reuse import ReuseHint, ReuseOutcome
from .training.retention import RetentionPolicy

if TYPE_CHECKING:
    from .training.manager import CheckpointManager

# Names whose module imports torch at import time: loaded on first use (PEP 562), so
# `import ckptvcs` and the CLI's history commands start without torch.
_POLICIES = ("SaveContext", "EverySteps", "EverySeconds", "OnImprovement", "AtSteps", "AnySave",
             "KeepLast", "KeepBest", "KeepEverySteps", "KeepMaxAge", "AnyKeep", "AllKeep")
_LAZY = {"CheckpointManager": "training.manager", **{name: "training.policies" for name in _POLICIES}}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = [
    "__version__",
    "Repo",
    "RepoStats",
    "ReuseHint",
    "ReuseOutcome",
    "CheckpointManager",
    "RetentionPolicy",
    "GcReport",
    "Commit",
    "Tag",
    "ReflogEntry",
    "DiffEntry",
    "DiffStat",
    "Finding",
    "FsckReport",
    "RepairReport",
    "CkptvcsError",
    "AmbiguousRevisionError",
    "CorruptObjectError",
    "ForkedRepoError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidRefNameError",
    "KeyNotFoundError",
    "LockTimeoutError",
    "NotARepositoryError",
    "RefConflictError",
    "RefExistsError",
    "UnmergedBranchError",
    "RepositoryDamagedError",
    "RepositoryExistsError",
    "RevisionNotFoundError",
    "StateChangedError",
    "StepOrderError",
    "PolicyConflictError",
    "StorageError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "CommitPrunedError",
    "CommitCollectedError",
    "AsyncSaveError",
    "ProtectedCommitError",
    "IndexMismatchError",
    "StagedDataCollectedError",
    "NonFastForwardError",
    "RemoteNotFoundError",
    "Staged",
    "UsageError",
    "VerifyFailedError",
    "TagSignatureError",
    "UnsignedTagError",
    "UntrustedKeyError",
    "BadSignatureError",
    "ProtectedRefError",
    "AuditLogDamagedError",
    *_POLICIES,
]

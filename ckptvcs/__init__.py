"""ckptvcs: content-addressed, git-like version control for model training checkpoints.

The public API is what this module exports; everything else is internal and may change.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .diff import DiffEntry
from .fsck import Finding, FsckReport
from .errors import (
    AmbiguousRevisionError,
    AsyncSaveError,
    CkptvcsError,
    CommitPrunedError,
    CorruptObjectError,
    ForkedRepoError,
    IndexMismatchError,
    IntegrityError,
    InvalidInputError,
    InvalidRefNameError,
    KeyNotFoundError,
    LockTimeoutError,
    NotARepositoryError,
    ProtectedCommitError,
    RefConflictError,
    RefExistsError,
    RepositoryDamagedError,
    RepositoryExistsError,
    RevisionNotFoundError,
    StorageError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from .gc import GcReport
from .manager import CheckpointManager
from .objects import Commit, Tag
from .refs import ReflogEntry
from .repair import RepairReport
from .repo import Repo, RepoStats
from .retention import RetentionPolicy

__all__ = [
    "__version__",
    "Repo",
    "RepoStats",
    "CheckpointManager",
    "RetentionPolicy",
    "GcReport",
    "Commit",
    "Tag",
    "ReflogEntry",
    "DiffEntry",
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
    "RepositoryDamagedError",
    "RepositoryExistsError",
    "RevisionNotFoundError",
    "StorageError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "CommitPrunedError",
    "AsyncSaveError",
    "ProtectedCommitError",
    "IndexMismatchError",
]

"""Repo: the public library API, and the one place that sequences durable writes.

Write order of a commit (docs/format.md, "Write order"): chunks into packs → seal
packs (fsync, rename, fsync dir) → index → manifest and commit objects → ref
compare-and-swap (the commit point) → reflog. A crash anywhere before the ref update
leaves only unreferenced garbage; after it, a complete commit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import _fs, catalog, commit_records, components, delta, history, layout, provenance, records, revisions, stats_cache, trust
from . import verify as verification
from ._gcpause import paused as _gc_paused
from ._gcpause import small_items as _small_items
from ._lazy import LazyModule
from ._validate import check_chunk_size as _check_chunk_size
from ._validate import check_keyframe_interval as _check_keyframe_interval
from ._validate import refuse_url as _refuse_url
from ._validate import require_str as _require_str
from .audit import REF_EVENT, AuditCheck, AuditEvent, AuditLog
from .audit import check_audit as _check_audit_logs
from .backends import Backend, LocalBackend
from .catalog_cache import Summaries as CommitSummaries
from .catalog_cache import Summary as CommitSummary
from .catalog_cache import drop as drop_commit_summaries
from .catalog_cache import summary_of
from .diff import DiffEntry, DiffStat, diff_manifests, stat_manifests
from .errors import (
    AuditLogDamagedError,
    CkptvcsError,
    CommitCollectedError,
    CommitPrunedError,
    CorruptObjectError,
    ForkedRepoError,
    IntegrityError,
    InvalidInputError,
    KeyNotFoundError,
    LockTimeoutError,
    NotARepositoryError,
    ProtectedCommitError,
    RefExistsError,
    RepositoryDamagedError,
    RepositoryExistsError,
    RevisionNotFoundError,
    StagedDataCollectedError,
    StorageError,
    UnmergedBranchError,
    UnsupportedFormatError,
    UsageError,
)
from .expiry import DEFAULT_REFLOG_EXPIRE, parse_expiry
from .fsck import FsckProgress, FsckReport, check_repository
from .gc import COLLECTED_RULE, GcReport, collect_garbage
from .hugepages import advise_huge_pages
from .index_cache import discard_index, is_temporary, open_cache
from .metadata import commit_body as _commit_body
from .objects import Commit, Manifest, ObjectStore, PreparedObject, Tag, canonical_json
from .pack import pack_names
from .refs import HEAD, ZERO_ID, ReflogEntry, Refs, check_ref_name, is_valid_ref
from .repack import RepackReport
from .repair import RepairReport, rebuild_index
from .reuse import ReuseHint
from .reuse import prepare as prepare_reuse
from .signing import sign_tag
from .state import MapLocation, blob_kinds, decode_state, dict_items_shifted, encode_state, iter_tensors, select_keys
from .store import DEFAULT_KEYFRAME_INTERVAL, BlobRead, ChunkStore, Progress

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # loads and commits need it; history, refs, gc and fsck do not

__all__ = [
    "Repo", "RepoStats", "Staged", "Manifest", "GcReport", "FORMAT_VERSION", "DEFAULT_CHUNK_SIZE", "DEFAULT_KEYFRAME_INTERVAL",
    "STORE_DIRNAME",
]

FORMAT_NAME = "ckptvcs"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20
STORE_DIRNAME = ".ckptvcs"
DEFAULT_BRANCH = "main"
FSCK_RECORD = layout.FSCK_RECORD
GITIGNORE = b"# created by ckptvcs: git ignores this whole repository\n*\n"
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_MAX_RECORD_SIZE = 1 << 20  # config.json and pruned records: small JSON files
# The store's own entries: none may be a symbolic link (docs/format.md, "Symbolic links").
_LAYOUT = layout.TOP_LEVEL
STAGED_DIRNAME = layout.STAGED
DEFAULT_STAGED_EXPIRE = "1.day"


class _ParentOfBranch:
    """The default parent of a stage (and expected value of a publish): what commit would use."""

    def __repr__(self) -> str:
        return "<the commit the branch points at>"


_PARENT_OF_BRANCH: Any = _ParentOfBranch()


@dataclass(frozen=True)
class Staged:
    """A state :meth:`Repo.stage` made durable, not yet published: what :meth:`Repo.publish` needs.

    Plain values only (ids, counts, a time), so it can be handed to another process.
    """

    manifest: str  # id of the manifest object
    parent: str | None  # the commit the state was delta-encoded against; the published commit's parent
    tensors: int
    logical_bytes: int
    new_chunks: int
    new_stored_bytes: int
    time: str  # UTC ISO 8601, when staging finished
    save_seconds: float | None = None  # wall time of the stage: encode, hash, code, write, fsync
    # (component, logical bytes, new stored bytes) per ckptvcs.components class
    components: tuple[tuple[str, int, int], ...] = ()

    @property
    def stats(self) -> dict[str, Any]:
        """The ``stats`` field of the commit that publishes this state."""
        stats: dict[str, Any] = {
            "tensors": self.tensors,
            "logical_bytes": self.logical_bytes,
            "new_chunks": self.new_chunks,
            "new_stored_bytes": self.new_stored_bytes,
        }
        if self.save_seconds is not None:
            stats["save_seconds"] = round(self.save_seconds, 6)
        if self.components:
            stats["components"] = {name: {"logical_bytes": logical, "new_stored_bytes": stored}
                                   for name, logical, stored in self.components}
        return stats


@dataclass(frozen=True)
class RepoStats:
    """Sizes of a repository: what commits hold against what the disk holds."""

    commits: int
    branches: int
    tags: int
    chunks: int
    logical_bytes: int  # tensor bytes summed over every reachable commit
    unique_bytes: int  # raw bytes of the distinct chunks stored
    stored_bytes: int  # bytes of those chunks as stored (after compression)
    pack_bytes: int  # size of the pack files on disk
    object_bytes: int  # size of commit, manifest and tag objects on disk

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0


def _locate_store(path: Path) -> Path | None:
    for candidate in (path, path / STORE_DIRNAME):
        if (candidate / layout.CONFIG).is_file():
            return candidate
    return None


def _discover_store(folder: Path) -> Path | None:
    """The store ``folder`` is or holds as ``.ckptvcs/``, for discovery from inside it.

    A bare ``config.json`` is common (model and run configs), so ``folder`` itself
    counts only when it also has a repository's ``objects/`` and ``refs/``.
    """
    if (folder / layout.CONFIG).is_file() and (folder / layout.OBJECTS).is_dir() and (folder / layout.REFS).is_dir():
        return folder
    if (folder / STORE_DIRNAME / layout.CONFIG).is_file():
        return folder / STORE_DIRNAME
    return None


def find_store(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The store :meth:`Repo.discover` would open from ``start``, without opening it."""
    here = Path(start or os.getcwd()).absolute()
    for folder in (here, *here.parents):
        store = _discover_store(folder)
        if store is not None:
            return store
    return None


# Factories that give a Repo opened on a lazy clone its chunk source (``Repo.chunk_source``);
# ckptvcs.remotes registers one when imported (it sits above this layer).
# The pruned-record rule of a commit whose data lives only on a remote (ckptvcs.remotes.tiers):
# with a chunk source its loads fetch it back, verified.
ARCHIVED_RULE = "archived"
CHUNK_SOURCE_FACTORIES: list[Callable[[Repo], Callable[[list[bytes]], None] | None]] = []


class Repo:
    """A ckptvcs repository (a directory holding config, objects, packs, index, refs).

    Open with :meth:`Repo.init` or :meth:`Repo.open`; use as a context manager or call
    :meth:`close`. A handle belongs to the process that opened it: using it after
    ``fork()`` raises ForkedRepoError. Start worker processes with ``spawn`` and open
    the repository there (LMDB cannot reopen, in a forked child, what the parent holds).
    """

    def __init__(self, root: Path, config: dict[str, Any], backend: Backend | None = None) -> None:
        # ``root``: the store's directory; with a backend that has no local files, the
        # local cache directory that holds the chunk index (derived, rebuilt from the packs).
        self.root = root
        self.backend: Backend = backend if backend is not None else LocalBackend(root)
        self._cache_dir = root if self.backend.local_root() is None and is_temporary(root) else None
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self._pid = os.getpid()
        self.objects = ObjectStore(self.backend)
        self.refs = Refs(self.backend)
        if self.backend.local_root() is not None:  # the audit log is a local file (docs/audit.md)
            self.refs.on_move = self._audit_ref_move
        self.chunks = ChunkStore(
            root,
            backend=self.backend,
            chunk_size=self.chunk_size,
            verify_encoding=config.get("verify_encoding", True),
            keyframe_interval=config.get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL),
        )
        self._lock = _StoreLock(self.backend)
        # Where chunks missing locally come from (a lazy clone: ckptvcs.remotes.lazy); None: nowhere.
        self.chunk_source: Callable[[list[bytes]], None] | None = None
        if config.get("lazy_remote") is not None:
            for factory in CHUNK_SOURCE_FACTORIES:
                self.chunk_source = self.chunk_source or factory(self)
        # (commit id, its manifest) of the last commit this Repo published: the next
        # commit's delta bases come from it without reading the object back.
        self._recent_manifest: tuple[str, Manifest] | None = None
        self._staged_manifest: Manifest | None = None
        # (manifest id, delta.first_paths of its root) of the last staged state: the next
        # commit's parent side, so a commit walks only its own tree.
        self._staged_paths: tuple[str, dict[int, str]] | None = None
        self._rebuild_missing_index()
        try:
            self.chunks.index  # noqa: B018 (read for its effect) open now: a forked child is refused here, at open
        except StorageError:
            pass  # an unreadable index fails on first use; `repair index` needs no index

    # -- creation and opening ------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str] | None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL,
        reflog_expire: str = DEFAULT_REFLOG_EXPIRE,
        *,
        backend: Backend | None = None,
    ) -> Repo:
        """Create a repository at ``path`` atomically: a crash leaves none or a whole one.

        ``backend`` stores it elsewhere than a local directory (``ckptvcs.backends``; a
        local backend's directory stands for ``path``, which may then be None).

        ``path`` must not exist or be an empty directory. ``chunk_size`` (bytes, a
        multiple of 16 between 4 KiB and 256 MiB) is fixed for the repository's life.
        ``keyframe_interval`` K bounds delta chains: a chunk is stored whole at least
        every K versions, so a load resolves at most K - 1 deltas (1 disables deltas).
        ``reflog_expire`` (``30.days``, ``2.weeks``, ``never``, ...; see
        :mod:`ckptvcs.expiry`) is how long a reflog entry keeps the data of the commits it
        names from gc; stored in config.json, editable there.
        """
        chunk_size = _check_chunk_size(chunk_size)
        keyframe_interval = _check_keyframe_interval(keyframe_interval)
        _refuse_url(path)
        if not isinstance(reflog_expire, str):
            raise UsageError(f"reflog_expire must be a string such as '30.days', got {reflog_expire!r}")
        parse_expiry(reflog_expire)
        if backend is not None and backend.local_root() is None:
            return cls._init_remote(backend, chunk_size, keyframe_interval, reflog_expire)
        local = backend.local_root() if backend is not None else None
        if local is None and path is None:
            raise UsageError("Repo.init needs a path or a backend")
        target = Path(local if local is not None else path).absolute()  # type: ignore[arg-type]
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise RepositoryExistsError(f"{target} already exists and is not an empty directory")
        config = _new_config(chunk_size, keyframe_interval, reflog_expire)
        staging = target.parent / _fs.temp_name(f".{target.name}.init-")
        with _fs.storage_errors(f"creating repository {target}"):
            _fs.make_dirs(target.parent)
            try:
                staging.mkdir()
                for sub in layout.INIT_FOLDERS:
                    (staging / sub).mkdir(parents=True)
                _fs.atomic_write(staging / HEAD, f"ref: refs/heads/{DEFAULT_BRANCH}\n".encode())
                # Like a virtualenv: an enclosing git checkout never lists the store.
                _fs.atomic_write(staging / layout.GITIGNORE, GITIGNORE)
                _fs.atomic_write(staging / layout.CONFIG, json.dumps(config, indent=2).encode() + b"\n")
                for dirpath, _, _ in os.walk(staging, topdown=False):
                    _fs.fsync_dir(dirpath)
                # An existing target is an empty directory (checked above): rename
                # replaces it, so a failure before this point leaves it as it was.
                _rename_into_place(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return cls(target, config, backend)

    @classmethod
    def _init_remote(cls, backend: Backend, chunk_size: int, keyframe_interval: int, reflog_expire: str) -> Repo:
        """``init`` in a backend without local files: HEAD first, config.json last (what
        makes the keys a repository), each an atomic put."""
        if backend.size(layout.CONFIG) is not None:
            raise RepositoryExistsError(f"{backend.describe()} already holds a repository")
        config = _new_config(chunk_size, keyframe_interval, reflog_expire)
        with _fs.storage_errors(f"creating repository {backend.describe()}"):
            backend.put(layout.HEAD, f"ref: refs/heads/{DEFAULT_BRANCH}\n".encode())
            backend.put(layout.CONFIG, json.dumps(config, indent=2).encode() + b"\n", if_absent=True)
        return cls(open_cache(backend, config), config, backend)

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, *, backend: Backend | None = None) -> Repo:
        """Open the repository at ``path`` (or at ``path/.ckptvcs``), or the one ``backend`` holds.

        A repository whose chunk index is missing (deleted, or not copied: it is derived
        data) gets it rebuilt from the packs here, under the exclusive lock. In a backend
        without local files the index lives in this host's index cache (index_cache.py)
        and is brought up to date from the packs' index objects instead.
        """
        root: Path | str
        if backend is not None and backend.local_root() is None:
            root = backend.describe()
            if backend.size(layout.CONFIG) is None:
                raise NotARepositoryError(f"{root} is not a ckptvcs repository (no config.json); create one with init")
        else:
            path = backend.local_root() if backend is not None else path
            assert path is not None, "Repo.open needs a path or a backend"
            _refuse_url(path)
            found = _locate_store(Path(path).absolute())
            if found is None:
                raise NotARepositoryError(f"{path} is not a ckptvcs repository (no config.json); create one with init")
            _check_layout(found)
            root = found
            backend = backend if backend is not None else LocalBackend(found)
        try:
            config = json.loads(backend.get(layout.CONFIG, max_size=_MAX_RECORD_SIZE))
        except (OSError, ValueError, RecursionError) as err:
            raise CorruptObjectError(f"{root}/config.json is unreadable: {str(err)[:200]}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise NotARepositoryError(f"{root} is not a ckptvcs repository (config.json has another format)")
        version = config.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CorruptObjectError(f"{root}/config.json has an invalid version {version!r}")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{root} uses repository format version {version}, newer than this ckptvcs supports "
                f"({FORMAT_VERSION}); upgrade ckptvcs"
            )
        chunk_size = config.get("chunk_size")
        try:
            _check_chunk_size(chunk_size)
        except UsageError:
            raise CorruptObjectError(f"{root}/config.json has an invalid chunk_size {chunk_size!r}") from None
        try:
            _check_keyframe_interval(config.get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL))
            parse_expiry(config.get("reflog_expire", DEFAULT_REFLOG_EXPIRE))
            parse_expiry(config.get("staged_expire", DEFAULT_STAGED_EXPIRE))
        except InvalidInputError as err:
            raise CorruptObjectError(f"{root}/config.json: {err}") from None
        if isinstance(root, str):
            return cls(open_cache(backend, config), config, backend)
        return cls(root, config, backend)

    @classmethod
    def discover(cls, start: str | os.PathLike[str] | None = None) -> Repo:
        """Open the repository that ``start`` (default: the working directory) or a parent is or holds.

        A folder counts when it is a repository itself (``Repo.init("checkpoints")``,
        ``CheckpointManager("checkpoints")``) or holds one as ``.ckptvcs/`` (``ckptvcs init``);
        the nearest wins.
        """
        store = find_store(start)
        if store is not None:
            return cls.open(store)
        here = Path(start or os.getcwd()).absolute()
        raise NotARepositoryError(
            f"no ckptvcs repository in {here} or its parents; run `ckptvcs init` or pass --repo"
        )

    def _rebuild_missing_index(self) -> None:
        """Rebuild the chunk index from the packs when it is missing but packs exist.

        Without this, LMDB would create an empty index and every chunk would read as
        "missing from the store" (the bit-rot diagnosis) although every pack is intact.
        The check is repeated under the exclusive lock, so of several processes opening
        at once, one rebuilds and the others use its result.
        """
        if self.backend.local_root() is None:
            self._sync_cached_index()
            return
        if not self._index_missing():
            return
        try:
            with self._lock.hold(exclusive=True):
                if self._index_missing():
                    rebuild_index(self.root, self.chunks)
        except (CkptvcsError, OSError) as err:
            raise StorageError(
                f"{self.root}: the chunk index (index/, derived from the packs) is missing and could not be "
                f"rebuilt now ({err}); rebuild it with `ckptvcs repair index`"
            ) from None

    def _sync_cached_index(self) -> None:
        """Bring the cached index of a store without local files up to date (index_cache.py):
        one listing of ``packs/`` and one GET per pack it has not read yet. A cache that
        does not open is discarded and rebuilt from the store (derived data)."""
        try:
            self.chunks.index.indexed_packs()
        except StorageError:
            self.chunks.close_index()
            discard_index(self.root)
        self.chunks.refresh_index()

    def _index_missing(self) -> bool:
        index = self.root / layout.INDEX
        if (index / "data.mdb").exists() or (self.root / layout.INDEX_REBUILT).is_dir():
            return False  # present, or a rebuilt one waiting to be swapped in (index.py)
        try:
            return any(key.endswith(layout.PACK_SUFFIX) for key in self.backend.list(layout.PACKS))
        except OSError:
            return False

    def close(self) -> None:
        """Release threads and file handles. The handle is unusable afterwards."""
        if os.getpid() == self._pid:
            self.chunks.close()
            if self._cache_dir is not None:
                shutil.rmtree(self._cache_dir, ignore_errors=True)  # a derived index, rebuilt on open

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Repo({self.backend.describe()!r})"

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedRepoError(
                "this Repo was opened in another process (before fork); call Repo.open() again in this process"
            )

    # -- revisions -----------------------------------------------------------------

    def resolve(self, rev: str = "HEAD") -> str:
        """The full commit id a revision names.

        Accepts a full id or unique prefix (4+ hex digits), a branch, a tag, ``HEAD``,
        and suffixes ``~N`` (N-th first-parent ancestor), ``^`` / ``^N`` (N-th parent)
        (the grammar: :mod:`ckptvcs.revisions`).
        """
        self._check_process()
        return revisions.resolve(self._resolver, rev)

    @property
    def _resolver(self) -> revisions.StoreResolver:
        return revisions.StoreResolver(self.refs, self.objects)

    def _peel(self, oid: str) -> str:
        """Follow a tag object to the commit it names."""
        return revisions.peel(self._resolver, oid)

    def head(self) -> tuple[str | None, str | None]:
        """``(current branch or None when detached, commit id or None when unborn)``."""
        self._check_process()
        ref, value = self.refs.follow(HEAD)
        branch = ref.removeprefix("refs/heads/") if ref != HEAD else None
        return branch, value

    # -- commit: stage, then publish ------------------------------------------------

    def commit(
        self,
        state: Any,
        message: str = "",
        branch: str | None = None,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        config: Any = None,
        data_version: str | None = None,
        *,
        code_version: Mapping[str, Any] | None | bool = True,
        author: str | None = None,
        progress: Progress | None = None,
        reuse: ReuseHint | None = None,
    ) -> str:
        """Commit ``state`` and return the new commit's id (hex).

        ``state`` is a nested dict/list/tuple of tensors, numpy arrays and plain values
        (see docs/format.md for every supported type). With ``branch`` the commit goes
        onto that branch (created from HEAD if new) and HEAD does not move; otherwise it
        goes where HEAD points. ``code_version=True`` records the git HEAD and dirty flag
        of the working directory; pass a dict to record your own, or None for nothing.
        The commit is durable when this returns. If the branch moved meanwhile, raises
        RefConflictError and leaves the branch as the other writer left it.
        ``progress(done_bytes, total_bytes)`` is called as the state's bytes are stored.
        ``reuse`` (a :class:`ckptvcs.reuse.ReuseHint`) names tensors whose bytes are those of
        an earlier commit: their chunk ids are taken from it without hashing, but for a
        rotating sample that is checked (docs/library.md, "Reusing unchanged tensors").

        The same as :meth:`stage` then :meth:`publish`, under one shared hold of the
        repository lock (so gc cannot run in between and no staged record is needed).
        """
        self._check_process()
        started = time.perf_counter()
        encoded = encode_state(state)  # refuses unsupported values before any write
        body = _commit_body(message, step, epoch, metrics, config, data_version, code_version)
        target, expected, parent = self._commit_target(branch)
        who = author or provenance.default_author()
        with self._lock.hold(exclusive=False):
            staged, manifest = self._stage_locked(encoded, parent, progress, started, reuse, write_manifest=False)
            return self._publish_locked(staged, body, target, expected, who, manifest)

    def stage(
        self,
        state: Any,
        *,
        parent: str | None = _PARENT_OF_BRANCH,
        branch: str | None = None,
        progress: Progress | None = None,
    ) -> Staged:
        """Make ``state``'s chunks and manifest durable without moving any ref.

        ``parent`` (a revision, or None for a root commit) is the commit the state is
        delta-encoded against and that :meth:`publish` will record as its parent; by
        default the commit ``branch`` (or HEAD) points at, as :meth:`commit` chooses it.
        Returns a :class:`Staged` (plain values: it may travel to another process) for
        :meth:`publish`. Until published, the staged data is kept from gc by the record
        ``staged/<manifest id>`` for the staged grace (config.json ``staged_expire``,
        default one day); after it, gc reclaims the data (never damage: fsck calls it
        garbage).
        """
        self._check_process()
        started = time.perf_counter()
        encoded = encode_state(state)
        if parent is _PARENT_OF_BRANCH:
            parent_id = self._commit_target(branch)[2]
        else:
            parent_id = None if parent is None else self.resolve(_require_str(parent, "parent"))
        with self._lock.hold(exclusive=False):
            staged, _ = self._stage_locked(encoded, parent_id, progress, started)
            self._write_staged_record(staged)  # before gc can run: the lock is still held
        return staged

    def publish(
        self,
        staged: Staged,
        message: str = "",
        branch: str | None = None,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        config: Any = None,
        data_version: str | None = None,
        *,
        code_version: Mapping[str, Any] | None | bool = True,
        author: str | None = None,
        expected_parent: str | None = _PARENT_OF_BRANCH,
    ) -> str:
        """Write the commit of a :meth:`stage`'d state and move the ref; returns the commit id.

        The metadata arguments are :meth:`commit`'s. The ref (``branch``, or where HEAD
        points) moves by compare-and-swap from ``expected_parent`` (a commit id; default: the parent
        the state was staged against; None when the branch does not exist yet, which
        then starts at the staged parent): RefConflictError if it moved since, and
        nothing is published. StagedDataCollectedError if gc reclaimed the staged data
        (its grace expired). The staged record is removed once the ref moved.
        """
        self._check_process()
        if not isinstance(staged, Staged) or not _HEX_ID.match(str(staged.manifest)):
            raise InvalidInputError(f"publish takes what Repo.stage returned, got {type(staged).__name__}")
        body = _commit_body(message, step, epoch, metrics, config, data_version, code_version)
        target, current, _ = self._commit_target(branch)
        if expected_parent is _PARENT_OF_BRANCH:
            expected = staged.parent if current is not None else None
        else:
            expected = None if expected_parent is None else _require_str(expected_parent, "expected_parent")
        who = author or provenance.default_author()
        with self._lock.hold(exclusive=False):
            self._check_staged_data(staged)
            commit_id = self._publish_locked(staged, body, target, expected, who)
        self._remove_staged_record(staged.manifest)
        return commit_id

    def combine_staged(self, parts: Iterable[Staged]) -> Staged:
        """One staged state, the union of ``parts``: staged states whose tops are plain dicts.

        For states staged by several processes (the ranks of a sharded save) that one of
        them publishes as one commit. Writes one manifest listing every part's blobs (no
        chunk is read or written) and its staged record, then drops the parts' records
        (the new one keeps all their data). The parts must share their parent and have
        disjoint top-level keys (InvalidInputError otherwise); StagedDataCollectedError
        if gc reclaimed a part.
        """
        self._check_process()
        parts = list(parts)
        if not parts or not all(isinstance(p, Staged) and _HEX_ID.match(str(p.manifest)) for p in parts):
            raise InvalidInputError("combine_staged takes one or more of what Repo.stage returned")
        if len({p.parent for p in parts}) != 1:
            raise InvalidInputError("combine_staged: the parts were staged against different parents")
        items: list[Any] = []
        blobs: list[dict[str, Any]] = []
        seen: set[str] = set()
        with self._lock.hold(exclusive=False):
            for part in parts:
                self._check_staged_data(part)
                manifest = Manifest.parse(part.manifest, self.objects.get(part.manifest, "manifest")[1])
                for key, node in dict_items_shifted(manifest.root, len(blobs)):
                    if json.dumps(key, sort_keys=True) in seen:
                        raise InvalidInputError(f"combine_staged: the parts share the top-level key {key!r}")
                    seen.add(json.dumps(key, sort_keys=True))
                    items.append([key, node])
                blobs += manifest.blobs
            manifest_id = self.objects.put("manifest", {"root": {"dict": items}, "blobs": blobs})
            combined = Staged(
                manifest=manifest_id,
                parent=parts[0].parent,
                tensors=sum(p.tensors for p in parts),
                logical_bytes=sum(p.logical_bytes for p in parts),
                new_chunks=sum(p.new_chunks for p in parts),
                new_stored_bytes=sum(p.new_stored_bytes for p in parts),
                time=provenance.utc_now(),
            )
            self._write_staged_record(combined)
        with contextlib.suppress(CkptvcsError, OSError):
            self._remove_staged_records([p.manifest for p in parts if p.manifest != manifest_id])
        return combined

    def read_range(self, manifest: Manifest, blob: int, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of blob ``blob`` of ``manifest`` (from :meth:`manifest`),
        decoding and verifying only the chunks they overlap, in parallel: ranged reads of
        large tensors."""
        self._check_process()
        if isinstance(blob, bool) or not isinstance(blob, int) or not 0 <= blob < len(manifest.blobs):
            raise CorruptObjectError(f"manifest {manifest.id} has no blob {blob!r}")
        record = manifest.blobs[blob]
        if not 0 <= start <= stop <= record["nbytes"]:
            raise InvalidInputError(f"range [{start}, {stop}) is outside blob {blob} ({record['nbytes']} bytes)")
        if len(record["chunks"]) != -(-record["nbytes"] // self.chunk_size):
            raise CorruptObjectError(f"manifest {manifest.id}: blob {blob} lists the wrong number of chunks")
        if start == stop:
            return memoryview(bytearray())
        first, end = start // self.chunk_size, -(-stop // self.chunk_size)
        lo = first * self.chunk_size
        buf = bytearray(min(record["nbytes"], end * self.chunk_size) - lo)
        futures = self.chunks.read_into(
            [bytes.fromhex(c) for c in record["chunks"][first:end]],
            memoryview(buf),
            describe=lambda: f"blob {blob} of manifest {manifest.id[:12]}",
        )
        try:
            for fut in futures:
                fut.result()
        finally:
            for fut in futures:
                fut.cancel()
        return memoryview(buf)[start - lo:stop - lo]

    def _stage_locked(
        self, encoded: Any, parent: str | None, progress: Progress | None, started: float,
        reuse: ReuseHint | None = None, *, write_manifest: bool = True,
    ) -> tuple[Staged, PreparedObject]:
        """State → chunks → manifest, under the caller's shared lock; no ref moves.

        The parent's delta bases are chosen first, from its manifest alone, and handed
        to the store session with the blobs: encoding never comes back here. Without
        ``write_manifest`` the manifest is returned unwritten, for the caller to store in
        one batch with the commit object (``commit``: both durable before the ref moves).
        """
        with _gc_paused():  # phases as long as the tensors are many (ckptvcs._gcpause)
            paths = delta.first_paths(encoded.root)  # one walk: delta bases and component sizes
            bases = self._delta_bases(parent, encoded, paths)
        self.chunks.index.refresh()  # `repair index` may have swapped it since we opened it
        known = prepare_reuse(reuse, encoded, self.chunks, self._reuse_source) if reuse is not None else None
        session = self.chunks.write_session()
        try:
            with _gc_paused(_small_items(len(encoded.blobs), encoded.nbytes)):
                chunk_lists = session.put_blobs(
                    [blob.data for blob in encoded.blobs],
                    progress,
                    dtypes=[blob.dtype for blob in encoded.blobs],
                    bases=bases,
                    known=known,
                )
                stats = session.finish()
        except BaseException:
            session.abort()
            raise
        with _gc_paused():
            body = {
                "root": encoded.root,
                "blobs": [
                    {"nbytes": len(blob.data), "dtype": blob.dtype, "chunks": [c.hex() for c in chunks]}
                    for blob, chunks in zip(encoded.blobs, chunk_lists)
                ],
            }
            manifest = self.objects.prepare("manifest", body)
            if write_manifest:
                self.objects.put_prepared([manifest])
            manifest_id = manifest.oid
            self._staged_manifest = Manifest(manifest_id, body["root"], body["blobs"])
            self._staged_paths = (manifest_id, paths)
            return Staged(
                manifest=manifest_id,
                parent=parent,
                tensors=encoded.tensors,
                logical_bytes=stats.logical_bytes,
                new_chunks=stats.new_chunks,
                new_stored_bytes=stats.new_stored_bytes,
                time=provenance.utc_now(),
                save_seconds=time.perf_counter() - started,
                components=_component_sizes(encoded, stats.blob_new_stored_bytes, paths),
            ), manifest

    def _publish_locked(
        self, staged: Staged, body: dict[str, Any], target: str, expected: str | None, who: str,
        manifest: PreparedObject | None = None,
    ) -> str:
        """Commit object → ref compare-and-swap (the commit point) → reflog, under the caller's lock.

        ``manifest``: the staged manifest, not yet written; it is stored in one batch with
        the commit object (docs/format.md section 8, step 5), both durable before the ref
        moves. The reflog lines of the branch and of the HEAD attached to it are appended
        together (one batch) after the move.
        """
        commit = Commit(
            manifest=staged.manifest,
            parents=(staged.parent,) if staged.parent else (),
            author=who,
            time=provenance.utc_now(),
            environment=provenance.environment(),
            stats=staged.stats,
            **body,
        )
        commit_object = self.objects.prepare("commit", commit.to_json())
        self.objects.put_prepared([commit_object] if manifest is None else [manifest, commit_object])
        commit_id = commit_object.oid
        summary = f"commit: {commit.message.splitlines()[0] if commit.message else '(no message)'}"
        self.refs.set_if_equals(target, expected, commit_id, who=who, message=summary, log=False)
        staged_manifest = self._staged_manifest
        if staged_manifest is not None and staged_manifest.id == staged.manifest:
            self._recent_manifest = (commit_id, staged_manifest)
        moves: list[tuple[str, str | None, str | None]] = [(target, expected, commit_id)]
        if target != HEAD and self.refs.symbolic_target(HEAD) == target:
            moves.append((HEAD, expected, commit_id))
        self.refs.log_moves(moves, who=who, message=summary)
        return commit_id

    def _check_staged_data(self, staged: Staged) -> None:
        """Refuse to publish a staged state whose manifest, parent or chunks are gone
        (gc reclaimed them after the staged grace): index look-ups only, after picking up
        the packs other handles on a store without local files wrote (their stages)."""
        self.chunks.refresh_index()
        try:
            manifest = Manifest.parse(staged.manifest, self.objects.get(staged.manifest, "manifest")[1])
        except IntegrityError:
            raise StagedDataCollectedError(
                staged.manifest, f"staged manifest {staged.manifest[:12]} is missing or unreadable; stage the state again"
            ) from None
        if staged.parent is not None and not self.objects.has(staged.parent):
            raise RevisionNotFoundError(f"the parent {staged.parent[:12]} the state was staged against does not exist")
        for blob in manifest.blobs:
            if not all(self.chunks.has_complete_chain(bytes.fromhex(c)) for c in blob["chunks"]):
                raise StagedDataCollectedError(
                    staged.manifest,
                    f"the data of staged state {staged.manifest[:12]} (staged {staged.time}) was collected by gc "
                    "after its staged grace expired; nothing was published: stage the state again",
                )

    def _delta_bases(
        self, parent: str | None, encoded: Any, paths: dict[int, str] | None = None
    ) -> list[list[bytes] | None] | None:
        """Per blob, the parent commit's chunk ids to try XOR deltas against (None: no parent).
        ``paths``: delta.first_paths of ``encoded.root``, when already computed."""
        if parent is None or self.chunks.keyframe_interval <= 1:
            return None
        recent = self._recent_manifest
        try:
            manifest = recent[1] if recent is not None and recent[0] == parent else self.manifest(parent)
        except (CorruptObjectError, RevisionNotFoundError):
            return None  # a damaged parent is no base; the new commit stands on its own
        known = self._staged_paths
        parent_paths = known[1] if known is not None and known[0] == manifest.id else None
        return delta.parent_bases(manifest.root, manifest.blobs, encoded.root, [b.dtype for b in encoded.blobs],
                                  parent_paths=parent_paths, paths=paths)

    def _reuse_source(self, commit_id: str) -> tuple[Any, list[dict[str, Any]]] | str:
        """The manifest whose chunk ids a reuse hint may take, or why not (ckptvcs.reuse)."""
        if not _HEX_ID.match(commit_id) or not self.objects.has(commit_id):
            return f"commit {commit_id[:12]} does not exist"
        if self.is_pruned(commit_id):
            return f"commit {commit_id[:12]} was pruned"
        recent = self._recent_manifest
        try:
            manifest = recent[1] if recent is not None and recent[0] == commit_id else self.manifest(commit_id)
        except CkptvcsError as err:
            return f"commit {commit_id[:12]} is unreadable: {err}"
        return manifest.root, manifest.blobs

    def _commit_target(self, branch: str | None) -> tuple[str, str | None, str | None]:
        """``(ref to update, its expected current value, parent commit)``."""
        if branch is None:
            ref, value = self.refs.follow(HEAD)
            return ref, value, value
        ref = f"refs/heads/{check_ref_name(branch, 'branch')}"
        value = self.refs.read_raw(ref)
        if value is not None:
            return ref, value, value
        self._check_ref_path_free(ref)
        _, head_value = self.refs.follow(HEAD)
        return ref, None, head_value  # a new branch starts at HEAD

    # -- load ------------------------------------------------------------------------

    def manifest(self, rev: str = "HEAD") -> Manifest:
        """The parsed manifest of a commit."""
        commit = self.show(rev)
        return Manifest.parse(commit.manifest, self.objects.get(commit.manifest, "manifest")[1])

    def load(
        self,
        rev: str = "HEAD",
        keys: Iterable[str] | None = None,
        map_location: MapLocation = None,
        *,
        progress: Progress | None = None,
    ) -> Any:
        """Load a committed state: same structure, types, dtypes, shapes and bits.

        ``keys`` loads only the named top-level entries, reading no chunk of the rest.
        ``map_location`` places tensors: a device (``"cpu"``), a mapping from saved to
        wanted device, or a callable; by default tensors return to the device they were
        saved from. Every chunk is verified; damage raises IntegrityError naming the
        tensor and the commit. ``progress(done_bytes, total_bytes)`` reports reading.
        """
        self._check_process()
        commit_id = self.resolve(rev)
        with _gc_paused():  # phases as long as the tensors are many (ckptvcs._gcpause)
            manifest = self.manifest(commit_id)
            try:
                node = select_keys(manifest.root, None if keys is None else [keys] if isinstance(keys, str) else list(keys))
            except KeyError as err:
                raise KeyNotFoundError(f"commit {commit_id[:12]}: {err.args[0]}") from None
        blobs = self._read_blobs(manifest, node, commit_id, progress)
        with _gc_paused():
            return decode_state(node, blobs, map_location)

    def _read_blobs(
        self, manifest: Manifest, node: Any, commit_id: str, progress: Progress | None = None, *, path: str = ""
    ) -> dict[int, Any]:
        """Allocate and fill the blobs ``node`` (found at ``path``) needs, verifying every chunk."""
        return self._read_nodes(manifest, [(node, path)], commit_id, progress)

    def _read_nodes(
        self, manifest: Manifest, nodes: list[tuple[Any, str]], commit_id: str, progress: Progress | None = None
    ) -> dict[int, Any]:
        """Allocate and fill the blobs that the ``(node, path)`` pairs need, in one read
        (one index transaction, small chunks grouped), verifying every chunk."""
        with _gc_paused(_many_small_tensors(manifest)):  # as long as the tensors are many, when they are small
            return self._read_nodes_unpaused(manifest, nodes, commit_id, progress)

    def _read_nodes_unpaused(
        self, manifest: Manifest, nodes: list[tuple[Any, str]], commit_id: str, progress: Progress | None
    ) -> dict[int, Any]:
        self._check_not_pruned(commit_id)
        kinds: dict[int, str] = {}
        names: dict[Any, str] = {}
        for node, path in nodes:
            kinds.update(blob_kinds(node))
            names.update((body.get("blob"), name) for name, _, body in iter_tensors(node, path))
        if self.chunk_source is not None:  # a lazy clone: fetch (verified) the chunks this load needs first
            self.chunk_source([bytes.fromhex(c) for i in kinds if isinstance(i, int) and not isinstance(i, bool)
                               and 0 <= i < len(manifest.blobs) for c in manifest.blobs[i]["chunks"]])
        buffers: dict[int, Any] = {}
        futures: list[Future[int]] = []
        try:
            reads: list[BlobRead] = []
            for index, kind in kinds.items():
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(manifest.blobs):
                    raise CorruptObjectError(f"manifest {manifest.id} refers to blob {index!r}, which it lacks")
                blob = manifest.blobs[index]
                nbytes = blob["nbytes"]
                if len(blob["chunks"]) != -(-nbytes // self.chunk_size):  # before allocating nbytes
                    raise CorruptObjectError(
                        f"manifest {manifest.id}: blob {index} lists {len(blob['chunks'])} chunks for {nbytes} bytes"
                    )
                buf = _allocate(nbytes, kind)
                # Before the first touch: fewer, larger page faults while decoding into it.
                advise_huge_pages(buf.data_ptr() if kind == "torch" else buf.ctypes.data, nbytes)
                buffers[index] = buf
                name = names.get(index, "bytes value")
                reads.append(BlobRead(
                    [bytes.fromhex(c) for c in blob["chunks"]],
                    memoryview(buf.numpy() if kind == "torch" else buf),
                    lambda name=name: f"tensor {name} of commit {commit_id[:12]}",  # type: ignore[misc]
                ))
            futures = self.chunks.read_blobs(reads)
            total = sum(len(buf) for buf in buffers.values())
            done = 0
            for fut in as_completed(futures):
                done += fut.result()
                if progress is not None:
                    progress(done, total)
        except IntegrityError as err:
            err.commit_ids = err.commit_ids or (commit_id,)  # the message names it; the field too
            raise
        finally:
            for fut in futures:
                fut.cancel()
        return buffers

    # -- history -------------------------------------------------------------------

    def show(self, rev: str = "HEAD") -> Commit:
        """The commit record a revision names (``.pruned`` set when it was pruned)."""
        commit_id = self.resolve(rev)
        return self._with_pruned(self.objects.read_commit(commit_id), self.pruned_record(commit_id))

    def log(self, rev: str = "HEAD", n: int | None = None) -> list[Commit]:
        """Commits reachable from ``rev``, newest first (by commit time), at most ``n``.

        A range ``A..B`` (git's) lists the commits reachable from B and not from A: what
        B added since A. Either side may be left out for HEAD (``A..`` is ``A..HEAD``).
        """
        span = revisions.split_range(rev)
        if span is not None:
            hidden = {c.id for c in self._walk([self.resolve(span[0])])}
            return self._walk([self.resolve(span[1])], n, hidden=hidden)
        start = self.resolve(rev)
        return self._walk([start], n)

    def find(self, *where: str, rev: str = "HEAD", all_refs: bool = False, n: int | None = None) -> list[Commit]:
        """Commits matching every ``FIELD OP VALUE`` expression (docs/library.md, "Catalog
        queries"), newest first, at most ``n``.

        ``rev`` is as for :meth:`log` (ranges ``A..B`` included); ``all_refs=True`` searches
        every branch, tag and HEAD instead. A malformed expression raises UsageError before
        any history is read.
        """
        conditions = catalog.parse_all(where)
        candidates = self._catalog_candidates(conditions, rev, all_refs)
        if candidates is not None:
            checked = self._read_candidates(candidates if n is None else candidates[:n])
            if checked is not None:
                return checked
        commits = self.all_commits() if all_refs else self.log(rev)
        found = [c for c in commits if catalog.matches(c, conditions)]
        return found if n is None else found[:n]

    def _catalog_candidates(self, conditions: list[catalog.Condition], rev: str,
                            all_refs: bool) -> list[CommitSummary] | None:
        """The summaries of the commits ``find`` would test that match ``conditions``, in
        ``log``'s order, from the commit-summary cache (catalog_cache.py); None when a
        condition needs what a summary lacks (``config.*``)."""
        if any(c.path[0] == "config" for c in conditions):
            return None
        summaries = CommitSummaries(self.backend, self.objects.read_commit)
        load = cast(Callable[[str], Commit], summaries.get)  # history.walk reads .time and .parents only
        hidden: set[str] | None = None
        if all_refs:
            starts = self._all_tips(skip_damaged=True)
        else:
            span = revisions.split_range(rev)
            if span is not None:
                hidden = {c.id for c in history.walk(load, [self.resolve(span[0])])}
            starts = [self.resolve(span[1] if span is not None else rev)]
        order = cast(list[CommitSummary], history.walk(load, starts, hidden=hidden))
        summaries.save()
        return [s for s in order if catalog.matches(cast(Commit, s), conditions)]

    def _read_candidates(self, candidates: list[CommitSummary]) -> list[Commit] | None:
        """The commits of ``candidates`` read from their objects (with pruned records), or
        None, after dropping the cache, when one disagrees with its summary."""
        pruned = self.pruned()
        commits = [self._with_pruned(self.objects.read_commit(s.id), pruned.get(s.id)) for s in candidates]
        if any(summary_of(c).encode() != s.encode() for c, s in zip(commits, candidates)):
            drop_commit_summaries(self.backend)
            return None
        return commits

    def best(
        self,
        metric: str,
        mode: str = "min",
        k: int = 1,
        branch: str | None = None,
        where: Iterable[str] = (),
        include_pruned: bool = False,
    ) -> list[Commit]:
        """The ``k`` commits with the lowest (``mode="min"``) or highest (``"max"``) value of
        ``metric``, best first, among the history of ``branch`` (default HEAD) that matches
        ``where``.

        Commits without the metric (or with NaN) are skipped. Ties go to the newer commit
        (the later checkpoint of an equal score). Pruned and collected commits are left out
        unless ``include_pruned=True`` (their ``.pruned`` then says so), so by default every
        result can be loaded.
        """
        if mode not in ("min", "max"):
            raise UsageError(f"best: mode must be 'min' or 'max', not {mode!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"best: k must be a positive integer, not {k!r}")
        if not isinstance(metric, str) or not metric.strip():
            raise UsageError("best: metric must be a non-empty name")
        rev = HEAD if branch is None else f"refs/heads/{check_ref_name(branch, 'branch')}"
        if branch is not None and self.refs.read_raw(rev) is None:
            raise RevisionNotFoundError(f"best: no branch named {branch!r}")
        conditions = catalog.parse_all(where)
        candidates = self._catalog_candidates(conditions, rev, False)
        if candidates is not None:
            pruned = set(self.pruned())
            ranked = []
            for summary in candidates:  # newest first; the stable sort keeps it
                value = catalog.metric_value(cast(Commit, summary), metric)
                if value is not None and (include_pruned or summary.id not in pruned):
                    ranked.append((value if mode == "min" else -value, summary))
            ranked.sort(key=lambda pair: pair[0])
            checked = self._read_candidates([summary for _, summary in ranked[:k]])
            if checked is not None:
                return checked
        scored = []
        for commit in self.find(*where, rev=rev):  # newest first; the stable sort keeps it
            value = catalog.metric_value(commit, metric)
            if value is not None and (include_pruned or commit.pruned is None):
                scored.append((value if mode == "min" else -value, commit))
        scored.sort(key=lambda pair: pair[0])
        return [commit for _, commit in scored[:k]]

    def _walk(self, starts: Iterable[str], n: int | None = None, *, hidden: set[str] | None = None) -> list[Commit]:
        """Commits reachable from ``starts``, newest first, with their pruned records (:func:`history.walk`)."""
        pruned = self.pruned()
        return history.walk(lambda oid: self._with_pruned(self.objects.read_commit(oid), pruned.get(oid)), starts, n,
                            hidden=hidden)

    def reflog(self, ref: str = "HEAD") -> list[ReflogEntry]:
        """Movements of a ref (``HEAD``, a branch or ``refs/...``), newest first."""
        self._check_process()
        full = ref if ref == HEAD or ref.startswith("refs/") else f"refs/heads/{check_ref_name(ref, 'branch')}"
        return list(self.refs.reflog(full))

    def diff(self, a: str, b: str) -> list[DiffEntry]:
        """Per tensor and per value: added, removed or changed between two commits.

        Changed tensors carry the fraction of elements changed and the max absolute
        difference. Tensors whose chunks are identical are not read at all.
        """
        with _gc_paused():
            manifest_a, manifest_b = self.manifest(a), self.manifest(b)
        commit_a, commit_b = self.resolve(a), self.resolve(b)

        def loader(manifest: Manifest, commit_id: str) -> Callable[[list[tuple[Any, str]]], list[Any]]:
            def load_nodes(nodes: list[tuple[Any, str]]) -> list[Any]:
                blobs = self._read_nodes(manifest, nodes, commit_id)
                # Each node sees only its own blobs (its view budget is sized from them).
                return [decode_state(node, {i: blobs[i] for i in blob_kinds(node)}, "cpu") for node, _ in nodes]
            return load_nodes

        with _gc_paused(_many_small_tensors(manifest_a) or _many_small_tensors(manifest_b)):
            return diff_manifests(manifest_a, manifest_b, loader(manifest_a, commit_a), loader(manifest_b, commit_b))

    def diff_stat(self, a: str, b: str) -> list[DiffStat]:
        """Added, removed and changed tensors and values between two commits, with sizes,
        from the manifests alone: no tensor data is read (fast; works on pruned commits).
        A changed tensor's ``changed_bytes`` counts the bytes in chunks that differ."""
        return stat_manifests(self.manifest(a), self.manifest(b), self.chunk_size)

    # -- branches, tags, checkout --------------------------------------------------------

    def branches(self) -> dict[str, str]:
        """Branch name → commit id. A damaged branch is left out with a RuntimeWarning
        (fsck names it): damage to one branch does not stop work on the others."""
        self._check_process()
        good, damaged = self._read_refs("heads")
        for name, why in damaged.items():
            warnings.warn(f"branch {name} is damaged and was skipped: {why}; run `ckptvcs fsck`",
                          RuntimeWarning, stacklevel=2)
        return good

    def _read_refs(self, namespace: str) -> tuple[dict[str, str], dict[str, str]]:
        """``(name → value of each readable ref, name → why each damaged one is unreadable)``."""
        good: dict[str, str] = {}
        damaged: dict[str, str] = {}
        for name in self.refs.names(namespace):
            try:
                value = self.refs.read_raw(f"refs/{namespace}/{name}")
            except (CorruptObjectError, ValueError) as err:  # ValueError: bytes that are not UTF-8
                damaged[name] = str(err)
                continue
            if value is not None:
                good[name] = value
        return good, damaged

    def branch(self, name: str, rev: str = "HEAD", force: bool = False, *, override_protection: bool = False) -> str:
        """Create branch ``name`` at ``rev`` (move it there with ``force``); returns the id.

        Moving a protected branch (:meth:`protect`) raises ProtectedRefError unless
        ``override_protection`` (then the reflog and the audit log record the override).
        """
        ref = f"refs/heads/{check_ref_name(name, 'branch')}"
        target = self.resolve(rev)
        self._check_data_kept(target, f"branch {name!r}")
        current = self._ref_to_write(ref, force, f"branch {name!r}", "use force to move it")
        overridden = None
        if current is not None and current != target:
            overridden = trust.guard(self, ref, "force-move", override_protection)
        note = f" (protection {overridden} overridden)" if overridden else ""
        self.refs.set_if_equals(ref, current, target, who=provenance.default_author(), message=f"branch: {rev}{note}")
        if current is not None and current != target:
            self.audit("branch.move", ref=ref, old=current, new=target, override=bool(overridden))
        return target

    def delete_branch(self, name: str, force: bool = False, *, override_protection: bool = False) -> None:
        """Delete a branch (not the one HEAD is on).

        Like ``git branch -d``: refuses (UnmergedBranchError) a branch whose tip no other
        branch, tag or detached HEAD contains, unless ``force``. A force-deleted branch's
        commits stay recoverable (its reflog outlives it) until its last reflog entry
        is older than the reflog expiry and gc runs.
        """
        ref = f"refs/heads/{check_ref_name(name, 'branch')}"
        tip = self.refs.read_raw(ref)
        if self.refs.symbolic_target(HEAD) == ref and tip is not None:
            raise CkptvcsError(f"cannot delete branch {name!r}: HEAD is on it; check out another revision first")
        if tip is not None and not force and tip not in self._reachable(self._tips_except(ref)):
            raise UnmergedBranchError(
                name, tip,
                f"branch {name!r} (at {tip[:12]}) is not contained in any other branch or tag; deleting it leaves "
                f"its commits to gc once its reflog expires; use -D (force=True) to delete it anyway",
            )
        self._delete_ref(ref, "branch", name, override_protection)

    def _tips_except(self, ref: str, *, detached_head: bool = True) -> list[str]:
        """Commits named by every branch and tag but ``ref`` (and by a detached HEAD)."""
        tips = [cid for b, cid in self.branches().items() if f"refs/heads/{b}" != ref and cid]
        tips += [t.object for n, t in self.tags().items() if f"refs/tags/{n}" != ref]
        if detached_head and self.refs.symbolic_target(HEAD) is None:
            head = self.refs.read_raw(HEAD)
            if head:
                tips.append(head)
        return tips

    def _reachable(self, starts: Iterable[str], stop: set[str] | frozenset[str] = frozenset()) -> set[str]:
        """Ids of the commits reachable from ``starts`` (parents included), not walking past ``stop``."""
        return history.reachable(lambda oid: self.objects.read_commit(oid).parents, starts, stop)

    def commits_not_on_refs(self, rev: str = "HEAD") -> list[Commit]:
        """Commits reachable from ``rev`` that no branch or tag contains, newest first.

        What a checkout away from a detached HEAD leaves behind: they stay recoverable
        through the reflog until it expires, then gc collects their data.
        """
        start = self.resolve(rev)
        own = self._reachable([start], stop=self._reachable(self._tips_except(HEAD, detached_head=False)))
        commits = [self.objects.read_commit(oid) for oid in own]
        return sorted(commits, key=lambda c: (c.time, c.id), reverse=True)

    def tag(self, name: str, rev: str = "HEAD", message: str = "", force: bool = False, *, key: Any = None,
            override_protection: bool = False) -> str:
        """Create an annotated tag at ``rev``; a tag never moves unless ``force``. Returns the commit id.

        ``key`` (an Ed25519 private key: PEM path, PEM bytes or key object) signs the
        tag object, which pins the commit and every chunk by hash (docs/audit.md);
        :meth:`verify_tag` checks it. Moving a protected tag raises ProtectedRefError
        unless ``override_protection``. Tag changes are recorded in the audit log.
        """
        ref = f"refs/tags/{check_ref_name(name, 'tag')}"
        target = self.resolve(rev)
        self._check_data_kept(target, f"tag {name!r}")
        current = self._ref_to_write(ref, force, f"tag {name!r}", "tags never move unless forced")
        overridden = trust.guard(self, ref, "force-move", override_protection) if current is not None else None
        who = provenance.default_author()
        tag = Tag(object=target, name=name, message=_require_str(message, "message"), tagger=who, time=provenance.utc_now())
        body = tag.to_json()
        if key is not None:
            body["signature"] = sign_tag(body, key)
        tag_id = self.objects.put("tag", body)
        note = f" (protection {overridden} overridden)" if overridden else ""
        self.refs.set_if_equals(ref, current, tag_id, who=who, message=f"tag: {rev}{note}")
        self.audit("tag.move" if current is not None else "tag.create", ref=ref, old=current, new=tag_id,
                   commit=target, signed_by=body.get("signature", {}).get("key"), override=bool(overridden))
        return target

    def tags(self) -> dict[str, Tag]:
        """Tag name → Tag record (``.object`` is the commit id). A damaged tag (ref or tag
        object) is left out with a RuntimeWarning (fsck names it)."""
        self._check_process()
        good, damaged = self._read_tags()
        for name, why in damaged.items():
            warnings.warn(f"tag {name} is damaged and was skipped: {why}; run `ckptvcs fsck`",
                          RuntimeWarning, stacklevel=2)
        return good

    def _read_tags(self) -> tuple[dict[str, Tag], dict[str, str]]:
        """``(name → Tag of each readable tag, name → why each damaged one is unreadable)``."""
        values, damaged = self._read_refs("tags")
        good: dict[str, Tag] = {}
        for name, value in values.items():
            try:
                good[name] = self.objects.read_tag(value)
            except IntegrityError as err:
                damaged[name] = str(err)
        return good, damaged

    def delete_tag(self, name: str, *, override_protection: bool = False) -> None:
        """Delete a tag. Releases are meant to be permanent: this is for mistakes.

        A protected tag (:meth:`protect`) raises ProtectedRefError unless ``override_protection``.
        """
        self._delete_ref(f"refs/tags/{check_ref_name(name, 'tag')}", "tag", name, override_protection)

    def checkout(self, rev: str) -> str:
        """Point HEAD at a branch (by name) or detach it at any other revision; returns the id."""
        self._check_process()
        branch_ref = f"refs/heads/{rev}"
        expected = self.refs.read_raw(HEAD)
        _, old_id = self.refs.follow(HEAD)
        who = provenance.default_author()
        target = self.resolve(rev)
        is_branch = (
            is_valid_ref(branch_ref) and self.refs.read_raw(branch_ref) is not None and not rev.startswith("refs/")
        )
        new_value = f"ref: {branch_ref}" if is_branch else target
        self.refs.set_if_equals(HEAD, expected, new_value, who=who, message="", log=False)
        self.refs.log_move(HEAD, old_id, target, who=who, message=f"checkout: moving to {rev}")
        return target

    def _ref_to_write(self, ref: str, force: bool, what: str, hint: str) -> str | None:
        """The current value of a ref about to be created (or, with ``force``, moved)."""
        current = self.refs.read_raw(ref)
        if current is not None and not force:
            raise RefExistsError(f"{what} already exists at {self._peel(current)[:12]}; {hint}")
        if current is None:
            self._check_ref_path_free(ref)
        return current

    def _delete_ref(self, ref: str, what: str, name: str, override_protection: bool = False) -> None:
        current = self.refs.read_raw(ref)
        if current is None:
            raise RevisionNotFoundError(f"no {what} named {name!r}")
        overridden = trust.guard(self, ref, "delete", override_protection)
        note = f" (protection {overridden} overridden)" if overridden else ""
        self.refs.remove_if_equals(ref, current, who=provenance.default_author(), message=f"{what}: deleted{note}")
        self.audit(f"{what}.delete", ref=ref, old=current, override=bool(overridden))

    def _check_ref_path_free(self, ref: str) -> None:
        """A new ref may not sit where another ref's name needs a directory, or inside one."""
        if self.backend.local_root() is None:
            if any(True for _ in self.backend.list(ref)):
                raise RefExistsError(f"cannot create {ref}: refs named {ref}/... exist")
            parts = ref.split("/")
            for n in range(len(parts) - 1, 1, -1):
                if self.backend.size("/".join(parts[:n])) is not None:
                    raise RefExistsError(f"cannot create {ref}: ref {'/'.join(parts[:n])} exists")
            return
        path = self.root / ref
        if path.is_dir():
            self.refs.prune_empty_folders(path)  # left empty by an older ckptvcs deleting {ref}/...
        if path.is_dir():
            raise RefExistsError(f"cannot create {ref}: refs named {ref}/... exist")
        for parent in path.relative_to(self.root).parents:
            if parent != Path(".") and (self.root / parent).is_file():
                raise RefExistsError(f"cannot create {ref}: ref {parent.as_posix()} exists")
        self.refs.set_aside_stale_logs(ref)

    # -- pruning and garbage collection ----------------------------------------------

    def pruned(self) -> dict[str, dict[str, Any]]:
        """Commit id → pruned record (``rule``, ``reason``, ``time``, ``who``) of every pruned commit.

        A damaged record is left out with a RuntimeWarning (whoever uses this to decide
        what to release then keeps that commit's data); fsck names it, loading that
        commit raises CorruptObjectError, and gc refuses to run until it is fixed.
        """
        self._check_process()
        records, damaged = self._pruned_records()
        for why in damaged.values():
            warnings.warn(f"{why}; its commit is treated as not pruned; run `ckptvcs fsck`", RuntimeWarning,
                          stacklevel=2)
        return records

    def _pruned_records(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """``(commit id → record, commit id → why its record is damaged)``."""
        return commit_records.pruned_records(self.backend)

    def is_pruned(self, commit_id: str) -> bool:
        """Whether a retention rule released this commit's tensor data."""
        return commit_records.is_pruned(self.backend, commit_id)

    def pruned_record(self, commit_id: str) -> dict[str, Any] | None:
        """The pruned record of a commit, or None when it was not pruned."""
        return self._read_pruned(commit_id) if self.is_pruned(commit_id) else None

    def _read_pruned(self, commit_id: str) -> dict[str, Any]:
        return commit_records.read_pruned(self.backend, commit_id)

    def prune(self, rev: str, rule: str, reason: str = "") -> str:
        """Mark a commit pruned: its history stays, its tensor data is released at the next gc.

        ``rule`` names the retention rule (``keep_last=3``), ``reason`` says why in words.
        A commit that a branch, tag or HEAD points at cannot be pruned
        (ProtectedCommitError). Pruning is permanent once gc has run. Returns the id.
        Pruning a commit that already has a record changes nothing: the first record
        stands (a record that says gc collected the data must never lose that).
        """
        commit_id = self.resolve(rev)
        if commit_id in self._all_tips():
            raise ProtectedCommitError(
                f"commit {commit_id[:12]} is the tip of a branch, tag or HEAD; it cannot be pruned"
            )
        if self.pruned_record(commit_id) is not None:
            return commit_id
        self._write_pruned_record(commit_id, _require_str(rule, "rule"), _require_str(reason, "reason"))
        return commit_id

    def _write_pruned_record(self, commit_id: str, rule: str, reason: str, *, collected: bool = False) -> None:
        now = provenance.utc_now()
        record = {"commit": commit_id, "rule": rule, "reason": reason, "time": now, "who": provenance.default_author()}
        self._store_pruned_record(commit_id, {**record, "collected": now} if collected else record)

    def _store_pruned_record(self, commit_id: str, record: dict[str, Any]) -> None:
        commit_records.store_pruned(self.backend, commit_id, record)

    def _record_collected(self, commit_ids: Iterable[str], reason: str) -> None:
        """gc calls this before it deletes any chunk: each commit's data is then known gone."""
        for commit_id in commit_ids:
            self._write_pruned_record(commit_id, COLLECTED_RULE, reason, collected=True)

    def _mark_collected(self, commit_ids: Iterable[str]) -> None:
        """Add gc's time to pruned records whose data gc releases now (before it deletes any)."""
        for commit_id in commit_ids:
            record = self._read_pruned(commit_id)
            if "collected" not in record:
                self._store_pruned_record(commit_id, {**record, "collected": provenance.utc_now()})

    def _check_not_pruned(self, commit_id: str) -> None:
        record = self.pruned_record(commit_id)
        if record is not None and not (record.get("rule") == ARCHIVED_RULE and self.chunk_source is not None):
            raise self._released_error(commit_id, record)  # an archived commit loads from its remote instead

    @staticmethod
    def _released_error(commit_id: str, record: dict[str, Any], doing: str = "") -> CommitPrunedError:
        """The error for a commit whose tensor data was released (pruned, or collected by gc)."""
        if record["rule"] == COLLECTED_RULE:
            return CommitCollectedError(
                commit_id, COLLECTED_RULE,
                f"{doing}commit {commit_id[:12]}'s tensor data was collected by gc on {record.get('time', '?')} "
                "(no branch, tag or unexpired reflog entry kept it); its history and metadata remain",
            )
        why = f": {record['reason']}" if record.get("reason") else ""
        return CommitPrunedError(
            commit_id,
            record["rule"],
            f"{doing}commit {commit_id[:12]} was pruned by retention rule {record['rule']} on "
            f"{record.get('time', '?')}{why}; its history and metadata remain but its tensor data was released",
        )

    def _check_data_kept(self, commit_id: str, what: str) -> None:
        """Refuse to point a new ref at a commit whose tensor data was released."""
        record = self.pruned_record(commit_id)
        if record is not None:
            raise self._released_error(commit_id, record, f"cannot create {what}: ")

    @staticmethod
    def _with_pruned(commit: Commit, record: dict[str, Any] | None) -> Commit:
        return commit if record is None else replace(commit, pruned=record)

    # -- staged records (docs/format.md, section 12) ----------------------------------

    def _write_staged_record(self, staged: Staged) -> None:
        """Record a stage durably (temp, fsync, rename, fsync dir): gc keeps its data for the grace."""
        record = {"manifest": staged.manifest, "parent": staged.parent, "time": staged.time,
                  "who": provenance.default_author()}
        commit_records.write_staged(self.backend, staged.manifest, record)

    def _remove_staged_records(self, manifest_ids: Iterable[str]) -> None:
        """Drop staged records (published, or expired and reclaimed by gc)."""
        commit_records.remove_staged(self.backend, manifest_ids)

    def _remove_staged_record(self, manifest_id: str) -> None:
        """After a publish: the record is no longer needed (the ref keeps the data). A failure
        here does not undo a publish that happened; the record merely expires later."""
        with contextlib.suppress(CkptvcsError, OSError):
            self._remove_staged_records([manifest_id])

    def _staged_records(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """``(manifest id → staged record, name → why its record does not read)``."""
        return commit_records.staged_records(self.backend)

    @property
    def staged_expire(self) -> float:
        """Seconds a staged, unpublished state keeps its data from gc (config.json ``staged_expire``)."""
        return parse_expiry(self.config.get("staged_expire", DEFAULT_STAGED_EXPIRE))

    def _staged_for_gc(self, expire: float) -> tuple[list[str], list[str]]:
        """``(manifest ids whose staged data gc keeps, names of expired staged records)``."""
        return commit_records.staged_for_gc(self.backend, expire)

    def gc(
        self,
        dry_run: bool = False,
        *,
        prune_unreachable_after: Any = None,
        only: Iterable[str] | None = None,
        lock_timeout: float = 60.0,
        staged_expire: Any = None,
    ) -> GcReport:
        """Release the chunks no kept commit needs; returns what was (or would be) reclaimed.

        Kept commits (:meth:`live_commits`): every non-pruned commit reachable from a
        branch, tag or HEAD (a ref's own commit always counts), or from a reflog entry
        younger than ``prune_unreachable_after`` (default: config.json's
        ``reflog_expire``, 30 days; ``"now"``, ``"never"``, ``"2.weeks"``, a timedelta
        or seconds), plus the delta bases they need. Each unreachable commit whose data
        goes gets a pruned record with rule ``gc`` first (``report.collected_commits``):
        loading it raises CommitCollectedError, fsck stays clean.

        ``only`` restricts gc to the data of those pruned commits (not ref tips): every
        other commit a ref or any reflog entry (whatever its age) reaches, or pruned by
        someone else, is kept, and so is every chunk no ``only`` commit lists (the
        CheckpointManager's automatic gc).

        Packs holding no live chunk are deleted; packs mostly dead are rewritten with
        their live entries copied verbatim. Interrupted commits' files in ``tmp/`` are
        removed. Runs under the exclusive repository lock: commits in flight finish
        first, and commits wait for gc (LockTimeoutError after ``lock_timeout``
        seconds without the lock). Before deleting anything, gc checks the index rows
        of the live chunks against the packs' own entry headers and raises
        IndexMismatchError (deleting nothing) when they disagree: run ``repair index``.

        A state :meth:`stage`'d and not published keeps its data for ``staged_expire``
        (default: config.json's ``staged_expire``, one day; same grammar); after it, gc
        reclaims the data and drops the record (``report.staged_expired``).
        """
        self._check_process()
        expire = self.reflog_expire if prune_unreachable_after is None else parse_expiry(prune_unreachable_after)
        staged_grace = self.staged_expire if staged_expire is None else parse_expiry(staged_expire)
        with self._lock.hold(exclusive=True, timeout=lock_timeout):
            started = time.perf_counter()
            self._refuse_if_damaged("collect garbage")
            self.chunks.index.refresh()  # `repair index` may have swapped it since we opened it
            collectable = None if only is None else self._collectable(only)
            # A restricted gc releases only its own pruned commits: every staged state stays.
            staged = self._staged_for_gc(math.inf if only is not None else staged_grace)
            report = collect_garbage(self, dry_run=dry_run, expire=expire, only=collectable, staged=staged)
            seconds = time.perf_counter() - started
        if not dry_run:
            self._record_gc(report, seconds, restricted=only is not None)
        return report

    def _record_gc(self, report: GcReport, seconds: float, *, restricted: bool) -> None:
        """Append what this gc did to ``records/gc.jsonl`` (for the report; docs/format.md section 16)."""
        records.append(self.backend, "gc", {
            "time": provenance.utc_now(),
            "seconds": round(seconds, 6),
            "restricted": restricted,
            "pack_bytes_before": report.pack_bytes_before,
            "pack_bytes_after": report.pack_bytes_after,
            "bytes_reclaimed": report.bytes_reclaimed,
            "packs_deleted": len(report.packs_deleted),
            "packs_rewritten": len(report.packs_rewritten),
            "packs_written": len(report.packs_written),
            "live_commits": report.live_commits,
            "live_chunks": report.live_chunks,
            "chunks_freed": report.dead_chunks,
            "commits_collected": len(report.collected_commits),
            "who": provenance.default_author(),
        })

    def read_records(self, kind: str) -> records.RecordLog:
        """The operational records of ``kind`` (``gc``, ``restore``), oldest first; see
        :mod:`ckptvcs.records`. Damaged lines are counted, never raised."""
        self._check_process()
        return records.read(self.backend, kind)

    def add_record(self, kind: str, record: dict[str, Any]) -> bool:
        """Append ``record`` to ``records/<kind>.jsonl`` durably; False (a warning) when it cannot be written."""
        self._check_process()
        return records.append(self.backend, kind, {"time": provenance.utc_now(), **record})

    @property
    def reflog_expire(self) -> float:
        """Seconds a reflog entry keeps its commits' data from gc (config.json ``reflog_expire``)."""
        return parse_expiry(self.config.get("reflog_expire", DEFAULT_REFLOG_EXPIRE))

    def _collectable(self, only: Iterable[str]) -> set[str]:
        """Of ``only``: the pruned commits no ref points at (the rest stays live)."""
        tips = set(self._all_tips())
        return {c for c in only if c not in tips and self.is_pruned(c)}

    def _damaged_items(self, records: bool = True) -> list[str]:
        """One sentence per damaged branch, tag or (with ``records``) pruned record, naming it and the fix."""
        items = []
        for name, why in self._read_refs("heads")[1].items():
            items.append(f"branch {name} is damaged ({why}): rewrite or delete refs/heads/{name} "
                         f"(its reflog, logs/refs/heads/{name}, names the commit it held)")
        for name, why in self._read_tags()[1].items():
            items.append(f"tag {name} is damaged ({why}): delete refs/tags/{name} and tag the commit again")
        for commit_id, why in (self._pruned_records()[1] if records else {}).items():
            items.append(f"{why}: delete pruned/{commit_id} to keep that commit's data (and prune the commit "
                         "again if it should go)")
        return items

    def _refuse_if_damaged(self, action: str, *, records: bool = True) -> None:
        """Stop ``action`` (gc, prune) while a ref (or, with ``records``, a pruned record) is damaged.

        Skipping the damaged item would let gc delete data it may need (an unknown
        branch tip keeps its history alive; a pruned record decides what is released),
        so these refuse instead of skipping, naming each item and its fix.
        """
        damaged = self._damaged_items(records=records)
        if damaged:
            raise RepositoryDamagedError(f"cannot {action} while {'; '.join(damaged)}")

    def live_commits(self, *, expire: float | None = None) -> list[str]:
        """Ids of the commits whose data gc keeps: reachable from a ref or from a reflog entry
        younger than ``expire`` seconds (default: the configured reflog expiry), and not
        pruned unless a ref's tip."""
        tips = set(self._all_tips())
        starts = tips | self._reflog_commits(self.reflog_expire if expire is None else expire)
        pruned = self.pruned()
        return [c.id for c in self._walk(starts) if c.id in tips or c.id not in pruned]

    def _reflog_commits(self, expire: float) -> set[str]:
        """Existing commits named (old or new) by a reflog entry younger than ``expire`` seconds."""
        if expire <= 0:
            return set()
        cutoff = -1 if math.isinf(expire) else time.time_ns() - int(expire * 1e9)
        named: set[str] = set()
        for ref in self.refs.logged_refs():
            try:
                entries = list(self.refs.reflog(ref, strict=True))
            except CorruptObjectError as err:
                raise RepositoryDamagedError(
                    f"cannot collect garbage while {err}: the commits its lines name may need their data; "
                    f"fix or delete the damaged lines of logs/{ref}"
                ) from None
            named.update(oid for entry in entries if entry.time_ns >= cutoff
                         for oid in (entry.old, entry.new) if oid != ZERO_ID)
        commits = set()
        for oid in named:
            if self.objects.has(oid):
                try:
                    commits.add(self._peel(oid))  # a tag's reflog names tag objects
                except RevisionNotFoundError:
                    pass  # a reflog line naming a manifest or chunk: nothing to keep
        return commits

    # -- reporting -------------------------------------------------------------------

    def _all_tips(self, *, skip_damaged: bool = False) -> list[str]:
        """The commits of every branch, tag and HEAD. A damaged branch or tag raises
        RepositoryDamagedError (a live set missing a tip would lose its history), unless
        ``skip_damaged`` (listing: it is skipped with a warning)."""
        if not skip_damaged:
            self._refuse_if_damaged("find the commit of every ref", records=False)
        tips = list(self.branches().values()) + [t.object for t in self.tags().values()]
        tips += self._remote_tracking_tips()
        _, head = self.refs.follow(HEAD)
        if head:
            tips.append(head)
        return list(dict.fromkeys(tips))

    def _remote_tracking_tips(self) -> list[str]:
        """Commits of the remote-tracking refs (``refs/remotes/<remote>/<branch>``, written by
        fetch and push): gc keeps them like branches, so a fetched history is never half collected."""
        tips = []
        for name in self.refs.names("remotes"):
            with contextlib.suppress(CorruptObjectError, ValueError):
                value = self.refs.read_raw(f"refs/remotes/{name}")
                if value is not None and _HEX_ID.match(value):
                    tips.append(value)
        return tips

    def all_commits(self) -> list[Commit]:
        """Every commit reachable from a branch, tag or HEAD, newest first."""
        return self._walk(self._all_tips(skip_damaged=True))

    def stats(self) -> RepoStats:
        """Logical against stored sizes, for `ckptvcs stats`."""
        self._check_process()
        # What the commit and file walks found before is kept in a derived cache
        # (stats_cache.py): only new commits are read and only new files sized.
        summary = stats_cache.summarize(self.backend, self.objects.read_commit, self._all_tips(skip_damaged=True))
        chunks = unique = stored = 0
        for entry in self.chunks.index:
            chunks += 1
            unique += entry.raw_len
            stored += entry.stored_len
        return RepoStats(
            commits=summary.commits,
            branches=len(self.refs.names("heads")),
            tags=len(self.refs.names("tags")),
            chunks=chunks,
            logical_bytes=summary.logical_bytes,
            unique_bytes=unique,
            stored_bytes=stored,
            pack_bytes=summary.pack_bytes,
            object_bytes=summary.object_bytes,
        )

    # -- recovery readiness, release trust, audit (docs/audit.md) -------------------------

    def verify(self, rev: str = "HEAD", check: str | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Restore a commit in a fresh process of this Python, re-hashing every chunk, and run ``check``.

        ``check`` names an importable function (``"evals.holdout:run"``, found on this
        process's import path) that receives the loaded state (tensors on the CPU) and
        returns a dict of metrics (numbers); raising fails the verification. The outcome
        is recorded as ``verified/<commit id>`` (:meth:`last_verification`) and in the
        audit log, then returned: ``ok``, ``time``, ``seconds``, ``restore_seconds``,
        ``check_seconds``, ``bytes``, ``chunks``, ``check``, ``metrics``, ``error``,
        ``chunk_id``. A failure raises VerifyFailedError (``.record``, ``.chunk_id``)
        after it is recorded. A pruned commit raises CommitPrunedError (nothing to restore).
        """
        self._check_process()
        commit_id = self.resolve(rev)
        self._check_not_pruned(commit_id)
        return verification.verify_commit(self, commit_id, check, timeout, provenance.default_author())

    def last_verification(self, rev: str = "HEAD") -> dict[str, Any] | None:
        """The record of the last :meth:`verify` of a commit, or None (a damaged record raises CorruptObjectError)."""
        return verification.read_record(self.backend, self.resolve(rev))

    def verifications(self) -> dict[str, dict[str, Any]]:
        """Commit id → last verification record, for every verified commit (damaged records are left out with a
        RuntimeWarning)."""
        records, damaged = verification.read_records(self.backend)
        for why in damaged.values():
            warnings.warn(why, RuntimeWarning, stacklevel=2)
        return records

    def verify_tag(self, name: str, trusted_keys: Iterable[Any] | None = None) -> dict[str, Any]:
        """Check a signed tag: its Ed25519 signature by a trusted key, then every byte it pins.

        ``trusted_keys``: public keys (PEM paths, PEM bytes or key objects); default: the
        keys in the repository's ``keys/`` (:meth:`trust_key`; an auditor passes keys
        obtained out of band, see docs/audit.md). Raises UnsignedTagError,
        UntrustedKeyError, BadSignatureError, or IntegrityError naming the damaged
        object or chunk. Returns ``tag``, ``tag_object``, ``commit``, ``manifest``,
        ``key``, ``chunks``, ``bytes``. Audited either way.
        """
        self._check_process()
        return trust.verify_tag(self, name, trusted_keys)

    def trust_key(self, public_key: Any) -> str:
        """Add a public key (PEM path or bytes) to ``keys/``, trusted by :meth:`verify_tag`; returns its id."""
        return trust.trust_key(self, public_key)

    def trusted_keys(self) -> list[str]:
        """Ids of the keys in ``keys/``."""
        return sorted(trust.trusted_keys(self))

    def protect(self, pattern: str) -> list[str]:
        """Protect the refs matching ``pattern`` (``refs/tags/release-*``; ``*`` and ``?`` glob, ``*`` spans
        ``/``): deleting or force-moving them raises ProtectedRefError unless overridden. Returns the patterns."""
        return trust.set_protection(self, pattern, True)

    def unprotect(self, pattern: str) -> list[str]:
        """Remove a protection pattern (audited); returns the remaining patterns."""
        return trust.set_protection(self, pattern, False)

    def protected_refs(self) -> list[str]:
        """The protection patterns (config.json ``protected_refs``)."""
        return trust.protected_patterns(self)

    def audit(self, event: str, **data: Any) -> AuditEvent:
        """Append an event to the audit log (``audit/log.jsonl``), by ``$CKPTVCS_AUTHOR`` or user@host."""
        return AuditLog(self.backend).append(event, provenance.default_author(), data)

    def _audit_ref_move(self, ref: str, old: str, new: str, who: str, why: str) -> None:
        """Chain a ref move into the ref log, ``audit/refs.jsonl`` (docs/audit.md "Ref changes").

        HEAD is logged only while detached: attached, its moves are its branch's (logged).
        A failed write raises StorageError, as a failed reflog write does (a failed fsync is a
        failure); the move itself is durable already. A log that cannot be continued (its last
        part damaged, not a regular file, its lock held too long) is a warning instead, so a damaged log does not
        stop every commit; ``audit --check`` and fsck name the ref whose move is missing.
        """
        try:
            if ref == HEAD and (self.refs.read_raw(HEAD) or "").startswith("ref: "):
                return
            AuditLog.of_refs(self.backend).append(REF_EVENT, who, {"ref": ref, "old": old, "new": new, "why": why})
        except (AuditLogDamagedError, CorruptObjectError, LockTimeoutError) as err:
            warnings.warn(f"{ref} moved to {new[:12]}, but its line in audit/refs.jsonl could not be written: {err}; "
                          "run `ckptvcs audit --check`", RuntimeWarning, stacklevel=2)

    def ref_events(self) -> list[AuditEvent]:
        """Every logged ref move, oldest first: ``data`` holds ``ref``, ``old``, ``new``, ``why``."""
        return list(AuditLog.of_refs(self.backend).events())

    def audit_events(self) -> list[AuditEvent]:
        """The audit log's events, oldest first (:meth:`check_audit` says whether the chain holds)."""
        return list(AuditLog(self.backend).events())

    def check_audit(self) -> AuditCheck:
        """Walk the audit log's and the ref log's hash chains, and check each ref against its last logged
        move; ``.ok``, ``.problems``, ``.events``, ``.head`` (of the event log), ``.ref_events``, ``.ref_head``."""
        return _check_audit_logs(self.backend, self.refs, lambda c: self.objects.read_commit(c).parents)

    # -- integrity ---------------------------------------------------------------------

    def fsck(self, read_data: bool = False, *, progress: FsckProgress | None = None) -> FsckReport:
        """Check refs, commits, manifests, index and packs; with ``read_data`` also every chunk.

        Read-only. Returns a report whose ``findings`` name each problem (``missing``,
        ``hash-mismatch``, ``corrupt``, ``index-mismatch``, ``unreadable``) and each
        piece of garbage (``dangling``, ``unreachable``, ``garbage``); ``report.ok`` is
        True when nothing is damaged. Holds the repository lock shared, so gc and repair
        wait, while commits may go on. ``progress(phase, done, total)`` reports.
        """
        self._check_process()
        with self._lock.hold(exclusive=False):
            try:
                self.chunks.index.refresh()
            except StorageError:
                pass  # an unreadable index becomes a finding
            report = check_repository(self, read_data=read_data, progress=progress)
        self._record_fsck(report, read_data)
        return report

    def _record_fsck(self, report: FsckReport, read_data: bool) -> None:
        """Keep the verdict for `ckptvcs status`; a store we cannot write (read-only) just goes without."""
        record = {
            "time": provenance.utc_now(),
            "ok": report.ok,
            "read_data": read_data,
            "errors": len(report.errors),
            "garbage": len(report.garbage),
            "summary": report.summary(),
        }
        with contextlib.suppress(OSError, CkptvcsError):
            self.backend.put(FSCK_RECORD, canonical_json(record) + b"\n")

    def last_fsck(self) -> dict[str, Any] | None:
        """The record of the last fsck (``time``, ``ok``, ``read_data``, ``errors``, ``garbage``,
        ``summary``), or None when fsck never ran here (or its record is unreadable)."""
        try:
            record = json.loads(self.backend.get(FSCK_RECORD, max_size=_MAX_RECORD_SIZE))
        except (OSError, ValueError, RecursionError, CkptvcsError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("ok"), bool) else None

    def repair_index(self, *, progress: Progress | None = None) -> RepairReport:
        """Rebuild the chunk index from the packs alone, under the exclusive repository lock.

        The new index is built aside and swapped in atomically; packs and objects are
        not touched. Use it when fsck reports ``index-mismatch`` or the index is damaged.
        """
        self._check_process()
        with self._lock.hold(exclusive=True):
            return rebuild_index(self.root, self.chunks, progress)

    def repack(self, *, dry_run: bool = False, progress: Progress | None = None,
               lock_timeout: float = 60.0) -> RepackReport:
        """Store the newest checkpoint of every branch as keyframes (docs/format.md section 12.1).

        Each chunk of a branch tip (or a detached HEAD) that is stored as a delta is
        re-encoded whole, and the older versions of its chain become deltas against
        their newer neighbours (their payloads copied verbatim: XOR is symmetric).
        Commits and manifests do not change. Under the exclusive repository lock: new
        packs sealed, every new entry verified against its id, then one index
        transaction, then gc's sweep releases the superseded entries (``gc(only=[])``:
        no commit's data goes). ``progress(chains done, chains)``.
        """
        from . import repack as repacking

        self._check_process()
        with self._lock.hold(exclusive=True, timeout=lock_timeout):
            started = time.perf_counter()
            self._refuse_if_damaged("repack")
            self.chunks.index.refresh()  # `repair index` may have swapped it since we opened it
            tips = list(self.branches().values())
            _, head = self.refs.follow(HEAD)
            tips = list(dict.fromkeys(tips + ([head] if head else [])))
            manifests = [Manifest.parse(m, self.objects.get(m, "manifest")[1])
                         for m in (self.objects.read_commit(t).manifest for t in tips)]
            tip_chunks = repacking.tip_layouts(manifests)
            rows = {entry.chunk_id: entry for entry in self.chunks.index}
            chains = repacking.plan(rows, tip_chunks, self.chunks.keyframe_interval)
            report = RepackReport(dry_run=dry_run, tips=len(tips), tip_chunks=len(tip_chunks))
            report.delta_tip_chunks = sum(1 for c in tip_chunks if c in rows and rows[c].base is not None)
            report.keyframes = len(chains)
            report.rebased = sum(len(c.chunks) - 1 for c in chains)
            report.stored_bytes_before = sum(rows[cid].stored_len for c in chains for cid in c.chunks)
            # A dry run's estimate: the tip's keyframe as large as its chain's old keyframe.
            report.stored_bytes_after = sum(self.chunks.chain_end(rows[c.chunks[0]])[1].stored_len
                                            + sum(p.stored_len for p in c.payloads) for c in chains)
            report.partial = sum(1 for c in chains if rows[c.chunks[-1]].base is not None)
            if dry_run or not chains:
                report.seconds = time.perf_counter() - started
                return report
            with _fs.storage_errors("listing packs"):
                report.pack_bytes_before = sum(self.backend.size(layout.pack_key(n)) or 0
                                               for n in pack_names(self.backend))
            written = repacking.write(self.chunks, chains, progress)
            moved = [e for w in written for e in w.entries]
            report.packs_written = [w.name for w in written]
            report.stored_bytes_after = sum(e.stored_len for e in moved)
            with _fs.storage_errors("updating the chunk index after repack"):
                self.chunks.index.update(put=moved, remove=[])
            swept = collect_garbage(self, dry_run=False, only=set(), staged=self._staged_for_gc(math.inf),
                                    rewrite_dead_fraction=repacking.SWEEP_DEAD_FRACTION)
            report.pack_bytes_after = swept.pack_bytes_after
            report.gc = swept.as_dict()
            report.seconds = time.perf_counter() - started
        self._record_gc(swept, report.seconds, restricted=True)
        return report


def _new_config(chunk_size: int, keyframe_interval: int, reflog_expire: str) -> dict[str, Any]:
    """The config.json of a new repository."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "chunk_size": chunk_size,
        "keyframe_interval": keyframe_interval,
        "reflog_expire": reflog_expire,
        "hash": "blake3",
        "id": uuid.uuid4().hex,
        "created": provenance.utc_now(),
    }


class _StoreLock:
    """The repository's reader/writer lock (``lock``) through the backend: a flock locally."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def hold(self, *, exclusive: bool, timeout: float = 60.0) -> contextlib.AbstractContextManager[None]:
        if not self._backend.capabilities.advisory_locks:
            return contextlib.nullcontext()  # object stores: conditional puts and grace periods instead
        return self._backend.lock(layout.LOCK, exclusive=exclusive, timeout=timeout)


def _rename_into_place(staging: Path, target: Path) -> None:
    """Rename a complete new repository to ``target``; RepositoryExistsError if another
    process created one there first (every rank of a job may run "open or init")."""
    try:
        _fs.durable_rename(staging, target)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise RepositoryExistsError(f"{target} already exists and is not an empty directory") from None
        raise


def _allocate(nbytes: int, kind: str) -> Any:
    """An uninitialised byte buffer for a blob; a refused allocation is a typed error."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8) if kind == "torch" else np.empty(nbytes, dtype=np.uint8)
    except (RuntimeError, MemoryError, ValueError) as err:
        raise StorageError(f"cannot allocate {nbytes} bytes for a blob: {str(err).splitlines()[0][:120]}") from None


def _check_layout(root: Path) -> None:
    """Refuse a store whose own entries are symbolic links (or special files in place of
    folders): every path ckptvcs reads or writes below them then stays inside it."""
    for name in _LAYOUT:
        try:
            mode = os.lstat(root / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as err:
            raise StorageError(f"cannot inspect {root / name}: {err.strerror}") from None
        if stat.S_ISLNK(mode):
            raise CorruptObjectError(
                f"{root / name} is a symbolic link; ckptvcs never follows links inside a repository "
                "(replace it with what it points to)"
            )
        want_dir = name not in layout.FILES
        if not (stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)):
            kind = "folder" if want_dir else "regular file"
            raise CorruptObjectError(f"{root / name} is not a {kind}; the repository is damaged")


def _many_small_tensors(manifest: Manifest) -> bool:
    """Whether reading ``manifest``'s blobs takes a time bounded by their number, not their
    bytes (many small tensors): then the collector may be paused for it (ckptvcs._gcpause)."""
    sizes = [blob.get("nbytes") for blob in manifest.blobs if isinstance(blob, dict)]
    return _small_items(len(sizes), sum(n for n in sizes if isinstance(n, int)))


def _component_sizes(
    encoded: Any, stored: list[int], paths: dict[int, str] | None = None
) -> tuple[tuple[str, int, int], ...]:
    """(component, logical bytes, new stored bytes) of a staged state (docs/format.md, 4.1)."""
    logical = [len(blob.data) for blob in encoded.blobs]
    if len(stored) != len(logical):
        return ()
    split = components.split(encoded.root, logical, stored, paths)
    return tuple((name, sizes["logical_bytes"], sizes["new_stored_bytes"]) for name, sizes in split.items())


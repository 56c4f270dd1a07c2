"""Repo: the public library API, and the one place that sequences durable writes.

Write order of a commit (docs/format.md, "Write order"): chunks into packs → seal
packs (fsync, rename, fsync dir) → index → manifest and commit objects → ref
compare-and-swap (the commit point) → reflog. A crash anywhere before the ref update
leaves only unreferenced garbage; after it, a complete commit.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _fs, delta, provenance
from .diff import DiffEntry, diff_manifests
from .errors import (
    AmbiguousRevisionError,
    CkptvcsError,
    CommitPrunedError,
    CorruptObjectError,
    ForkedRepoError,
    InvalidInputError,
    KeyNotFoundError,
    NotARepositoryError,
    ProtectedCommitError,
    RefExistsError,
    RepositoryExistsError,
    RevisionNotFoundError,
    StorageError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from .fsck import FsckProgress, FsckReport, check_repository
from .gc import GcReport, collect_garbage
from .hugepages import advise_huge_pages
from .objects import MAX_JSON_DEPTH, Commit, Manifest, ObjectStore, Tag, canonical_json, json_depth_exceeds
from .refs import HEAD, ReflogEntry, Refs, check_ref_name, is_valid_ref
from .repair import RepairReport, rebuild_index
from .state import MapLocation, blob_kinds, decode_state, encode_state, iter_tensors, select_keys
from .store import DEFAULT_KEYFRAME_INTERVAL, ChunkStore, Progress

__all__ = [
    "Repo", "RepoStats", "Manifest", "GcReport", "FORMAT_VERSION", "DEFAULT_CHUNK_SIZE", "DEFAULT_KEYFRAME_INTERVAL",
    "STORE_DIRNAME",
]

FORMAT_NAME = "ckptvcs"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20
STORE_DIRNAME = ".ckptvcs"
DEFAULT_BRANCH = "main"
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{4,63}$")
_REV_SUFFIX = re.compile(r"(~\d*|\^\d*)$")
_MIN_CHUNK_SIZE = 4096
_MAX_CHUNK_SIZE = 256 << 20
_MAX_RECORD_SIZE = 1 << 20  # config.json and pruned records: small JSON files
# The store's own entries: none may be a symbolic link (docs/format.md, "Symbolic links").
_LAYOUT = ("config.json", "HEAD", "lock", "objects", "packs", "tmp", "index", "refs", "logs", "pruned")


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
        if (candidate / "config.json").is_file():
            return candidate
    return None


class Repo:
    """A ckptvcs repository (a directory holding config, objects, packs, index, refs).

    Open with :meth:`Repo.init` or :meth:`Repo.open`; use as a context manager or call
    :meth:`close`. A handle belongs to the process that opened it: using it after
    ``fork()`` raises ForkedRepoError. Start worker processes with ``spawn`` and open
    the repository there (LMDB cannot reopen, in a forked child, what the parent holds).
    """

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self._pid = os.getpid()
        self.objects = ObjectStore(root / "objects")
        self.refs = Refs(root)
        self.chunks = ChunkStore(
            root,
            chunk_size=self.chunk_size,
            verify_encoding=config.get("verify_encoding", True),
            keyframe_interval=config.get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL),
        )
        self._lock = _fs.RepoLock(root / "lock")
        try:
            self.chunks.index  # open now: a forked child is refused here, at open
        except StorageError:
            pass  # an unreadable index fails on first use; `repair index` needs no index

    # -- creation and opening ------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL,
    ) -> Repo:
        """Create a repository at ``path`` atomically: a crash leaves none or a whole one.

        ``path`` must not exist or be an empty directory. ``chunk_size`` (bytes, a
        multiple of 16 between 4 KiB and 256 MiB) is fixed for the repository's life.
        ``keyframe_interval`` K bounds delta chains: a chunk is stored whole at least
        every K versions, so a load resolves at most K - 1 deltas (1 disables deltas).
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
            _MIN_CHUNK_SIZE <= chunk_size <= _MAX_CHUNK_SIZE and chunk_size % 16 == 0
        ):
            raise InvalidInputError(
                f"chunk_size must be a multiple of 16 between {_MIN_CHUNK_SIZE} and {_MAX_CHUNK_SIZE}, got {chunk_size!r}"
            )
        _check_keyframe_interval(keyframe_interval)
        target = Path(path).absolute()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise RepositoryExistsError(f"{target} already exists and is not an empty directory")
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "chunk_size": chunk_size,
            "keyframe_interval": keyframe_interval,
            "hash": "blake3",
            "id": uuid.uuid4().hex,
            "created": provenance.utc_now(),
        }
        staging = target.parent / _fs.temp_name(f".{target.name}.init-")
        with _fs.storage_errors(f"creating repository {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.mkdir()
                for sub in ("objects", "packs", "tmp", "index", "refs/heads", "refs/tags", "logs"):
                    (staging / sub).mkdir(parents=True)
                _fs.atomic_write(staging / HEAD, f"ref: refs/heads/{DEFAULT_BRANCH}\n".encode())
                _fs.atomic_write(staging / "config.json", json.dumps(config, indent=2).encode() + b"\n")
                for dirpath, _, _ in os.walk(staging, topdown=False):
                    _fs.fsync_dir(dirpath)
                # An existing target is an empty directory (checked above): rename
                # replaces it, so a failure before this point leaves it as it was.
                _fs.durable_rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return cls(target, config)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Repo:
        """Open the repository at ``path`` (or at ``path/.ckptvcs``)."""
        root = _locate_store(Path(path).absolute())
        if root is None:
            raise NotARepositoryError(f"{path} is not a ckptvcs repository (no config.json); create one with init")
        _check_layout(root)
        try:
            config = json.loads(_fs.read_record(root / "config.json", _MAX_RECORD_SIZE))
        except (OSError, ValueError, RecursionError) as err:
            raise CorruptObjectError(f"{root}/config.json is unreadable: {str(err)[:200]}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise NotARepositoryError(f"{root} is not a ckptvcs repository (config.json has another format)")
        version = config.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{root} uses repository format version {version}, newer than this ckptvcs supports "
                f"({FORMAT_VERSION}); upgrade ckptvcs"
            )
        chunk_size = config.get("chunk_size")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
            _MIN_CHUNK_SIZE <= chunk_size <= _MAX_CHUNK_SIZE and chunk_size % 16 == 0
        ):
            raise CorruptObjectError(f"{root}/config.json has an invalid chunk_size {chunk_size!r}")
        try:
            _check_keyframe_interval(config.get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL))
        except InvalidInputError as err:
            raise CorruptObjectError(f"{root}/config.json: {err}") from None
        return cls(root, config)

    @classmethod
    def discover(cls, start: str | os.PathLike[str] | None = None) -> Repo:
        """Open the repository in ``start`` (default: the working directory) or a parent."""
        here = Path(start or os.getcwd()).absolute()
        for folder in (here, *here.parents):
            if (folder / STORE_DIRNAME / "config.json").is_file():
                return cls.open(folder / STORE_DIRNAME)
        raise NotARepositoryError(
            f"no ckptvcs repository in {here} or its parents; run `ckptvcs init` or pass --repo"
        )

    def close(self) -> None:
        """Release threads and file handles. The handle is unusable afterwards."""
        if os.getpid() == self._pid:
            self.chunks.close()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Repo({str(self.root)!r})"

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedRepoError(
                "this Repo was opened in another process (before fork); call Repo.open() again in this process"
            )

    # -- revisions -----------------------------------------------------------------

    def resolve(self, rev: str = "HEAD") -> str:
        """The full commit id a revision names.

        Accepts a full id or unique prefix (4+ hex digits), a branch, a tag, ``HEAD``,
        and suffixes ``~N`` (N-th first-parent ancestor), ``^`` / ``^N`` (N-th parent).
        """
        self._check_process()
        if not isinstance(rev, str) or not rev.strip():
            raise RevisionNotFoundError(f"invalid revision {rev!r}")
        rev = rev.strip()
        match = _REV_SUFFIX.search(rev)
        if match and match.start() > 0:
            base = self.resolve(rev[: match.start()])
            op, num = match.group(0)[0], match.group(0)[1:]
            count = int(num) if num else 1
            if op == "~":
                for _ in range(count):
                    parents = self.objects.read_commit(base).parents
                    if not parents:
                        raise RevisionNotFoundError(f"{rev}: history is not that deep")
                    base = parents[0]
                return base
            if count == 0:
                return base
            parents = self.objects.read_commit(base).parents
            if len(parents) < count:
                raise RevisionNotFoundError(f"{rev}: commit {base[:12]} has no parent {count}")
            return parents[count - 1]
        return self._resolve_name(rev)

    def _resolve_name(self, rev: str) -> str:
        if rev == HEAD:
            ref, value = self.refs.follow(HEAD)
            if value is None:
                branch = ref.removeprefix("refs/heads/")
                raise RevisionNotFoundError(f"HEAD: branch {branch!r} has no commits yet")
            return value
        if _HEX_ID.match(rev):
            if not self.objects.has(rev):
                raise RevisionNotFoundError(f"unknown revision {rev}")
            return self._peel(rev)
        for ref in (f"refs/heads/{rev}", f"refs/tags/{rev}", rev if rev.startswith("refs/") else None):
            if ref is None or not is_valid_ref(ref):
                continue
            value = self.refs.read_raw(ref)
            if value is not None and not value.startswith("ref: "):
                return self._peel(value)
        if _HEX_PREFIX.match(rev):
            matches = [oid for oid in self.objects.with_prefix(rev) if self.objects.kind(oid) in ("commit", "tag")]
            if len(matches) > 1:
                raise AmbiguousRevisionError(f"revision {rev} is ambiguous: matches {', '.join(m[:12] for m in matches)}")
            if matches:
                return self._peel(matches[0])
        raise RevisionNotFoundError(f"unknown revision {rev!r} (not a branch, tag, or commit id)")

    def _peel(self, oid: str) -> str:
        """Follow a tag object to the commit it names."""
        kind = self.objects.kind(oid)
        if kind == "tag":
            return self._peel(self.objects.read_tag(oid).object)
        if kind != "commit":
            raise RevisionNotFoundError(f"{oid[:12]} is a {kind}, not a commit")
        return oid

    def head(self) -> tuple[str | None, str | None]:
        """``(current branch or None when detached, commit id or None when unborn)``."""
        self._check_process()
        ref, value = self.refs.follow(HEAD)
        branch = ref.removeprefix("refs/heads/") if ref != HEAD else None
        return branch, value

    # -- commit --------------------------------------------------------------------

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
        """
        self._check_process()
        encoded = encode_state(state)  # refuses unsupported values before any write
        body = {
            "message": _require_str(message, "message"),
            "step": _optional_int(step, "step"),
            "epoch": _optional_int(epoch, "epoch"),
            "metrics": _metrics(metrics),
            "config": _json_value(config, "config"),
            "data_version": None if data_version is None else _require_str(data_version, "data_version"),
            "code_version": provenance.code_version() if code_version is True
            else (None if code_version in (None, False) else _json_value(dict(code_version), "code_version")),
        }
        target, expected, parent = self._commit_target(branch)
        who = author or provenance.default_author()
        with self._lock.hold(exclusive=False):
            self.chunks.index.refresh()  # `repair index` may have swapped it since we opened it
            session = self.chunks.write_session()
            try:
                chunk_lists = session.put_blobs(
                    [blob.data for blob in encoded.blobs],
                    progress,
                    dtypes=[blob.dtype for blob in encoded.blobs],
                    bases=self._delta_bases(parent, encoded),
                )
                stats = session.finish()
            except BaseException:
                session.abort()
                raise
            manifest_id = self.objects.put("manifest", {
                "root": encoded.root,
                "blobs": [
                    {"nbytes": len(blob.data), "dtype": blob.dtype, "chunks": [c.hex() for c in chunks]}
                    for blob, chunks in zip(encoded.blobs, chunk_lists)
                ],
            })
            commit = Commit(
                manifest=manifest_id,
                parents=(parent,) if parent else (),
                author=who,
                time=provenance.utc_now(),
                environment=provenance.environment(),
                stats={
                    "tensors": encoded.tensors,
                    "logical_bytes": stats.logical_bytes,
                    "new_chunks": stats.new_chunks,
                    "new_stored_bytes": stats.new_stored_bytes,
                },
                **body,
            )
            commit_id = self.objects.put("commit", commit.to_json())
            summary = f"commit: {commit.message.splitlines()[0] if commit.message else '(no message)'}"
            self.refs.set_if_equals(target, expected, commit_id, who=who, message=summary)
            if target != HEAD and self.refs.symbolic_target(HEAD) == target:
                self.refs.log_move(HEAD, expected, commit_id, who=who, message=summary)
        return commit_id

    def _delta_bases(self, parent: str | None, encoded: Any) -> list[list[bytes] | None] | None:
        """Per blob, the parent commit's chunk ids to try XOR deltas against (None: no parent)."""
        if parent is None or self.chunks.keyframe_interval <= 1:
            return None
        try:
            manifest = self.manifest(parent)
        except (CorruptObjectError, RevisionNotFoundError):
            return None  # a damaged parent is no base; the new commit stands on its own
        return delta.parent_bases(manifest.root, manifest.blobs, encoded.root, [b.dtype for b in encoded.blobs])

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
        manifest = self.manifest(commit_id)
        try:
            node = select_keys(manifest.root, None if keys is None else [keys] if isinstance(keys, str) else list(keys))
        except KeyError as err:
            raise KeyNotFoundError(f"commit {commit_id[:12]}: {err.args[0]}") from None
        blobs = self._read_blobs(manifest, node, commit_id, progress)
        return decode_state(node, blobs, map_location)

    def _read_blobs(
        self, manifest: Manifest, node: Any, commit_id: str, progress: Progress | None = None, *, path: str = ""
    ) -> dict[int, Any]:
        """Allocate and fill the blobs ``node`` (found at ``path``) needs, verifying every chunk."""
        self._check_not_pruned(commit_id)
        kinds = blob_kinds(node)
        names = {body.get("blob"): name for name, _, body in iter_tensors(node, path)}
        buffers: dict[int, Any] = {}
        futures: list[Future] = []
        try:
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
                view = memoryview(buf.numpy() if kind == "torch" else buf)
                name = names.get(index, "bytes value")
                futures += self.chunks.read_into(
                    [bytes.fromhex(c) for c in blob["chunks"]],
                    view,
                    describe=lambda name=name: f"tensor {name} of commit {commit_id[:12]}",
                )
            total = sum(len(buf) for buf in buffers.values())
            done = 0
            for fut in as_completed(futures):
                done += fut.result()
                if progress is not None:
                    progress(done, total)
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
        """Commits reachable from ``rev``, newest first (by commit time), at most ``n``."""
        start = self.resolve(rev)
        return self._walk([start], n)

    def _walk(self, starts: Iterable[str], n: int | None = None) -> list[Commit]:
        seen: set[str] = set()
        heap: list[tuple[str, str, Commit]] = []
        pruned = self.pruned()

        def push(oid: str) -> None:
            if oid not in seen:
                seen.add(oid)
                commit = self._with_pruned(self.objects.read_commit(oid), pruned.get(oid))
                # Negated time via a sort key: newest first with a min-heap.
                heapq.heappush(heap, (_desc(commit.time), oid, commit))

        for oid in starts:
            push(oid)
        result: list[Commit] = []
        while heap and (n is None or len(result) < n):
            _, _, commit = heapq.heappop(heap)
            result.append(commit)
            for parent in commit.parents:
                push(parent)
        return result

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
        manifest_a, manifest_b = self.manifest(a), self.manifest(b)
        commit_a, commit_b = self.resolve(a), self.resolve(b)

        def loader(manifest: Manifest, commit_id: str):
            def load_node(node: Any, path: str) -> Any:
                return decode_state(node, self._read_blobs(manifest, node, commit_id, path=path), "cpu")
            return load_node

        return diff_manifests(manifest_a, manifest_b, loader(manifest_a, commit_a), loader(manifest_b, commit_b))

    # -- branches, tags, checkout --------------------------------------------------------

    def branches(self) -> dict[str, str]:
        """Branch name → commit id."""
        self._check_process()
        return {name: self.refs.read_raw(f"refs/heads/{name}") for name in self.refs.names("heads")}

    def branch(self, name: str, rev: str = "HEAD", force: bool = False) -> str:
        """Create branch ``name`` at ``rev`` (move it there with ``force``); returns the id."""
        ref = f"refs/heads/{check_ref_name(name, 'branch')}"
        target = self.resolve(rev)
        current = self._ref_to_write(ref, force, f"branch {name!r}", "use force to move it")
        self.refs.set_if_equals(ref, current, target, who=provenance.default_author(), message=f"branch: {rev}")
        return target

    def delete_branch(self, name: str) -> None:
        """Delete a branch (not the one HEAD is on). Its commits stay until gc."""
        ref = f"refs/heads/{check_ref_name(name, 'branch')}"
        if self.refs.symbolic_target(HEAD) == ref and self.refs.read_raw(ref) is not None:
            raise CkptvcsError(f"cannot delete branch {name!r}: HEAD is on it; check out another revision first")
        self._delete_ref(ref, "branch", name)

    def tag(self, name: str, rev: str = "HEAD", message: str = "", force: bool = False) -> str:
        """Create an annotated tag at ``rev``; a tag never moves unless ``force``. Returns the commit id."""
        ref = f"refs/tags/{check_ref_name(name, 'tag')}"
        target = self.resolve(rev)
        current = self._ref_to_write(ref, force, f"tag {name!r}", "tags never move unless forced")
        who = provenance.default_author()
        tag = Tag(object=target, name=name, message=_require_str(message, "message"), tagger=who, time=provenance.utc_now())
        tag_id = self.objects.put("tag", tag.to_json())
        self.refs.set_if_equals(ref, current, tag_id, who=who, message=f"tag: {rev}")
        return target

    def tags(self) -> dict[str, Tag]:
        """Tag name → Tag record (``.object`` is the commit id)."""
        self._check_process()
        result = {}
        for name in self.refs.names("tags"):
            value = self.refs.read_raw(f"refs/tags/{name}")
            if value is not None:
                result[name] = self.objects.read_tag(value)
        return result

    def delete_tag(self, name: str) -> None:
        """Delete a tag. Releases are meant to be permanent: this is for mistakes."""
        self._delete_ref(f"refs/tags/{check_ref_name(name, 'tag')}", "tag", name)

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

    def _delete_ref(self, ref: str, what: str, name: str) -> None:
        current = self.refs.read_raw(ref)
        if current is None:
            raise RevisionNotFoundError(f"no {what} named {name!r}")
        self.refs.remove_if_equals(ref, current, who=provenance.default_author(), message=f"{what}: deleted")

    def _check_ref_path_free(self, ref: str) -> None:
        """A new ref may not sit where another ref's name needs a directory, or inside one."""
        path = self.root / ref
        if path.is_dir():
            raise RefExistsError(f"cannot create {ref}: refs named {ref}/... exist")
        for parent in path.relative_to(self.root).parents:
            if parent != Path(".") and (self.root / parent).is_file():
                raise RefExistsError(f"cannot create {ref}: ref {parent.as_posix()} exists")

    # -- pruning and garbage collection ----------------------------------------------

    def _pruned_dir(self) -> Path:
        return self.root / "pruned"

    def pruned(self) -> dict[str, dict[str, Any]]:
        """Commit id → pruned record (``rule``, ``reason``, ``time``, ``who``) of every pruned commit."""
        self._check_process()
        folder = self._pruned_dir()
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return {}
        return {name: self._read_pruned(name) for name in sorted(names) if _HEX_ID.match(name)}

    def is_pruned(self, commit_id: str) -> bool:
        """Whether a retention rule released this commit's tensor data."""
        return _HEX_ID.match(commit_id) is not None and (self._pruned_dir() / commit_id).is_file()

    def pruned_record(self, commit_id: str) -> dict[str, Any] | None:
        """The pruned record of a commit, or None when it was not pruned."""
        return self._read_pruned(commit_id) if self.is_pruned(commit_id) else None

    def _read_pruned(self, commit_id: str) -> dict[str, Any]:
        path = self._pruned_dir() / commit_id
        try:
            record = json.loads(_fs.read_record(path, _MAX_RECORD_SIZE))
        except (OSError, ValueError, RecursionError) as err:
            raise CorruptObjectError(f"pruned record {path} is unreadable: {str(err)[:200]}") from None
        if not isinstance(record, dict) or not isinstance(record.get("rule"), str):
            raise CorruptObjectError(f"pruned record {path} is malformed")
        return record

    def prune(self, rev: str, rule: str, reason: str = "") -> str:
        """Mark a commit pruned: its history stays, its tensor data is released at the next gc.

        ``rule`` names the retention rule (``keep_last=3``), ``reason`` says why in words.
        A commit that a branch, tag or HEAD points at cannot be pruned
        (ProtectedCommitError). Pruning is permanent once gc has run. Returns the id.
        """
        commit_id = self.resolve(rev)
        if commit_id in self._all_tips():
            raise ProtectedCommitError(
                f"commit {commit_id[:12]} is the tip of a branch, tag or HEAD; it cannot be pruned"
            )
        record = {
            "commit": commit_id,
            "rule": _require_str(rule, "rule"),
            "reason": _require_str(reason, "reason"),
            "time": provenance.utc_now(),
            "who": provenance.default_author(),
        }
        folder = self._pruned_dir()
        with _fs.storage_errors(f"recording that commit {commit_id[:12]} was pruned"):
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                _fs.fsync_dir(self.root)
            _fs.atomic_write(folder / commit_id, canonical_json(record) + b"\n")
        return commit_id

    def _check_not_pruned(self, commit_id: str) -> None:
        record = self.pruned_record(commit_id)
        if record is not None:
            why = f": {record['reason']}" if record.get("reason") else ""
            raise CommitPrunedError(
                commit_id,
                record["rule"],
                f"commit {commit_id[:12]} was pruned by retention rule {record['rule']} on "
                f"{record.get('time', '?')}{why}; its history and metadata remain but its tensor data was released",
            )

    @staticmethod
    def _with_pruned(commit: Commit, record: dict[str, Any] | None) -> Commit:
        return commit if record is None else replace(commit, pruned=record)

    def gc(self, dry_run: bool = False) -> GcReport:
        """Release the chunks no kept commit needs; returns what was (or would be) reclaimed.

        Live chunks: those of every non-pruned commit reachable from a branch, tag or
        HEAD (a ref's own commit always counts as live), plus the delta bases they need.
        Packs holding no live chunk are deleted; packs mostly dead are rewritten with
        their live entries copied verbatim. Interrupted commits' files in ``tmp/`` are
        removed. Runs under the exclusive repository lock: commits in flight finish
        first, and commits wait for gc.
        """
        self._check_process()
        with self._lock.hold(exclusive=True):
            self.chunks.index.refresh()  # `repair index` may have swapped it since we opened it
            return collect_garbage(self, dry_run=dry_run)

    def live_commits(self) -> list[str]:
        """Ids of the commits whose data gc keeps: reachable, and not pruned unless a ref's tip."""
        tips = set(self._all_tips())
        pruned = self.pruned()
        return [c.id for c in self._walk(tips) if c.id in tips or c.id not in pruned]

    # -- reporting -------------------------------------------------------------------

    def _all_tips(self) -> list[str]:
        tips = list(self.branches().values()) + [t.object for t in self.tags().values()]
        _, head = self.refs.follow(HEAD)
        if head:
            tips.append(head)
        return list(dict.fromkeys(tips))

    def all_commits(self) -> list[Commit]:
        """Every commit reachable from a branch, tag or HEAD, newest first."""
        return self._walk(self._all_tips())

    def stats(self) -> RepoStats:
        """Logical against stored sizes, for `ckptvcs stats`."""
        self._check_process()
        commits = self.all_commits()
        chunks = unique = stored = 0
        for entry in self.chunks.index:
            chunks += 1
            unique += entry.raw_len
            stored += entry.stored_len

        def folder_size(folder: Path) -> int:
            return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

        return RepoStats(
            commits=len(commits),
            branches=len(self.refs.names("heads")),
            tags=len(self.refs.names("tags")),
            chunks=chunks,
            logical_bytes=sum(int(c.stats.get("logical_bytes", 0)) for c in commits),
            unique_bytes=unique,
            stored_bytes=stored,
            pack_bytes=folder_size(self.root / "packs"),
            object_bytes=folder_size(self.root / "objects"),
        )

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
            return check_repository(self, read_data=read_data, progress=progress)

    def repair_index(self, *, progress: Progress | None = None) -> RepairReport:
        """Rebuild the chunk index from the packs alone, under the exclusive repository lock.

        The new index is built aside and swapped in atomically; packs and objects are
        not touched. Use it when fsck reports ``index-mismatch`` or the index is damaged.
        """
        self._check_process()
        with self._lock.hold(exclusive=True):
            return rebuild_index(self.root, self.chunks, progress)


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
        want_dir = name not in ("config.json", "HEAD", "lock")
        if not (stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)):
            kind = "folder" if want_dir else "regular file"
            raise CorruptObjectError(f"{root / name} is not a {kind}; the repository is damaged")


def _check_keyframe_interval(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise InvalidInputError(f"keyframe_interval must be an integer between 1 and 64, got {value!r}")


def _desc(timestamp: str) -> tuple[int, ...]:
    """A heap key that orders ISO timestamps newest first."""
    return tuple(-ord(ch) for ch in timestamp)


def _require_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise UnsupportedValueError(name, f"expected a string, got {type(value).__name__}")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UnsupportedValueError(name, f"expected an integer, got {type(value).__name__}")
    return int(value)


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    result: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise UnsupportedValueError(f"metrics/{name!r}", "metric names must be strings")
        try:
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            result[name] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise UnsupportedValueError(f"metrics/{name}", f"expected a number, got {type(value).__name__}") from None
    return result


def _json_value(value: Any, name: str) -> Any:
    """Check that ``value`` is plain JSON (what canonical hashing accepts); returns it."""
    if json_depth_exceeds(value, MAX_JSON_DEPTH - 2):
        raise UnsupportedValueError(name, f"nests deeper than {MAX_JSON_DEPTH - 2} levels")
    try:
        canonical_json(value)
    except (TypeError, ValueError) as err:
        raise UnsupportedValueError(name, f"must be plain JSON (dict, list, str, number, bool, None): {err}") from None
    return json.loads(json.dumps(value))

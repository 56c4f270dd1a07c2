"""fsck: check that every ref reaches complete, intact commits, and say exactly what is not.

Read-only. Checks, in an order that is safe while writers commit (refs first, then
what they reach, then the index, then the packs, so nothing a writer adds meanwhile
looks damaged):

1. **refs**: HEAD, branches and tags parse and point at a commit (tags: a tag object
   that names a commit);
2. **connectivity**: every commit reachable from a ref, its parents and its manifest
   exist, verify (BLAKE3) and parse; every chunk a manifest lists is in the index
   (chunks of pruned commits, which gc may have removed on purpose, are exempt);
3. **index ↔ packs**: every index entry points at a pack that exists and at an entry
   header there that names the same chunk, codec and lengths; a delta base an entry
   names is indexed too; every pack's frame (header, entry headers, footer) is valid;
4. **garbage** (informational, not errors): unreachable objects, packs and indexed
   chunks no commit uses, leftovers in ``tmp/``, stale lock files. Interrupted
   commits leave exactly these; gc removes them.
5. with ``read_data``: every indexed chunk is read back through the store's own
   verified read path (decode, then BLAKE3 against its id), as ``load`` would.

Each problem is a :class:`Finding` whose ``kind`` is one of ``missing``,
``hash-mismatch``, ``corrupt``, ``index-mismatch``, ``unreadable`` (errors) or
``dangling``, ``unreachable``, ``garbage`` (informational), and which names the
objects, chunks or packs involved, the commits whose state is affected, the tensors
that hold the damaged chunks, and the refs that reach those commits.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import _fs, layout
from .audit import AUDIT_DIR, LOG_NAME, check_audit
from .backends import Backend
from .codec import CODEC_NAMES, USES_BASE
from .errors import CkptvcsError, CorruptObjectError, IntegrityError, InvalidRefNameError, StorageError
from .index import ChunkIndex
from .objects import Commit, Manifest, ObjectStore, Tag
from .pack import PackEntry, iter_backend_pack, with_delta_bases
from .pack_index import read_pack_index
from .refs import HEAD, REFLOG_LINE, ZERO_ID, Refs, check_ref_name
from .state import iter_tensors, validate_tree
from .store import MAX_CHAIN_LENGTH

__all__ = [
    "Finding", "FsckReport", "FsckProgress", "ERROR_KINDS", "INFO_KINDS", "check_repository", "FsckRepository",
    "FsckChunks",
]

ERROR_KINDS = ("missing", "hash-mismatch", "corrupt", "index-mismatch", "unreadable")
INFO_KINDS = ("dangling", "unreachable", "garbage")

FsckProgress = Callable[[str, int, int], None]
"""Progress of a long check: ``(phase, done, total)``; phases ``packs``, ``commits``
(counted in items) and ``data`` (counted in bytes)."""

_PACK_NAME = re.compile(r"^[0-9a-f]{32}\.pack$")
_CONFIG_WRITTEN = ("hash", "id", "created")  # fields `init` always writes that opening does not check
_MAX_NAMED = 5  # users of a damaged chunk spelled out in a message; all are in the fields
_READ_WINDOW = 16


class FsckChunks(Protocol):
    """The chunk store as fsck reads it (a :class:`~ckptvcs.store.ChunkStore`): the index's
    rows, and the verified read path ``load`` uses (for ``read_data``)."""

    @property
    def index(self) -> ChunkIndex: ...

    def read_into(self, chunk_ids: Sequence[bytes], out: memoryview, *, describe: Callable[[], str]) -> list[Future[int]]:
        ...


class FsckRepository(Protocol):
    """Everything fsck reads of a repository (:class:`ckptvcs.Repo` passes itself): its folder
    (config.json, ref files, reflogs, packs, leftovers), refs, objects, chunk store and chunk
    size, and its pruned and staged records, each as ``(id → record, id → why damaged)``."""

    @property
    def root(self) -> Path: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def chunk_size(self) -> int: ...

    @property
    def refs(self) -> Refs: ...

    @property
    def objects(self) -> ObjectStore: ...

    @property
    def chunks(self) -> FsckChunks: ...

    def _pruned_records(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]: ...

    def _staged_records(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]: ...


@dataclass(frozen=True)
class Finding:
    """One problem (or one piece of garbage) fsck found.

    ``objects`` holds the ids of what is damaged or missing (object ids, chunk ids,
    pack names); ``commits`` the commits whose state it affects, ``tensors`` the key
    paths of the tensors holding it, ``refs`` the refs that reach those commits.
    """

    kind: str
    message: str
    objects: tuple[str, ...] = ()
    commits: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.kind in ERROR_KINDS

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class FsckReport:
    """Everything fsck found, plus what it covered."""

    findings: list[Finding] = field(default_factory=list)
    refs: int = 0
    commits: int = 0
    objects: int = 0
    packs: int = 0
    chunks: int = 0
    bytes_read: int = 0
    read_data: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]

    @property
    def garbage(self) -> list[Finding]:
        return [f for f in self.findings if not f.is_error]

    @property
    def ok(self) -> bool:
        """True when nothing is damaged (garbage is allowed)."""
        return not self.errors

    def summary(self) -> str:
        checked = (
            f"checked {self.refs} refs, {self.commits} commits, {self.objects} objects, "
            f"{self.chunks} chunks in {self.packs} packs"
        )
        if self.read_data:
            checked += f" ({self.bytes_read} bytes read and verified)"
        return f"{checked}: {len(self.errors)} problem(s), {len(self.garbage)} garbage item(s)"


def _short(oid: str) -> str:
    return oid[:12]


class _Checker:
    """One fsck run; collects findings into a report."""

    def __init__(self, repo: FsckRepository, read_data: bool, progress: FsckProgress | None) -> None:
        self.repo = repo
        self.read_data = read_data
        self.progress = progress
        self.report = FsckReport(read_data=read_data)
        records, self.damaged_records = repo._pruned_records()
        # A commit with a damaged record may have lost its data to an earlier gc: exempt it from
        # chunk checks like a pruned one; the record itself is reported (check_records).
        self.pruned: dict[str, Any] = {**records, **{c: {"rule": "unknown"} for c in self.damaged_records}}
        self.commit_refs: dict[str, set[str]] = {}  # reachable commit → refs reaching it
        self.commits: dict[str, Commit] = {}
        self.reached: set[str] = set()  # every object id reached from a ref
        self.manifest_ids: list[str] = []
        self.manifest_roots: dict[int, Any] = {}
        self.manifest_commits: dict[int, set[str]] = {}
        # chunk id → [(manifest number, blob number)] of the manifests that list it
        self.usage: dict[bytes, list[tuple[int, int]]] = {}
        self.required: set[bytes] = set()  # chunks some non-pruned reachable commit needs
        self.flagged: set[bytes] = set()  # chunks already reported damaged
        self._tensor_names: dict[int, dict[Any, list[str]]] = {}  # blob key as the manifest has it (unchecked)
        self._failed_commits: list[tuple[str, str]] = []  # commits that did not load, reported later

    # -- reporting helpers ---------------------------------------------------------

    def add(self, kind: str, message: str, *, objects: Iterable[str] = (), commits: Iterable[str] = (),
            tensors: Iterable[str] = ()) -> None:
        commit_list = tuple(dict.fromkeys(commits))
        refs = sorted({r for c in commit_list for r in self.commit_refs.get(c, ())})
        self.report.findings.append(
            Finding(kind, message, tuple(dict.fromkeys(objects)), commit_list, tuple(dict.fromkeys(tensors)), tuple(refs))
        )

    def _where(self, commits: Iterable[str]) -> str:
        refs = sorted({r for c in commits for r in self.commit_refs.get(c, ())})
        return f" (reachable from {', '.join(refs)})" if refs else ""

    def _tensors_of(self, manifest_no: int, blob_no: int) -> list[str]:
        names = self._tensor_names.get(manifest_no)
        if names is None:
            names = {}
            try:
                for path, _, body in iter_tensors(self.manifest_roots.get(manifest_no)):
                    names.setdefault(body.get("blob") if isinstance(body, dict) else None, []).append(path)
            except CorruptObjectError:
                pass
            self._tensor_names[manifest_no] = names
        return names.get(blob_no) or ["(a bytes value)"]

    def users(self, chunk: bytes) -> tuple[list[str], list[str], str]:
        """``(commits, tensors, text)``: who needs a chunk, for a message."""
        pairs: list[tuple[str, str]] = []
        for manifest_no, blob_no in self.usage.get(chunk, ()):
            for commit in sorted(self.manifest_commits.get(manifest_no, ())):
                if commit in self.pruned:
                    continue
                for tensor in self._tensors_of(manifest_no, blob_no):
                    pairs.append((commit, tensor))
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return [], [], "used by no commit"
        by_tensor: dict[str, list[str]] = {}
        for commit, tensor in pairs[:_MAX_NAMED]:
            by_tensor.setdefault(tensor, []).append(_short(commit))
        named = "; ".join(
            f"tensor {t} of commit{'s' if len(cs) > 1 else ''} {', '.join(cs)}" for t, cs in by_tensor.items()
        )
        more = f"; and {len(pairs) - _MAX_NAMED} more" if len(pairs) > _MAX_NAMED else ""
        commits = [c for c, _ in pairs]
        return commits, [t for _, t in pairs], f"needed by {named}{more}{self._where(commits)}"

    # -- objects ---------------------------------------------------------------------

    def read_object(self, oid: str, kind: str, context: str, commits: Iterable[str] = ()) -> Any | None:
        """Read, verify and parse an object; on failure record a finding and return None."""
        self.reached.add(oid)
        commits = list(commits)
        if not self.repo.objects.has(oid):
            self.add("missing", f"{kind} {oid} is missing ({context}){self._where(commits)}",
                     objects=[oid], commits=commits)
            return None
        try:
            return self.repo.objects.get(oid, kind)[1]
        except StorageError as err:
            self.add("unreadable", f"{kind} {oid} cannot be read ({context}): {err}", objects=[oid], commits=commits)
        except CorruptObjectError as err:
            damaged = err.damaged_on_disk
            self.add("hash-mismatch" if damaged else "corrupt",
                     f"{kind} {oid} ({context}) {'fails verification' if damaged else 'is malformed'}: {err}"
                     f"{self._where(commits)}", objects=[oid], commits=commits)
        except IntegrityError as err:
            self.add("hash-mismatch", f"{kind} {oid} ({context}) fails its BLAKE3 check: {err}{self._where(commits)}",
                     objects=[oid], commits=commits)
        return None

    # -- 1. refs and 2. connectivity ------------------------------------------------

    def check_refs(self) -> dict[str, list[str]]:
        """Ref → the commit it names (tips of the walk)."""
        refs = self.repo.refs
        tips: dict[str, list[str]] = {}

        def read(ref: str) -> str | None:
            self.report.refs += 1
            try:
                value = refs.read_raw(ref)
            except CorruptObjectError as err:
                self.add("corrupt", f"{err}; the file holds no valid id", objects=[ref])
                return None
            self.check_ref_bytes(ref, value)
            return value

        head = read(HEAD)
        head_branch = None
        if head is not None and head.startswith("ref: "):
            head_branch = head[len("ref: "):]
            if not head_branch.startswith("refs/heads/"):
                self.add("corrupt", f"HEAD points at {head_branch}, which is not a branch", objects=[HEAD])
            else:
                self.check_head_branch(head_branch)
        elif head is not None:
            tips.setdefault(head, []).append(HEAD)
        for name in refs.names("heads"):
            ref = f"refs/heads/{name}"
            value = read(ref)
            if value is not None:
                if value.startswith("ref: "):
                    self.add("corrupt", f"branch {ref} is a symbolic ref", objects=[ref])
                else:
                    tips.setdefault(value, []).extend([HEAD, ref] if ref == head_branch else [ref])
        for name in refs.names("tags"):
            ref = f"refs/tags/{name}"
            value = read(ref)
            if value is None or value.startswith("ref: "):
                continue
            body = self.read_object(value, "tag", f"the tag object of {ref}")
            if body is None:
                continue
            try:
                tag = Tag.from_json(body, value)
            except CorruptObjectError as err:
                self.add("corrupt", f"tag {value} of {ref} is malformed: {err}", objects=[value, ref])
                continue
            tips.setdefault(tag.object, []).append(ref)
        return tips

    def check_ref_bytes(self, ref: str, value: str | None) -> None:
        """A ref file holds its value and one newline, nothing else (readers strip the rest)."""
        if value is None:
            return
        try:
            data = self.repo.backend.get(ref, max_size=4096)
        except (OSError, CkptvcsError):
            return  # moved meanwhile: the value just read is what counts
        if data.decode("utf-8", "replace").strip() != value:
            return  # a writer moved it meanwhile (fsck runs beside commits)
        if data != f"{value}\n".encode():
            self.add("corrupt", f"ref {ref} is damaged: besides {value[:80]!r} it holds stray bytes "
                     f"({data[:100]!r}); readers still read that value", objects=[ref])

    def check_head_branch(self, ref: str) -> None:
        """HEAD must name a valid branch, and one that exists unless HEAD never held a commit."""
        name = ref[len("refs/heads/"):]
        try:
            check_ref_name(name, "branch")
        except InvalidRefNameError as err:
            self.add("corrupt", f"HEAD is damaged: it points at {ref!r}, not a valid branch ({err})", objects=[HEAD])
            return
        if name in self.repo.refs.names("heads"):
            return
        # An unborn branch is normal (a new repository), unless HEAD held a commit before.
        last = next(iter(self.repo.refs.reflog(HEAD)), None)
        if last is not None and last.new != ZERO_ID:
            self.add("corrupt", f"HEAD points at branch {name}, which does not exist, yet its reflog says it last "
                     f"held commit {_short(last.new)}: HEAD or that branch is damaged (point HEAD back with "
                     "`ckptvcs checkout <branch>`)", objects=[HEAD])

    def walk_commits(self, tips: dict[str, list[str]]) -> None:
        """Parse every reachable commit; record which refs reach each one."""
        for tip, names in tips.items():
            stack = [(tip, f"named by {', '.join(names)}")]
            seen: set[str] = set()
            while stack:
                oid, context = stack.pop()
                if oid in seen:
                    continue
                seen.add(oid)
                first_visit = oid not in self.commit_refs
                self.commit_refs.setdefault(oid, set()).update(names)
                if first_visit:
                    self._load_commit(oid, context)
                commit = self.commits.get(oid)
                if commit is not None:
                    stack.extend((p, f"parent of commit {_short(oid)}") for p in commit.parents)
        # Report commits that failed to load only now that their refs are all known.
        for oid, context in self._failed_commits:
            self._report_commit(oid, context)

    def _load_commit(self, oid: str, context: str) -> None:
        self.report.commits += 1
        if self.progress is not None:
            self.progress("commits", self.report.commits, 0)
        self.reached.add(oid)
        try:
            body = self.repo.objects.get(oid, "commit")[1]
            self.commits[oid] = Commit.from_json(body, oid)
        except (CkptvcsError, OSError):
            self._failed_commits.append((oid, context))

    def _report_commit(self, oid: str, context: str) -> None:
        body = self.read_object(oid, "commit", context, commits=[oid])
        if body is not None:
            try:
                Commit.from_json(body, oid)
            except CorruptObjectError as err:
                self.add("corrupt", f"commit {oid} ({context}) is malformed: {err}{self._where([oid])}",
                         objects=[oid], commits=[oid])

    def check_manifests(self) -> None:
        by_id: dict[str, int] = {}
        chunk_size = self.repo.chunk_size
        for oid, commit in self.commits.items():
            number = by_id.get(commit.manifest)
            if number is not None:
                self.manifest_commits[number].add(oid)
                continue
            number = by_id[commit.manifest] = len(self.manifest_ids)
            self.manifest_ids.append(commit.manifest)
            self.manifest_commits[number] = {oid}
            body = self.read_object(commit.manifest, "manifest", f"the state of commit {_short(oid)}", commits=[oid])
            if body is None:
                continue
            try:
                manifest = Manifest.parse(commit.manifest, body)
                # Every node as `load` decodes it (tensor layouts, dtypes, blob references),
                # against stand-in blobs: no chunk is read.
                validate_tree(manifest.root, [blob["nbytes"] for blob in manifest.blobs])
            except (CorruptObjectError, RecursionError, RuntimeError, ValueError, TypeError, OverflowError) as err:
                self.add("corrupt", f"manifest {commit.manifest} of commit {_short(oid)} is malformed "
                         f"(load would refuse it): {err}", objects=[commit.manifest], commits=[oid])
                continue
            self.manifest_roots[number] = manifest.root
            for blob_no, blob in enumerate(manifest.blobs):
                chunks = blob["chunks"]
                if len(chunks) != -(-blob["nbytes"] // chunk_size):
                    self.add("corrupt", f"manifest {commit.manifest} blob {blob_no} lists {len(chunks)} chunks "
                             f"for {blob['nbytes']} bytes", objects=[commit.manifest], commits=[oid])
                for chunk in chunks:
                    self.usage.setdefault(bytes.fromhex(chunk), []).append((number, blob_no))
        # Manifests shared by several commits: attribute after all commits are known.
        for chunk, pairs in self.usage.items():
            if any(c not in self.pruned for m, _ in pairs for c in self.manifest_commits[m]):
                self.required.add(chunk)

    def check_config(self) -> None:
        """The fields of config.json that opening the repository does not need (docs/format.md section 3)."""
        try:
            config = json.loads(self.repo.backend.get(layout.CONFIG))
        except (OSError, ValueError, CkptvcsError) as err:
            self.add("corrupt", f"config.json cannot be read: {err}", objects=["config.json"])
            return
        problems = [f"field {name!r} is missing" for name in _CONFIG_WRITTEN if name not in config]
        if config.get("hash", "blake3") != "blake3":
            problems.append(f"hash is {config['hash']!r}, not 'blake3'")
        if not re.fullmatch(r"[0-9a-f]{32}", str(config.get("id", "0" * 32))):
            problems.append(f"id {config['id']!r} is not 32 hex digits")
        created = str(config.get("created", "2000-01-01T00:00:00Z"))
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", created):
            problems.append(f"created {created!r} is not a UTC ISO 8601 time")
        if not isinstance(config.get("verify_encoding", True), bool):
            problems.append("verify_encoding is not true or false")
        if problems:
            self.add("corrupt", f"config.json is damaged: {'; '.join(problems)}", objects=["config.json"])

    def check_records(self) -> None:
        """Pruned records that do not parse, and reflog lines that do not."""
        for commit_id, why in self.damaged_records.items():
            self.add("corrupt", f"{why}; gc refuses to run until the record is fixed (delete pruned/{commit_id} "
                     f"to keep commit {_short(commit_id)}'s data){self._where([commit_id])}",
                     objects=[f"pruned/{commit_id}"], commits=[commit_id])
        self.check_staged_records()
        for key in self.repo.backend.list(layout.LOGS):
            self.check_reflog(key, key)
        self.check_audit_log()

    def check_audit_log(self) -> None:
        """The audit log's hash chain (docs/audit.md): a break is damage, a torn last line garbage."""
        verdict = check_audit(self.repo.backend, self.repo.refs, lambda c: self.repo.objects.read_commit(c).parents)
        rel = f"{AUDIT_DIR}/{LOG_NAME}"
        for problem in verdict.problems:
            self.add("corrupt", f"audit log {rel} is damaged: {problem}", objects=[rel])
        for note in verdict.notes:
            if "last line" in note:
                self.add("garbage", f"audit log {rel}: {note}", objects=[rel])
        folder = self.repo.root / AUDIT_DIR
        for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
            if name.startswith("."):  # atomic_write's temp file of head.json, left by a crash
                self.add("garbage", f"{AUDIT_DIR}/{name} is left over from an interrupted write",
                         objects=[f"{AUDIT_DIR}/{name}"])

    def check_staged_records(self) -> None:
        """Staged, unpublished states (Repo.stage): garbage awaiting publish or the staged grace, never damage."""
        records, damaged = self.repo._staged_records()
        for manifest_id, record in records.items():
            self.add("garbage", f"staged/{manifest_id}: a state staged on {record.get('time')} and not published; "
                     "gc keeps its data until the staged grace expires, then reclaims it",
                     objects=[f"staged/{manifest_id}"])
        for name, why in damaged.items():
            self.add("garbage", f"{why}; gc reclaims its staged data once the file is older than the staged grace",
                     objects=[f"staged/{name}"])

    def check_reflog(self, key: str, rel: str) -> None:
        """Every complete line of a reflog must parse; a torn last line (a crash mid-append) is garbage."""
        try:
            text = self.repo.backend.get(key).decode("utf-8")
        except CorruptObjectError as err:  # a link or a special file in logs/
            self.add("corrupt", f"reflog {rel} is damaged: {err}", objects=[rel])
            return
        except UnicodeDecodeError as err:
            self.add("corrupt", f"reflog {rel} is damaged: it is not UTF-8 ({err})", objects=[rel])
            return
        except OSError as err:
            self.add("unreadable", f"reflog {rel} cannot be read: {err}", objects=[rel])
            return
        lines = text.split("\n")
        torn = lines.pop()
        bad = [n for n, line in enumerate(lines, 1) if not REFLOG_LINE.match(line)]
        if bad:
            shown = ", ".join(map(str, bad[:_MAX_NAMED]))
            if len(bad) > _MAX_NAMED:
                shown += f" and {len(bad) - _MAX_NAMED} more"
            self.add("corrupt", f"reflog {rel} is damaged: line{'s' if len(bad) > 1 else ''} {shown} of {len(lines)} "
                     f"do{'' if len(bad) > 1 else 'es'} not parse (readers skip them)", objects=[rel])
        if torn:
            self.add("garbage", f"reflog {rel} ends in a torn line (a crash while appending, or damage); "
                     "readers skip it", objects=[rel])

    # -- 3. index and packs -----------------------------------------------------------

    def read_index(self) -> dict[bytes, PackEntry]:
        try:
            return {entry.chunk_id: entry for entry in self.repo.chunks.index}
        except Exception as err:  # StorageError, or lmdb's own error types for a damaged file
            self.add("corrupt", f"the chunk index cannot be read ({err}); rebuild it with `ckptvcs repair index`",
                     objects=["index"])
            return {}

    def read_packs(self) -> tuple[dict[str, dict[int, PackEntry]], dict[bytes, list[PackEntry]], set[str]]:
        """``(pack → offset → entry, chunk → entries holding it, damaged packs)``."""
        backend = self.repo.backend
        local = backend.local_root()
        folder = self.repo.root / layout.PACKS if local is None else local / layout.PACKS
        if local is not None:  # a local folder may hold strays (named below); keys are packs only
            names = sorted(os.listdir(folder)) if folder.is_dir() else []
        else:
            names = [key[len(layout.PACKS) + 1:] for key in backend.list(layout.PACKS)]
            names = self.check_pack_indexes(names)
        packs: dict[str, dict[int, PackEntry]] = {}
        located: dict[bytes, list[PackEntry]] = {}
        damaged: set[str] = set()
        for done, name in enumerate(names, 1):
            if self.progress is not None:
                self.progress("packs", done, len(names))
            path = folder / name
            if not _PACK_NAME.match(name) or (local is not None and not path.is_file()):
                self.add("garbage", f"packs/{name} is not a pack file", objects=[f"packs/{name}"])
                continue
            pack = name[:-5]
            try:
                entries = list(iter_backend_pack(backend, pack))
            except CorruptObjectError as err:
                damaged.add(pack)
                entries = list(iter_backend_pack(backend, pack, strict=False))
                self.add("corrupt", f"{err}; {len(entries)} well-formed entry headers remain around the damage "
                         "(`ckptvcs repair index` indexes those that verify)", objects=[pack])
            except OSError as err:
                damaged.add(pack)
                entries = []
                self.add("unreadable", f"pack {pack} cannot be read: {err}", objects=[pack])
            packs[pack] = {e.offset: e for e in entries}
            for entry in entries:
                located.setdefault(entry.chunk_id, []).append(entry)
        self.report.packs = len(packs)
        return packs, located, damaged

    def check_pack_indexes(self, names: list[str]) -> list[str]:
        """``names`` without the pack index objects (``<pack>.idx``) of a store without local
        files, each checked: a damaged one is reported (readers walk that pack's headers
        instead), one of no pack is garbage."""
        packs = {n[: -len(layout.PACK_SUFFIX)] for n in names if _PACK_NAME.match(n)}
        rest = []
        for name in names:
            stem = name.removesuffix(layout.PACK_INDEX_SUFFIX)
            if stem == name or not _PACK_NAME.match(stem + layout.PACK_SUFFIX):
                rest.append(name)
            elif stem not in packs:
                self.add("garbage", f"packs/{name} is the index of no pack", objects=[f"packs/{name}"])
            else:
                try:
                    read_pack_index(self.repo.backend, stem)
                except CorruptObjectError as err:
                    self.add("corrupt", f"{err} (derived data: readers walk the pack's own headers instead)",
                             objects=[f"packs/{name}"])
                except OSError as err:
                    self.add("unreadable", f"packs/{name} cannot be read: {err}", objects=[f"packs/{name}"])
        return rest

    def check_index(self, index: dict[bytes, PackEntry], packs: dict[str, dict[int, PackEntry]],
                    damaged: set[str]) -> None:
        missing_packs: dict[str, list[bytes]] = {}
        for chunk, entry in index.items():
            in_pack = packs.get(entry.pack)
            if in_pack is None:
                missing_packs.setdefault(entry.pack, []).append(chunk)
                continue
            found = in_pack.get(entry.offset)
            if found is None and entry.pack in damaged:
                self.flagged.add(chunk)
                commits, tensors, users = self.users(chunk)
                self.add("missing", f"chunk {chunk.hex()} is lost: its entry header in damaged pack {entry.pack} "
                         f"(payload at offset {entry.offset}) is damaged or torn; {users}",
                         objects=[chunk.hex(), entry.pack], commits=commits, tensors=tensors)
                continue
            if found is None or (found.chunk_id, found.codec, found.raw_len, found.stored_len,
                                 found.base) != (
                entry.chunk_id, entry.codec, entry.raw_len, entry.stored_len, entry.base
            ):
                self.flagged.add(chunk)
                commits, tensors, users = self.users(chunk)
                self.add("index-mismatch", f"index entry of chunk {chunk.hex()} does not match pack {entry.pack} "
                         f"at offset {entry.offset}; {users}", objects=[chunk.hex(), entry.pack],
                         commits=commits, tensors=tensors)
            base = entry.base
            if base is not None and base not in index:
                self.flagged.add(chunk)
                commits, tensors, users = self.users(chunk)
                self.add("missing", f"delta base {base.hex()} of chunk {chunk.hex()} is not in the index; {users}",
                         objects=[base.hex(), chunk.hex()], commits=commits, tensors=tensors)
            elif chunk not in self.flagged:
                self.check_decodable(entry, index)
        for pack, chunks in missing_packs.items():
            self.flagged.update(chunks)
            needed = [c for c in chunks if c in self.required]
            commits = []
            tensors = []
            for chunk in needed:
                c, t, _ = self.users(chunk)
                commits += c
                tensors += t
            lost = (f"{len(needed)} of its {len(chunks)} indexed chunks are needed" if needed else
                    f"none of its {len(chunks)} indexed chunks is needed now, but a new commit would trust "
                    "the index and skip storing them: run `ckptvcs repair index`")
            self.add("missing", f"pack {pack} is missing; {lost}"
                     + (f" by {len(set(commits))} commit(s): {', '.join(sorted({_short(c) for c in commits}))}"
                        f"{self._where(commits)}" if needed else ""),
                     objects=[pack, *(c.hex() for c in needed)], commits=commits, tensors=tensors)

    def check_decodable(self, entry: PackEntry, index: dict[bytes, PackEntry]) -> None:
        """What a read of this entry would refuse before decoding a byte: an unknown codec,
        a codec and base that disagree, a delta chain that loops, is too long or changes size."""
        problem = None
        if entry.codec not in CODEC_NAMES:
            problem = f"has unknown codec {entry.codec}"
        elif (entry.codec in USES_BASE) != (entry.base is not None):
            problem = "names a delta base its codec does not use" if entry.base else "is a delta that names no base"
        else:
            seen = {entry.chunk_id}
            link = entry
            while link.base is not None and problem is None:
                base = index.get(link.base)
                if base is None:
                    break  # reported as a missing base on its own entry
                if base.chunk_id in seen:
                    problem = f"has a delta chain that loops back to chunk {base.chunk_id.hex()}"
                elif len(seen) > MAX_CHAIN_LENGTH:
                    problem = f"has a delta chain longer than {MAX_CHAIN_LENGTH}"
                elif base.raw_len != link.raw_len:
                    problem = f"has a delta base {base.chunk_id.hex()} of {base.raw_len} bytes, not {link.raw_len}"
                seen.add(base.chunk_id)
                link = base
        if problem is not None:
            self.flagged.add(entry.chunk_id)
            commits, tensors, users = self.users(entry.chunk_id)
            self.add("corrupt", f"chunk {entry.chunk_id.hex()} in pack {entry.pack} {problem}: it cannot be read; "
                     f"{users}", objects=[entry.chunk_id.hex(), entry.pack], commits=commits, tensors=tensors)

    def check_required_chunks(self, index: dict[bytes, PackEntry], located: dict[bytes, list[PackEntry]]) -> None:
        for chunk in sorted(self.required):
            if chunk in index:
                continue
            self.flagged.add(chunk)
            commits, tensors, users = self.users(chunk)
            holders = located.get(chunk)
            if holders:
                self.add("index-mismatch", f"chunk {chunk.hex()} is in pack {holders[0].pack} but not in the index; "
                         f"{users}; run `ckptvcs repair index`", objects=[chunk.hex(), holders[0].pack],
                         commits=commits, tensors=tensors)
            else:
                self.add("missing", f"chunk {chunk.hex()} is missing (in no pack and not indexed); {users}",
                         objects=[chunk.hex()], commits=commits, tensors=tensors)

    # -- 4. garbage ------------------------------------------------------------------------

    def check_garbage(self, index: dict[bytes, PackEntry], packs: dict[str, dict[int, PackEntry]]) -> None:
        used = with_delta_bases(self.usage, index)
        for pack, entries in packs.items():
            if not any(e.chunk_id in used for e in entries.values()):
                self.add("garbage", f"pack {pack} holds no chunk any reachable commit uses "
                         "(left by an interrupted or removed commit; gc deletes it)", objects=[pack])
        unused = [c for c in index if c not in used]
        if unused:
            self.add("garbage", f"{len(unused)} indexed chunk(s) are used by no reachable commit", objects=[])
        self.check_loose_objects()
        self.check_leftover_files()

    def check_loose_objects(self) -> None:
        objects = self.repo.objects
        unreachable: dict[str, str] = {}
        parents_of_unreachable: set[str] = set()
        for oid in objects:
            self.report.objects += 1
            if oid in self.reached:
                continue
            try:
                kind, body = objects.get(oid)
            except StorageError as err:
                self.add("unreadable", f"object {oid} cannot be read: {err}", objects=[oid])
                continue
            except CorruptObjectError as err:
                self.add("hash-mismatch" if err.damaged_on_disk else "corrupt",
                         f"unreachable object {oid} is damaged: {err}", objects=[oid])
                continue
            except IntegrityError as err:
                self.add("hash-mismatch", f"unreachable object {oid}: {err}", objects=[oid])
                continue
            unreachable[oid] = kind
            if kind == "commit" and isinstance(body, dict) and isinstance(body.get("parents"), list):
                parents_of_unreachable.update(p for p in body["parents"] if isinstance(p, str))
        for oid, kind in unreachable.items():
            if kind == "commit" and oid not in parents_of_unreachable:
                fate = ("its data was collected by gc" if "collected" in self.pruned.get(oid, {}) else
                        "gc collects its data once no unexpired reflog entry names it")
                self.add("dangling", f"dangling commit {oid}: no ref reaches it (an interrupted or "
                         f"conflicting commit, a deleted branch or a detached HEAD's; {fate})", objects=[oid])
            else:
                self.add("unreachable", f"unreachable {kind} {oid}", objects=[oid])
        objects_dir = objects.root  # leftover temporaries exist only in a local store
        for folder in sorted(objects_dir.iterdir()) if objects_dir is not None and objects_dir.is_dir() else []:
            for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
                if len(folder.name) != 2 or len(name) != 62:
                    self.add("garbage", f"objects/{folder.name}/{name} is a leftover temporary file",
                             objects=[f"objects/{folder.name}/{name}"])

    def check_leftover_files(self) -> None:
        root = self.repo.backend.local_root()
        if root is None:
            return  # temporaries, index rebuilds and lock files exist only in a local store
        tmp = root / layout.TMP
        for name in sorted(os.listdir(tmp)) if tmp.is_dir() else []:
            self.add("garbage", f"tmp/{name} is left over from an interrupted write", objects=[f"tmp/{name}"])
        for name in sorted(os.listdir(root)):
            if name.startswith((layout.INDEX_REBUILD_PREFIX, layout.INDEX_OLD_PREFIX)) or name == layout.INDEX_REBUILT:
                self.add("garbage", f"{name} is left over from an interrupted `repair index`", objects=[name])
        for path in sorted([root / layout.lock_key(layout.HEAD), *root.joinpath(layout.REFS).rglob("*" + layout.LOCK_SUFFIX)]):
            if path.is_file() and _fs.lock_file_is_stale(path):
                rel = path.relative_to(root).as_posix()
                self.add("garbage", f"{rel} is a stale lock of a process that died; the next update breaks it",
                         objects=[rel])

    # -- 5. data -------------------------------------------------------------------------------

    def verify_data(self, index: dict[bytes, PackEntry]) -> None:
        store = self.repo.chunks
        todo = sorted((e for c, e in index.items() if c not in self.flagged), key=lambda e: (e.pack, e.offset))
        total = sum(e.raw_len for e in todo)
        done = 0
        pending: deque[tuple[PackEntry, Future[int]]] = deque()

        def finish(entry: PackEntry, fut: Future[int]) -> None:
            nonlocal done
            try:
                fut.result()
                self.report.bytes_read += entry.raw_len
            except StorageError as err:
                commits, tensors, users = self.users(entry.chunk_id)
                self.add("unreadable", f"chunk {entry.chunk_id.hex()} in pack {entry.pack} cannot be read: {err}; "
                         f"{users}", objects=[entry.chunk_id.hex(), entry.pack], commits=commits, tensors=tensors)
            except IntegrityError as err:
                commits, tensors, users = self.users(entry.chunk_id)
                where = f"chunk {entry.chunk_id.hex()} in pack {entry.pack}"
                self.add("hash-mismatch", f"{where} at offset {entry.offset} {_chunk_reason(entry, err)}; {users}",
                         objects=[entry.chunk_id.hex(), entry.pack], commits=commits, tensors=tensors)
            done += entry.raw_len
            if self.progress is not None:
                self.progress("data", done, total)

        for entry in todo:
            buffer = bytearray(entry.raw_len)
            try:
                futures = store.read_into([entry.chunk_id], memoryview(buffer),
                                          describe=lambda e=entry: f"chunk {e.chunk_id.hex()}")  # type: ignore[misc]
            except CkptvcsError as err:
                failed: Future[int] = Future()
                failed.set_exception(err)
                futures = [failed]
            pending.append((entry, futures[0]))
            if len(pending) >= _READ_WINDOW:
                finish(*pending.popleft())
        for item in pending:
            finish(*item)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> FsckReport:
        tips = self.check_refs()
        self.walk_commits(tips)
        self.check_manifests()
        self.check_records()
        self.check_config()
        index = self.read_index()
        packs, located, damaged = self.read_packs()
        self.report.chunks = len(index)
        self.check_index(index, packs, damaged)
        self.check_required_chunks(index, located)
        if self.read_data:
            self.verify_data(index)
        self.check_garbage(index, packs)
        return self.report


def _chunk_reason(entry: PackEntry, err: IntegrityError) -> str:
    """What a failed read of ``entry`` found, from the error's fields.

    The store names the chunk that failed: ``entry`` itself, or a chunk of its delta
    chain (a base); errors without those fields are quoted whole.
    """
    if err.chunk_id is None or err.problem is None:
        return f"does not verify ({err})"
    if err.chunk_id == entry.chunk_id.hex():
        return err.problem
    where = f" in pack {err.pack}" if err.pack is not None else ""
    return f"does not verify (chunk {err.chunk_id}{where} of its delta chain {err.problem})"


def check_repository(repo: FsckRepository, *, read_data: bool = False, progress: FsckProgress | None = None) -> FsckReport:
    """Run every check on ``repo`` (see the module docstring); never writes."""
    return _Checker(repo, read_data, progress).run()

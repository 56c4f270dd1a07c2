"""push, fetch, pull and clone between a local Repo and a remote (docs/remotes.md).

Push order, the remote's write sequence: whole sealed packs (each ``.pack`` then its
``.idx``) → objects (manifests, commits, tags) → each remote ref by compare-and-swap, LAST.
The ref swap is the commit point: a push cut anywhere before it leaves the remote ref on
its old, complete commit (plus unreferenced packs and objects that the next push reuses:
every key is content-addressed or a random pack name, written with ``if_absent``).

Fetch order, the local write sequence, all under the repository's shared lock (so gc
cannot collect what arrives before a ref names it): packs are downloaded into ``tmp/``,
their entries checked against the remote index, renamed into ``packs/`` and indexed, then
EVERY chunk they bring is read back through the verified read path (BLAKE3 of the decoded
bytes against the id); objects are verified the same way; only then do the
remote-tracking refs ``refs/remotes/<name>/<branch>`` move. A damaged pack or object is
refused (IntegrityError naming it) and its rows are taken out of the index again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptvcs import _fs
from ckptvcs.backends.base import Backend, ConcurrentUpdate
from ckptvcs.errors import (
    CorruptObjectError,
    IntegrityError,
    NonFastForwardError,
    RevisionNotFoundError,
    StorageError,
    UsageError,
)
from ckptvcs.history import reachable, reachable_in_order
from ckptvcs.objects import ObjectStore
from ckptvcs.pack import PackEntry, iter_pack_entries, with_delta_bases
from ckptvcs.refs import HEAD, is_valid_ref
from ckptvcs.remotes.config import add_remote, get_remote, open_backend, set_lazy_remote
from ckptvcs.remotes.layout import RemoteStore, encode_pack_index, index_key, object_key, pack_key

if TYPE_CHECKING:
    from ckptvcs.repo import Repo

__all__ = ["push", "fetch", "pull", "clone", "PushReport", "FetchReport", "connect"]

Progress = Callable[[int, int], None]
DEFAULT_WORKERS = 4
_BLOCK = 8 << 20  # bytes per ranged read or streamed write
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_WHO = "ckptvcs remote"


@dataclass
class PushReport:
    """What a push did: ``updated`` ref → (old, new); ``up_to_date`` refs; what was sent."""

    remote: str
    updated: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    up_to_date: list[str] = field(default_factory=list)
    packs_sent: list[str] = field(default_factory=list)
    objects_sent: int = 0
    bytes_sent: int = 0


@dataclass
class FetchReport:
    """What a fetch did: remote-tracking ``updated`` ref → (old, new); what arrived."""

    remote: str
    updated: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    remote_refs: dict[str, str] = field(default_factory=dict)
    packs_received: list[str] = field(default_factory=list)
    objects_received: int = 0
    bytes_received: int = 0
    chunks_verified: int = 0


class _Counter:
    """Thread-safe byte counter feeding an optional Progress(done, total)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:  # one thread at a time reports (a progress bar is not thread-safe)
            self.done += n
            if self._progress is not None:
                self._progress(self.done, self.total)


def connect(repo: Repo | None, remote: str | Backend, endpoint_url: str | None = None) -> tuple[RemoteStore, str | None]:
    """``(RemoteStore, remote name or None)`` for a configured remote name, a URL or a Backend."""
    if not isinstance(remote, str):
        return RemoteStore(remote), None
    if repo is not None and "://" not in remote and "/" not in remote and remote not in (".", ".."):
        cfg = get_remote(repo, remote)
        return RemoteStore(open_backend(cfg.url, endpoint_url or cfg.endpoint_url)), cfg.name
    return RemoteStore(open_backend(remote, endpoint_url)), None


def _parallel(workers: int, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    items = list(items)
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="ckptvcs-remote") as pool:
        return list(pool.map(fn, items))


def _local_parents(repo: Repo) -> Callable[[str], list[str]]:
    return lambda oid: list(repo.objects.read_commit(oid).parents)


def _peel_local(repo: Repo, oid: str) -> str | None:
    """The commit a local object id names (tags peeled), or None when unknown here."""
    while repo.objects.has(oid):
        kind = repo.objects.kind(oid)
        if kind == "commit":
            return oid
        if kind != "tag":
            return None
        oid = repo.objects.read_tag(oid).object
    return None


def _is_ancestor(repo: Repo, ancestor: str, descendant: str) -> bool:
    return ancestor in reachable(_local_parents(repo), [descendant])


def _manifest_chunks(body: Any) -> Iterator[bytes]:
    for blob in body.get("blobs", []):
        for chunk in blob.get("chunks", []):
            yield bytes.fromhex(chunk)


# -- push --------------------------------------------------------------------------------


def _push_refs(repo: Repo, refs: Iterable[str] | None) -> dict[str, str]:
    """Local ref → value for what to push (default: the current branch)."""
    if refs is None:
        branch, _ = repo.head()
        if branch is None:
            raise UsageError("HEAD is detached: name the branch or tag to push")
        refs = [branch]
    out: dict[str, str] = {}
    for name in refs:
        candidates = [name] if name.startswith("refs/") else [f"refs/heads/{name}", f"refs/tags/{name}"]
        for ref in candidates:
            if not is_valid_ref(ref) or not ref.startswith(("refs/heads/", "refs/tags/")):
                continue
            value = repo.refs.read_raw(ref)
            if value is not None and _HEX_ID.match(value):
                out[ref] = value
                break
        else:
            raise RevisionNotFoundError(f"no local branch or tag named {name!r} to push")
    return out


def push(
    repo: Repo,
    remote: str | Backend,
    refs: Iterable[str] | None = None,
    *,
    force: bool = False,
    endpoint_url: str | None = None,
    progress: Progress | None = None,
    workers: int = DEFAULT_WORKERS,
) -> PushReport:
    """Upload what ``remote`` (a configured name or a URL) lacks for ``refs``, then move its refs.

    ``refs``: branch or tag names (default: the current branch). A remote branch moves
    only forward (its commit must be an ancestor of the pushed one) unless ``force``; a
    remote tag never moves unless ``force``. Otherwise NonFastForwardError, and nothing
    moves. Two pushers to one branch: one wins, the other's compare-and-swap fails
    (NonFastForwardError: fetch, and push on top). Safe to retry after any interruption.
    """
    repo._check_process()
    store, name = connect(repo, remote, endpoint_url)
    wanted = _push_refs(repo, refs)
    config = store.initialize({"chunk_size": repo.chunk_size, "keyframe_interval": repo.chunks.keyframe_interval,
                               "id": repo.config.get("id")}, default_branch=(repo.head()[0] or "main"))
    if config.get("chunk_size") != repo.chunk_size:
        raise UsageError(f"{store.describe()} holds chunks of {config.get('chunk_size')} bytes, this repository "
                         f"{repo.chunk_size}: a remote serves repositories of one chunk size (clone it instead)")
    report = PushReport(store.describe())
    remote_refs = store.refs()
    moves: dict[str, tuple[str | None, str]] = {}
    for ref, new in wanted.items():
        old = remote_refs.get(ref)
        if old == new:
            report.up_to_date.append(ref)
            continue
        if old is not None and not force:
            _check_fast_forward(repo, store, ref, old, new)
        moves[ref] = (old, new)
    if moves:
        have = {c for c in (_peel_local(repo, v) for v in remote_refs.values()) if c is not None}
        have_all = reachable(_local_parents(repo), have)
        tips = [c for c in (_peel_local(repo, new) for _, new in moves.values()) if c is not None]
        commits = reachable_in_order(_local_parents(repo), tips, have_all)
        tag_ids = [new for _, new in moves.values()]
        with repo._lock.hold(exclusive=False):  # no gc rewrites or deletes a pack while it is read for upload
            # Chunks of commits the remote pruned may be gone there (gc --remote): they do not count as held.
            _send_data(repo, store, commits, have_all - store.pruned_ids(), tag_ids, report, progress, workers)
            # A remote gc may have deleted what this push relies on since it looked: check it all and
            # upload again what is missing, just before the commit point (docs/remotes.md, the race).
            _send_data(repo, store, commits, have_all - store.pruned_ids(), tag_ids, report, None, workers,
                       every_pack=True)
        for ref, (old, new) in moves.items():
            try:
                store.swap_ref(ref, old, new)  # the commit point
            except ConcurrentUpdate as err:
                current = err.current.decode("utf-8", "replace").strip() if err.current else None
                raise NonFastForwardError(
                    f"push rejected: {ref} on {store.describe()} moved to {_short(current)} while pushing "
                    f"(another push won); fetch, then push on top of it",
                    ref=ref, current=current, proposed=new,
                ) from None
            report.updated[ref] = (old, new)
            if name is not None:
                _update_tracking(repo, name, ref, new)
        with repo._lock.hold(exclusive=False):  # and once after it: repairs a delete that raced the swap
            _send_data(repo, store, commits, have_all - store.pruned_ids(), tag_ids, report, None, workers,
                       every_pack=True)
    return report


def _short(value: str | None) -> str:
    return value[:12] if value else "nothing"


def _check_fast_forward(repo: Repo, store: RemoteStore, ref: str, old: str, new: str) -> None:
    if ref.startswith("refs/tags/"):
        raise NonFastForwardError(
            f"push rejected: tag {ref.removeprefix('refs/tags/')} already exists on {store.describe()} "
            f"at {_short(old)}; tags do not move (use force to replace it)", ref=ref, current=old, proposed=new)
    new_commit = _peel_local(repo, new)
    old_commit = _peel_local(repo, old)
    if old_commit is None or new_commit is None or not _is_ancestor(repo, old_commit, new_commit):
        raise NonFastForwardError(
            f"push rejected (non-fast-forward): {ref} on {store.describe()} is at {_short(old)}, which "
            f"{'is unknown here' if old_commit is None else 'is not an ancestor of ' + _short(new)}; fetch and "
            "look at the remote's history, push to a new branch, or use force to overwrite it",
            ref=ref, current=old, proposed=new)


def _send_data(repo: Repo, store: RemoteStore, commits: list[str], have: set[str], tag_ids: list[str],
               report: PushReport, progress: Progress | None, workers: int, *, every_pack: bool = False) -> None:
    """Packs, then objects, for ``commits`` (and the tag objects among ``tag_ids``).

    ``have``: commits the remote's refs reach, so the remote holds their chunks (invariant 1):
    those chunks are not sent again even when a local gc has moved them to a new pack.
    ``every_pack``: check each needed pack on the remote (its size, then its index) instead of
    trusting the listing of indexes: the re-check around the ref swap.
    """
    objects: list[str] = []
    needed: set[bytes] = set()
    for commit_id in commits:
        commit = repo.objects.read_commit(commit_id)
        objects += [commit.manifest, commit_id]
        needed.update(_manifest_chunks(repo.objects.get(commit.manifest, "manifest")[1]))
    for commit_id in have:
        if not needed:
            break
        with contextlib.suppress(CorruptObjectError, IntegrityError):  # unreadable here: just send the chunks
            needed.difference_update(_manifest_chunks(repo.objects.get(repo.objects.read_commit(commit_id).manifest,
                                                                       "manifest")[1]))
    objects += [t for t in tag_ids if repo.objects.has(t) and repo.objects.kind(t) == "tag"]
    index = repo.chunks.index
    entries: dict[bytes, PackEntry] = {}
    for chunk_id in needed:
        entry = index.get(chunk_id)
        if entry is None:
            raise IntegrityError(f"chunk {chunk_id.hex()} is missing locally (collected or damaged): run "
                                 "`ckptvcs fsck`; its history cannot be pushed", chunk_id=chunk_id.hex())
        entries[chunk_id] = entry
    frontier = [e.base for e in entries.values() if e.base is not None and e.base not in entries]
    while frontier:
        base = frontier.pop()
        entry = index.get(base)
        if entry is None:
            raise IntegrityError(f"delta base chunk {base.hex()} is missing locally: run `ckptvcs fsck`",
                                 chunk_id=base.hex())
        entries[base] = entry
        if entry.base is not None and entry.base not in entries:
            frontier.append(entry.base)
    on_remote = set() if every_pack else store.pack_names()
    packs = sorted({e.pack for e in entries.values()} - on_remote)
    sizes = {p: (repo.root / "packs" / f"{p}.pack").stat().st_size for p in packs}
    counter = _Counter(sum(sizes.values()), progress)

    def send_pack(pack: str) -> int:
        if every_pack:
            try:
                whole = store.backend.size(pack_key(pack)) == sizes[pack] and store.backend.size(index_key(pack))
            except OSError as err:
                raise StorageError(f"{store.describe()}: looking up pack {pack} failed: {err}") from None
            if whole:
                return 0
        return _upload_pack(repo.root / "packs" / f"{pack}.pack", pack, store, counter)

    sent = _parallel(workers, send_pack, packs)
    report.packs_sent += [p for p, n in zip(packs, sent) if n and p not in report.packs_sent]
    report.bytes_sent += sum(sent)

    def send_object(oid: str) -> int:
        if store.has_object(oid):
            return 0
        stored = repo.objects.path(oid).read_bytes()
        return len(stored) if store.put_object(oid, stored) else 0

    object_bytes = _parallel(workers, send_object, list(dict.fromkeys(objects)))
    report.objects_sent += sum(1 for n in object_bytes if n)
    report.bytes_sent += sum(object_bytes)


def _upload_pack(path: Path, pack: str, store: RemoteStore, counter: _Counter) -> int:
    """Upload one sealed pack, then its index (the index marks it complete). Bytes sent."""
    size = path.stat().st_size
    entries = list(iter_pack_entries(path))  # the pack's own headers, checked against its footer
    sent = 0
    backend = store.backend
    try:
        if backend.size(pack_key(pack)) != size:
            writer = backend.open_writer(pack_key(pack))
            try:
                with open(path, "rb") as f:
                    while block := f.read(_BLOCK):
                        writer.write(block)
                        counter.add(len(block))
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            sent += size
        else:
            counter.add(size)
    except OSError as err:
        raise StorageError(f"{store.describe()}: uploading pack {pack} failed: {err}") from None
    data = encode_pack_index(size, entries)
    if store.put_pack_index(pack, data):
        sent += len(data)
    return sent


def _update_tracking(repo: Repo, name: str, ref: str, new: str | None) -> None:
    """Move ``refs/remotes/<name>/<branch>`` to what the remote holds (branches only)."""
    if not ref.startswith("refs/heads/"):
        return
    tracking = f"refs/remotes/{name}/{ref.removeprefix('refs/heads/')}"
    if not is_valid_ref(tracking):
        return
    current = repo.refs.read_raw(tracking)
    if current == new:
        return
    if new is None:
        if current is not None:
            repo.refs.remove_if_equals(tracking, current, who=_WHO, message=f"fetch {name}: deleted on the remote")
        return
    repo.refs.set_if_equals(tracking, current, new, who=_WHO, message=f"update from {name}")


# -- fetch -------------------------------------------------------------------------------


def fetch(
    repo: Repo,
    remote: str | Backend = "origin",
    *,
    endpoint_url: str | None = None,
    progress: Progress | None = None,
    workers: int = DEFAULT_WORKERS,
    lazy: bool = False,
) -> FetchReport:
    """Download what the local repository lacks of the remote's branches and tags.

    ``lazy``: objects only (history and manifests); chunks come later, when a load needs
    them (a lazy clone, ckptvcs.remotes.lazy).

    Every chunk and object is verified against its BLAKE3 id on arrival; then
    ``refs/remotes/<name>/<branch>`` move to the remote's branches (for a configured remote)
    and tags the local repository lacks are created. Local branches never move (see :func:`pull`).
    """
    repo._check_process()
    store, name = connect(repo, remote, endpoint_url)
    config = store.config()
    if config is None:
        raise UsageError(f"{store.describe()} holds no ckptvcs remote (nothing was pushed there yet)")
    if config.get("chunk_size") != repo.chunk_size:
        raise UsageError(f"{store.describe()} holds chunks of {config.get('chunk_size')} bytes, this repository "
                         f"{repo.chunk_size}: clone it instead")
    report = FetchReport(store.describe())
    remote_refs = report.remote_refs = store.refs()
    scratch = ObjectStore(repo.root / "tmp" / _fs.temp_name("fetch-objects-"))
    try:
        with repo._lock.hold(exclusive=False):
            repo.chunks.index.refresh()
            objects = _fetch_objects(repo, store, remote_refs.values(), scratch, workers)
            dropped = _pruned_on_remote(repo, store, objects, remote_refs)
            live_manifests = {body.get("manifest") for oid, (kind, body) in objects.items()
                              if kind == "commit" and oid not in dropped}
            needed: set[bytes] = set()
            for oid, (kind, body) in objects.items():
                if kind == "manifest" and oid in live_manifests:
                    needed.update(_manifest_chunks(body))
            missing = set() if lazy else repo.chunks.index.missing(needed)
            if missing:
                _fetch_chunks(repo, store, missing, report, progress, workers)
            for oid, (kind, body) in objects.items():  # chunks are durable and verified: now the objects
                if repo.objects.put(kind, body) != oid:
                    raise CorruptObjectError(f"{store.describe()}: object {oid} is not in canonical form",
                                             object_id=oid, path=object_key(oid))
            report.objects_received = len(objects)
            for oid in dropped:  # their data is not here and no longer on the remote: say so, as a local prune does
                repo._write_pruned_record(oid, REMOTE_PRUNED_RULE, f"pruned on remote {name or store.describe()}")
            _move_refs(repo, name, remote_refs, report)
    finally:
        if scratch.root is not None:
            shutil.rmtree(scratch.root, ignore_errors=True)
    return report


REMOTE_PRUNED_RULE = "pruned-on-remote"


def _pruned_on_remote(repo: Repo, store: RemoteStore, objects: dict[str, tuple[str, Any]],
                      remote_refs: dict[str, str]) -> set[str]:
    """The newly fetched commits that carry a remote prune record (their chunks are not fetched),
    ref tips and tagged commits excepted (their data is always live on the remote)."""
    pruned = store.pruned_ids() & {oid for oid, (kind, _) in objects.items() if kind == "commit"}
    if not pruned:
        return set()
    tips = set()
    for value in remote_refs.values():
        oid: Any = value
        while oid in objects and objects[oid][0] == "tag":
            oid = objects[oid][1].get("object")
        tips.add(oid)
    return {c for c in pruned if c not in tips and repo.pruned_record(c) is None}


def _fetch_objects(repo: Repo, store: RemoteStore, tips: Iterable[str], scratch: ObjectStore,
                   workers: int) -> dict[str, tuple[str, Any]]:
    """Every object reachable from ``tips`` that the local repository lacks, verified: id → (kind, body)."""
    found: dict[str, tuple[str, Any]] = {}
    frontier = [t for t in dict.fromkeys(tips) if not repo.objects.has(t)]
    while frontier:
        fetched = _parallel(workers, lambda oid: (oid, _verified_object(store, scratch, oid)), frontier)
        frontier = []
        for oid, (kind, body) in fetched:
            found[oid] = (kind, body)
            if kind == "tag":
                nxt = [body.get("object")]
            elif kind == "commit":
                nxt = [body.get("manifest"), *body.get("parents", [])]
            else:
                nxt = []
            for child in nxt:
                if isinstance(child, str) and _HEX_ID.match(child) and child not in found \
                        and child not in frontier and not repo.objects.has(child):
                    frontier.append(child)
    return found


def _verified_object(store: RemoteStore, scratch: ObjectStore, oid: str) -> tuple[str, Any]:
    """Download an object and verify it as a local read would (size bounds, BLAKE3, parse)."""
    stored = store.get_object(oid)
    path = scratch.path(oid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stored)
    try:
        return scratch.get(oid)
    except IntegrityError as err:
        raise type(err)(f"{store.describe()}: {err.message} (on the remote; nothing was fetched)",
                        object_id=oid, path=object_key(oid), damaged_on_disk=err.damaged_on_disk,
                        problem=err.problem) from None


def _fetch_chunks(repo: Repo, store: RemoteStore, missing: set[bytes], report: FetchReport,
                  progress: Progress | None, workers: int) -> None:
    """Download the packs that hold ``missing`` chunks (and their delta bases), verified."""
    local_packs = {p.removesuffix(".pack") for p in os.listdir(repo.root / "packs") if p.endswith(".pack")}
    candidates = sorted(store.pack_names() - local_packs)
    indexes = dict(zip(candidates, _parallel(workers, store.pack_index, candidates)))
    located: dict[bytes, PackEntry] = {}
    for _, entries in indexes.values():
        for entry in entries:
            located.setdefault(entry.chunk_id, entry)
    wanted = with_delta_bases(missing, located) & (missing | set(located))
    wanted = {c for c in wanted if c in missing or repo.chunks.index.get(c) is None}
    absent = [c for c in wanted if c not in located]
    if absent:
        raise IntegrityError(f"{store.describe()}: chunk {absent[0].hex()} (and {len(absent) - 1} more) is in no "
                             "pack on the remote: the remote is damaged", chunk_id=absent[0].hex())
    packs = sorted({located[c].pack for c in wanted})
    counter = _Counter(sum(indexes[p][0] for p in packs), progress)
    tmp = repo.root / "tmp"
    tmp.mkdir(exist_ok=True)
    added: list[PackEntry] = []
    placed: list[Path] = []
    try:
        downloaded = _parallel(workers, lambda p: _download_pack(store, p, indexes[p], tmp, counter), packs)
        for pack, (path, entries) in zip(packs, downloaded):
            final = repo.root / "packs" / f"{pack}.pack"
            _fs.durable_rename(path, final)  # a whole, checked pack: the same bytes as any copy already there
            placed.append(final)
            fresh = [e for e in entries if repo.chunks.index.get(e.chunk_id) is None]
            fresh = list({e.chunk_id: e for e in reversed(fresh)}.values())
            repo.chunks.index.add(fresh)
            added += fresh
            report.bytes_received += final.stat().st_size
        report.packs_received = packs
        _parallel(workers, lambda entry: _verify_chunk(repo, entry), added)
        report.chunks_verified = len(added)
    except BaseException:
        with contextlib.suppress(Exception):
            repo.chunks.index.update([], added)
        for path in placed:
            repo.chunks.packs.forget(path.stem)
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def _verify_chunk(repo: Repo, entry: PackEntry) -> None:
    """Read a fetched chunk back through the store's verified path (decode, BLAKE3 against its id)."""
    def describe() -> str:
        return f"chunk {entry.chunk_id.hex()} of remote pack {entry.pack}"

    repo.chunks.read_chunk(entry.chunk_id, describe=describe)


def _download_pack(store: RemoteStore, pack: str, index: tuple[int, list[PackEntry]], tmp: Path,
                   counter: _Counter) -> tuple[Path, list[PackEntry]]:
    """Download one pack into ``tmp`` by ranged reads; check its frame and entries against the index."""
    size, expected = index
    done = tmp / f"fetched-{pack}.pack"  # a whole download an interrupted fetch left: reused, checked again
    path = tmp / _fs.temp_name(f"fetch-{pack}-")
    try:
        if done.is_file() and done.stat().st_size == size:
            os.replace(done, path)
            counter.add(size)
        else:
            _download_to(store, pack, size, path, counter)
        try:
            entries = list(iter_pack_entries(path))
        except CorruptObjectError as err:
            raise CorruptObjectError(f"{store.describe()}: pack {pack} is damaged on the remote: {err}", pack=pack,
                                     damaged_on_disk=True) from None
        named = [PackEntry(e.chunk_id, pack, e.offset, e.stored_len, e.raw_len, e.codec, e.base) for e in entries]
        if named != expected:
            raise CorruptObjectError(f"{store.describe()}: pack {pack} does not match its index {index_key(pack)}",
                                     pack=pack, damaged_on_disk=True)
        os.replace(path, done)
        return done, named
    except OSError as err:
        with contextlib.suppress(OSError):
            path.unlink()
        raise StorageError(f"{store.describe()}: downloading pack {pack} failed: {err}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _download_to(store: RemoteStore, pack: str, size: int, path: Path, counter: _Counter) -> None:
    reader = store.backend.open_reader(pack_key(pack))
    try:
        if reader.size != size:
            raise CorruptObjectError(f"{store.describe()}: pack {pack} has {reader.size} bytes, its index says "
                                     f"{size}", pack=pack, damaged_on_disk=True)
        with open(path, "wb") as f:
            for offset in range(0, size, _BLOCK):
                block = reader.read(offset, min(_BLOCK, size - offset))
                f.write(block)
                counter.add(len(block))
            f.flush()
            _fs.fsync_file(f.fileno())
    finally:
        reader.close()


def _move_refs(repo: Repo, name: str | None, remote_refs: dict[str, str], report: FetchReport) -> None:
    for ref, value in remote_refs.items():
        if ref.startswith("refs/tags/"):
            if repo.refs.read_raw(ref) is None:
                repo.refs.set_if_equals(ref, None, value, who=_WHO, message=f"fetch {name or 'url'}")
                report.updated[ref] = (None, value)
        elif name is not None:
            tracking = f"refs/remotes/{name}/{ref.removeprefix('refs/heads/')}"
            old = repo.refs.read_raw(tracking)
            if old != value:
                _update_tracking(repo, name, ref, value)
                report.updated[tracking] = (old, value)
    if name is not None:  # branches deleted on the remote
        for branch in repo.refs.names(f"remotes/{name}"):
            if f"refs/heads/{branch}" not in remote_refs:
                old = repo.refs.read_raw(f"refs/remotes/{name}/{branch}")
                _update_tracking(repo, name, f"refs/heads/{branch}", None)
                if old is not None:
                    report.updated[f"refs/remotes/{name}/{branch}"] = (old, "")


# -- pull and clone ------------------------------------------------------------------------


def pull(repo: Repo, remote: str = "origin", branch: str | None = None, **kwargs: Any) -> tuple[FetchReport, str | None]:
    """fetch, then fast-forward the current branch (or ``branch``) to the remote's.

    Returns ``(fetch report, the branch's new commit or None when already up to date)``.
    Diverged histories raise NonFastForwardError: ckptvcs does not merge checkpoints.
    """
    report = fetch(repo, remote, **kwargs)
    cfg = get_remote(repo, remote)
    if branch is None:
        branch, _ = repo.head()
        if branch is None:
            raise UsageError("HEAD is detached: name the branch to pull into")
    ref = f"refs/heads/{branch}"
    theirs = repo.refs.read_raw(f"refs/remotes/{cfg.name}/{branch}")
    if theirs is None:
        raise RevisionNotFoundError(f"remote {cfg.name} has no branch {branch!r}")
    ours = repo.refs.read_raw(ref)
    if ours == theirs or (ours is not None and _is_ancestor(repo, theirs, ours)):
        return report, None
    if ours is not None and not _is_ancestor(repo, ours, theirs):
        raise NonFastForwardError(
            f"pull: {branch} ({_short(ours)}) and {cfg.name}/{branch} ({_short(theirs)}) have diverged; ckptvcs does "
            f"not merge checkpoints: branch off one of them (`ckptvcs branch NAME {cfg.name}/{branch}`)",
            ref=ref, current=ours, proposed=theirs)
    repo.refs.set_if_equals(ref, ours, theirs, who=_WHO, message=f"pull {cfg.name}: fast-forward")
    head_ref, _ = repo.refs.follow(HEAD)
    if head_ref == ref:
        repo.refs.log_move(HEAD, ours, theirs, who=_WHO, message=f"pull {cfg.name}: fast-forward")
    return report, theirs


def clone(url: str | Backend, path: str | os.PathLike[str], *, endpoint_url: str | None = None, name: str = "origin",
          progress: Progress | None = None, workers: int = DEFAULT_WORKERS, lazy: bool = False) -> Repo:
    """Create a repository at ``path`` from the remote at ``url``; check out the remote's HEAD branch.

    The new repository takes the remote's chunk size, has ``url`` as remote ``name``, and
    a local branch for the remote's default branch. A failed clone leaves no repository.
    ``lazy``: fetch history and manifests only; each load then fetches just the chunks it
    reads, by ranged reads, verified, and keeps them (a lazy clone needs a URL, not a Backend).
    """
    if lazy and not isinstance(url, str):
        raise UsageError("a lazy clone needs a remote URL (it fetches chunks again later)")
    from ckptvcs.repo import Repo

    store = RemoteStore(open_backend(url, endpoint_url) if isinstance(url, str) else url)
    config = store.config()
    if config is None:
        raise UsageError(f"{store.describe()} holds no ckptvcs remote (nothing was pushed there yet)")
    chunk_size, interval = config.get("chunk_size"), config.get("keyframe_interval", 4)
    if not isinstance(chunk_size, int) or not isinstance(interval, int):
        raise CorruptObjectError(f"{store.describe()}: config.json has an invalid chunk_size or keyframe_interval")
    target = Path(path).absolute()
    existed = target.exists()
    repo = Repo.init(target, chunk_size=chunk_size, keyframe_interval=interval)
    try:
        if isinstance(url, str):
            add_remote(repo, name, url, endpoint_url)
        if lazy:
            set_lazy_remote(repo, name)
        fetched = fetch(repo, name if isinstance(url, str) else url, progress=progress, workers=workers, lazy=lazy)
        branch = store.head_branch() or "main"
        heads = {ref.removeprefix("refs/heads/"): v for ref, v in fetched.remote_refs.items() if ref.startswith("refs/heads/")}
        if branch not in heads and heads:
            branch = sorted(heads)[0]
        theirs = heads.get(branch)
        if theirs is not None:
            repo.refs.set_if_equals(f"refs/heads/{branch}", None, theirs, who=_WHO, message=f"clone from {store.describe()}")
        current = repo.refs.read_raw(HEAD)
        if current != f"ref: refs/heads/{branch}":
            repo.refs.set_if_equals(HEAD, current, f"ref: refs/heads/{branch}", who=_WHO, message="clone", log=False)
    except BaseException:
        repo.close()
        if existed:
            for child in target.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return repo


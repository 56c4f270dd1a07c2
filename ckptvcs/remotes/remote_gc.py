"""gc on a remote (``ckptvcs gc --remote NAME``) and remote prune records (docs/remotes.md, "gc on a remote").

Object stores have no locks, so a remote gc cannot stop a push. Its safety rests on four
rules, argued in docs/remotes.md:

1. *Reachable is never deleted.* Live = every object reachable from the remote's refs
   (branches, tags) and every pack holding a chunk, or a delta base of a chunk, of a
   reachable commit that has no remote prune record (ref tips never count as pruned).
   A reachable object or chunk that cannot be read or located stops gc before it deletes
   anything (only idx-less packs are kept then; see 4).
2. *Young is never deleted.* Only keys whose last-modified time (the store's own clock,
   read back from a key gc writes, ``gc/clock``) is older than ``grace`` are candidates:
   a push's fresh uploads are safe until its ref swap if the push takes less than ``grace``.
3. *Refs are read again after listing.* Whatever the refs name after the listing (a push
   that swapped meanwhile) joins the live set before anything is deleted.
4. *Push re-checks.* A push checks, just before its ref swap and once after it, that every
   pack and object its commits need is on the remote, and uploads again what is not
   (ckptvcs.remotes.transfer). What remains is documented as the race window.

Partly dead packs (a live pack that also holds dead chunks) are kept whole; their dead
bytes are reported (``dead_bytes_kept``): rewriting a remote pack means downloading and
uploading it, and a rewritten pack changes name under concurrent readers.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptvcs import provenance
from ckptvcs.backends.base import Backend
from ckptvcs.errors import CorruptObjectError, InvalidInputError, UsageError
from ckptvcs.objects import ObjectStore
from ckptvcs.pack import PackEntry, entry_size
from ckptvcs.remotes.layout import RemoteStore, index_key, pack_key
from ckptvcs.remotes.transfer import _HEX_ID, _verified_object, connect

if TYPE_CHECKING:
    from ckptvcs.repo import Repo

__all__ = ["RemoteGcReport", "gc_remote", "prune_on_remote", "DEFAULT_GRACE"]

DEFAULT_GRACE = 24 * 3600.0  # seconds: longer than any push is expected to take
_PACK = re.compile(r"^packs/([0-9a-f]{32})\.(pack|idx)$")
_OBJECT = re.compile(r"^objects/([0-9a-f]{2})/([0-9a-f]{62})$")
CLOCK_KEY = "gc/clock"


@dataclass
class RemoteGcReport:
    """What ``gc --remote`` found and deleted (or, with ``dry_run``, would delete)."""

    remote: str
    dry_run: bool
    grace: float
    refs: int = 0
    live_commits: int = 0
    pruned_commits: int = 0  # reachable commits with a remote prune record (their data released)
    live_objects: int = 0
    live_packs: int = 0
    packs_deleted: list[str] = field(default_factory=list)
    objects_deleted: int = 0
    bytes_deleted: int = 0
    kept_young: int = 0  # unreachable keys younger than the grace period (a push may be uploading them)
    partly_dead_packs: int = 0  # live packs that also hold dead chunks: kept whole
    dead_bytes_kept: int = 0
    refs_moved: bool = False  # the refs changed while gc listed (the new ones joined the live set)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        return [
            f"{self.remote}: {self.refs} refs, {self.live_commits} live commits ({self.pruned_commits} pruned), "
            f"{self.live_objects} live objects, {self.live_packs} live packs",
            f"{verb} {len(self.packs_deleted)} packs and {self.objects_deleted} objects, {self.bytes_deleted} bytes; "
            f"kept {self.kept_young} unreachable key(s) younger than the grace period ({self.grace:g}s)",
            f"{self.partly_dead_packs} live pack(s) also hold dead chunks: {self.dead_bytes_kept} bytes kept",
        ]


@dataclass
class _Live:
    objects: set[str] = field(default_factory=set)
    commits: set[str] = field(default_factory=set)
    pruned: set[str] = field(default_factory=set)
    chunks: set[bytes] = field(default_factory=set)  # of live commits' manifests, delta bases not yet added


def gc_remote(repo: Repo | None, remote: str | Backend, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
              endpoint_url: str | None = None, before_delete: Callable[[], None] | None = None) -> RemoteGcReport:
    """Delete the remote's packs and objects that no remote ref needs and that are older than ``grace``.

    ``before_delete`` runs after the refs were read again and before the first delete (tests
    use it to force an interleaving with a push). See the module docstring for the rules.
    """
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise InvalidInputError(f"grace must be a number of seconds >= 0, got {grace!r}")
    store, _ = connect(repo, remote, endpoint_url)
    if store.config() is None:
        raise UsageError(f"{store.describe()} holds no ckptvcs remote (nothing was pushed there yet)")
    report = RemoteGcReport(store.describe(), dry_run, float(grace))
    now = _store_now(store, dry_run)
    cache: dict[str, tuple[str, Any]] = {}
    refs = store.refs()
    pruned = store.pruned_ids()
    live = _live(repo, store, refs.values(), pruned, cache)
    indexes = _indexes(store)
    times = {**store.modified_times("packs"), **store.modified_times("objects")}
    again = store.refs()  # rule 3: a push that swapped while we listed
    if again != refs:
        report.refs_moved = True
        live = _live(repo, store, [*refs.values(), *again.values()], pruned, cache)
    report.refs, report.live_commits, report.pruned_commits = len(again), len(live.commits), len(live.pruned)
    report.live_objects = len(live.objects)
    live_packs, unlocated, needed = _live_packs(indexes, live.chunks)
    report.live_packs = len(live_packs)
    cutoff = now - grace  # at or before it: old enough (stores stamp whole seconds; grace 0 means none)
    doomed_packs, doomed_objects = [], []
    pack_names = {m.group(1) for k in times if (m := _PACK.match(k))}
    for name in sorted(pack_names - live_packs):
        if name not in indexes and unlocated:
            continue  # a needed chunk is in no index: it may be in this idx-less pack; keep it
        keys = [k for k in (index_key(name), pack_key(name)) if k in times]
        if max(times[k] for k in keys) <= cutoff:
            doomed_packs.append(name)
        else:
            report.kept_young += 1
    for key, stamp in times.items():
        m = _OBJECT.match(key)
        if m and m.group(1) + m.group(2) not in live.objects:
            if stamp <= cutoff:
                doomed_objects.append(key)
            else:
                report.kept_young += 1
    for name in live_packs & set(indexes):
        dead = sum(entry_size(e) for e in indexes[name][1] if e.chunk_id not in needed)
        if dead:
            report.partly_dead_packs += 1
            report.dead_bytes_kept += dead
    if before_delete is not None:
        before_delete()
    sizes = {name: indexes[name][0] if name in indexes else 0 for name in doomed_packs}
    report.packs_deleted = doomed_packs
    report.objects_deleted = len(doomed_objects)
    report.bytes_deleted = sum(sizes.values())
    if not dry_run:
        for name in doomed_packs:
            store.delete(index_key(name))  # the index first: the pack stops counting as present
            store.delete(pack_key(name))
        for key in doomed_objects:
            store.delete(key)
    return report


def _store_now(store: RemoteStore, dry_run: bool) -> float:
    """The store's clock (the time it stamps on a key we write now), so a skewed local clock
    cannot shorten the grace period. A dry run writes nothing and uses the local clock."""
    if dry_run:
        return time.time()
    try:
        store.backend.put(CLOCK_KEY, json.dumps({"time": provenance.utc_now()}).encode())
    except OSError as err:
        raise store._storage("writing gc/clock", err) from None
    stamp = store.modified_times("gc").get(CLOCK_KEY)
    if stamp is None or stamp == float("inf"):
        raise UsageError(f"{store.describe()}: cannot read the store's clock (gc/clock has no modification time)")
    return stamp


def _read(repo: Repo | None, store: RemoteStore, oid: str, scratch: ObjectStore,
          cache: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """An object's (kind, body), verified: from the local repository when it has it, else the remote."""
    if oid not in cache:
        if repo is not None and repo.objects.has(oid):
            cache[oid] = repo.objects.get(oid)
        else:
            cache[oid] = _verified_object(store, scratch, oid)
    return cache[oid]


def _live(repo: Repo | None, store: RemoteStore, tips: Iterable[str], pruned: set[str],
          cache: dict[str, tuple[str, Any]]) -> _Live:
    """Rule 1's live set: objects reachable from ``tips``, and the chunks of their unpruned commits."""
    import shutil
    import tempfile
    from pathlib import Path

    live = _Live()
    scratch_dir = Path(tempfile.mkdtemp(prefix="ckptvcs-remote-gc-"))
    try:
        scratch = ObjectStore(scratch_dir / "objects")
        tips = list(dict.fromkeys(tips))
        tip_commits = set().union(*(_peel_remote(repo, store, t, cache) for t in tips)) if tips else set()
        frontier = list(tips)
        manifests: dict[str, bool] = {}  # manifest → needed by an unpruned commit
        while frontier:
            oid = frontier.pop()
            if oid in live.objects:
                continue
            live.objects.add(oid)
            kind, body = _read(repo, store, oid, scratch, cache)
            children: list[Any] = []
            if kind == "tag":
                children = [body.get("object")]
            elif kind == "commit":
                live.commits.add(oid)
                dropped = oid in pruned and oid not in tip_commits  # a ref tip's data is always live
                if dropped:
                    live.pruned.add(oid)
                manifest = body.get("manifest")
                if isinstance(manifest, str):
                    manifests[manifest] = manifests.get(manifest, False) or not dropped
                children = [manifest, *body.get("parents", [])]
            frontier += [c for c in children if isinstance(c, str) and _HEX_ID.match(c) and c not in live.objects]
        for manifest, needed in manifests.items():
            if needed:
                _, body = _read(repo, store, manifest, scratch, cache)
                for blob in body.get("blobs", []):
                    live.chunks.update(bytes.fromhex(c) for c in blob.get("chunks", []))
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return live


def _indexes(store: RemoteStore) -> dict[str, tuple[int, list[PackEntry]]]:
    """Every complete pack's index. A damaged index stops gc: what its pack holds is unknown."""
    out = {}
    for name in sorted(store.pack_names()):
        try:
            out[name] = store.pack_index(name)
        except CorruptObjectError as err:
            raise CorruptObjectError(f"gc --remote stopped, nothing deleted: {err} (run `ckptvcs fsck --remote`)",
                                     pack=name) from None
    return out


def _live_packs(indexes: dict[str, tuple[int, list[PackEntry]]],
                chunks: set[bytes]) -> tuple[set[str], set[bytes], set[bytes]]:
    """``(live packs, needed chunks in no index, every needed chunk with its delta bases)``: a pack
    is live when it holds any needed chunk (every copy of it is kept)."""
    holders: dict[bytes, list[PackEntry]] = {}
    for _, entries in indexes.values():
        for entry in entries:
            holders.setdefault(entry.chunk_id, []).append(entry)
    needed: set[bytes] = set()
    unlocated: set[bytes] = set()
    packs: set[str] = set()
    frontier = list(chunks)
    while frontier:
        chunk_id = frontier.pop()
        if chunk_id in needed:
            continue
        needed.add(chunk_id)
        found = holders.get(chunk_id)
        if not found:
            unlocated.add(chunk_id)
            continue
        for entry in found:
            packs.add(entry.pack)
            if entry.base is not None and entry.base not in needed:
                frontier.append(entry.base)
    return packs, unlocated, needed


# -- remote prune records ---------------------------------------------------------------------


def prune_on_remote(repo: Repo | None, remote: str | Backend, commits: Iterable[str], rule: str, reason: str = "",
                    *, endpoint_url: str | None = None) -> list[str]:
    """Write a prune record on the remote for each commit (``pruned/<id>``): its data leaves the
    remote's live set, so the next ``gc --remote`` past the grace period reclaims what no other
    live commit shares. History stays (commits and manifests are kept). A commit a remote ref
    names (a branch tip, a tagged commit) is never pruned: returns the ids recorded."""
    if not isinstance(rule, str) or not rule:
        raise InvalidInputError("a prune record needs a rule (e.g. keep_last=3)")
    store, _ = connect(repo, remote, endpoint_url)
    tips = set()
    scratch_cache: dict[str, tuple[str, Any]] = {}
    for value in store.refs().values():
        tips |= _peel_remote(repo, store, value, scratch_cache)
    done = []
    for commit_id in dict.fromkeys(commits):
        if not _HEX_ID.match(commit_id) or commit_id in tips:
            continue
        record = {"commit": commit_id, "rule": rule, "reason": reason, "time": provenance.utc_now(),
                  "who": provenance.default_author()}
        store.put_pruned(commit_id, record)
        done.append(commit_id)
    return done


def _peel_remote(repo: Repo | None, store: RemoteStore, oid: str, cache: dict[str, tuple[str, Any]]) -> set[str]:
    """The commit a remote ref value names (tags peeled), as a one-element set (empty: unreadable)."""
    import shutil
    import tempfile
    from pathlib import Path

    scratch_dir = Path(tempfile.mkdtemp(prefix="ckptvcs-remote-peel-"))
    try:
        scratch = ObjectStore(scratch_dir / "objects")
        for _ in range(16):
            kind, body = _read(repo, store, oid, scratch, cache)
            if kind == "commit":
                return {oid}
            if kind != "tag" or not isinstance(body.get("object"), str):
                return set()
            oid = body["object"]
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return set()


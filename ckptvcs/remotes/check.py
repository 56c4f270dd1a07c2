"""fsck of a remote (``ckptvcs fsck --remote NAME``): structure, and with ``read_data`` every byte.

Structure: config.json; every ref names a 64-hex id; every pack index decodes and its pack
exists with the size the index records; every object reachable from a ref is present and
verifies (BLAKE3, parse); every chunk a reachable manifest lists, and every delta base of
one, is in some pack index. With ``read_data``, the whole reachable history is fetched
into a scratch repository, which verifies every chunk and object as a fetch does; the
scratch copy is removed afterwards (it needs local disk as large as the remote's data).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptvcs.backends.base import Backend
from ckptvcs.errors import CkptvcsError, IntegrityError
from ckptvcs.objects import ObjectStore
from ckptvcs.pack import PackEntry
from ckptvcs.remotes.layout import RemoteStore
from ckptvcs.remotes.transfer import _HEX_ID, _verified_object, connect, fetch

if TYPE_CHECKING:
    from ckptvcs.repo import Repo

__all__ = ["RemoteCheckReport", "check_remote"]


@dataclass
class RemoteCheckReport:
    """Findings (one sentence each: empty means healthy) and what was checked."""

    remote: str
    findings: list[str] = field(default_factory=list)
    refs: int = 0
    commits: int = 0
    objects: int = 0
    packs: int = 0
    chunks: int = 0
    read_data: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        data = ", every chunk read and verified" if self.read_data else ""
        return (f"{self.remote}: {self.refs} refs, {self.commits} commits, {self.objects} objects, {self.packs} packs, "
                f"{self.chunks} chunks{data}: {'ok' if self.ok else f'{len(self.findings)} problem(s)'}")


def check_remote(repo: Repo | None, remote: str | Backend, *, read_data: bool = False,
                 endpoint_url: str | None = None) -> RemoteCheckReport:
    """Check the remote (a configured name with ``repo``, a URL or a Backend); see the module docstring."""
    store, _ = connect(repo, remote, endpoint_url)
    report = RemoteCheckReport(store.describe(), read_data=read_data)
    config = store.config()
    if config is None:
        report.findings.append("no config.json: nothing was pushed here")
        return report
    try:
        refs = store.refs()
    except CkptvcsError as err:
        report.findings.append(str(err))
        refs = {}
    report.refs = len(refs)
    located = _check_packs(store, report)
    scratch = Path(tempfile.mkdtemp(prefix="ckptvcs-remote-check-"))
    try:
        _check_history(store, refs, located, ObjectStore(scratch / "objects"), report)
        if read_data and report.ok:
            _read_everything(store, config, scratch / "copy", report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _check_packs(store: RemoteStore, report: RemoteCheckReport) -> dict[bytes, PackEntry]:
    located: dict[bytes, PackEntry] = {}
    for name in sorted(store.pack_names()):
        report.packs += 1
        try:
            size, entries = store.pack_index(name)
        except CkptvcsError as err:
            report.findings.append(str(err))
            continue
        actual = store.pack_size(name)
        if actual != size:
            report.findings.append(f"pack {name}: {'missing' if actual is None else f'{actual} bytes'}, its index "
                                   f"says {size} bytes")
            continue
        for entry in entries:
            located.setdefault(entry.chunk_id, entry)
    return located


def _check_history(store: RemoteStore, refs: dict[str, str], located: dict[bytes, PackEntry], scratch: ObjectStore,
                   report: RemoteCheckReport) -> None:
    seen: set[str] = set()
    frontier = [(oid, ref) for ref, oid in refs.items()]
    needed: dict[bytes, str] = {}
    pruned = store.pruned_ids() - set(refs.values())  # commits whose data gc --remote may have reclaimed
    tips = {oid for oid, _ in frontier}
    skip: set[str] = set()  # manifests only pruned commits use
    used: set[str] = set()
    while frontier:
        oid, via = frontier.pop()
        if oid in seen:
            continue
        seen.add(oid)
        try:
            kind, body = _verified_object(store, scratch, oid)
        except CkptvcsError as err:
            report.findings.append(f"{err} (reached from {via})")
            continue
        report.objects += 1
        children: list[object] = []
        if kind == "commit":
            report.commits += 1
            children = [body.get("manifest"), *body.get("parents", [])]
            (skip if oid in pruned and oid not in tips else used).add(body.get("manifest"))
            via = f"commit {oid[:12]}"
        elif kind == "tag":
            children = [body.get("object")]
            tips.add(body.get("object"))
        elif kind == "manifest":
            if oid in skip and oid not in used:
                continue
            for blob in body.get("blobs", []):
                for chunk in blob.get("chunks", []):
                    needed.setdefault(bytes.fromhex(chunk), via)
        frontier += [(c, via) for c in children if isinstance(c, str) and _HEX_ID.match(c) and c not in seen]
    checked: set[bytes] = set()
    pending = list(needed)
    while pending:
        chunk_id = pending.pop()
        if chunk_id in checked:
            continue
        checked.add(chunk_id)
        entry = located.get(chunk_id)
        if entry is None:
            report.findings.append(f"chunk {chunk_id.hex()} of {needed.get(chunk_id, 'a delta chain')} is in no pack "
                                   "index on the remote")
        elif entry.base is not None:
            pending.append(entry.base)
    report.chunks = len(checked)


def _read_everything(store: RemoteStore, config: dict[str, object], path: Path, report: RemoteCheckReport) -> None:
    from ckptvcs.repo import Repo

    chunk_size, interval = config.get("chunk_size"), config.get("keyframe_interval", 4)
    if not isinstance(chunk_size, int) or not isinstance(interval, int):
        report.findings.append("config.json has an invalid chunk_size or keyframe_interval")
        return
    with Repo.init(path, chunk_size=chunk_size, keyframe_interval=interval) as copy:
        try:
            fetch(copy, store.backend)
        except IntegrityError as err:
            report.findings.append(str(err))

"""fsck, gc and repair work through their narrow protocols, not through a whole Repo.

Each maintenance module declares what it uses of a repository (fsck.FsckRepository,
gc.GcRepository, repair.RepairStore). Here they run against a view that exposes only
those members, forwarded to a real repository's parts: a module reaching for anything
else raises AttributeError, and the results must equal the Repo's own.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptvcs
from ckptvcs import Repo
from ckptvcs.fsck import check_repository
from ckptvcs.gc import collect_garbage
from ckptvcs.repair import rebuild_index

PACKAGE = Path(ckptvcs.__file__).parent


class _Only:
    """Forwards exactly ``names`` (attributes or methods) to ``target``; nothing else exists."""

    def __init__(self, target: Any, names: tuple[str, ...]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_names", names)

    def __getattr__(self, name: str) -> Any:
        if name not in self._names:
            raise AttributeError(f"{name} is not part of the protocol")
        return getattr(self._target, name)


FSCK_MEMBERS = ("root", "backend", "chunk_size", "refs", "objects", "chunks", "_pruned_records", "_staged_records")
GC_MEMBERS = ("root", "backend", "objects", "chunks", "live_commits", "pruned", "_record_collected", "_mark_collected",
              "_remove_staged_records")


def _history(repo: Repo) -> list[str]:
    ids = []
    for i in range(4):
        ids.append(repo.commit({"w": np.full(4096, i, dtype=np.float32), "i": i}, f"c{i}", code_version=None))
    return ids


@pytest.mark.parametrize("module", ["fsck", "gc", "repair"])
def test_no_maintenance_module_imports_the_repo(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "repo" not in imported and "ckptvcs.repo" not in imported


def test_fsck_reads_only_its_protocol(repo: Repo) -> None:
    ids = _history(repo)
    repo.prune(ids[0], "keep_last=3")
    view = _Only(repo, FSCK_MEMBERS)
    report = check_repository(view, read_data=True)
    own = repo.fsck(read_data=True)
    assert report.ok and own.ok
    assert report.findings == own.findings
    assert (report.commits, report.chunks, report.bytes_read) == (own.commits, own.chunks, own.bytes_read) != (0, 0, 0)


def test_gc_uses_only_its_protocol(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", keyframe_interval=1)  # no deltas: a pruned commit's chunk is dead
    ids = _history(repo)
    repo.prune(ids[1], "keep_last=2")
    chunks_before = len(repo.chunks.index)
    with repo._lock.hold(exclusive=True):
        report = collect_garbage(_Only(repo, GC_MEMBERS), dry_run=False, expire=0.0)
    assert report.pruned_commits == 1 and report.dead_chunks >= 1
    assert len(repo.chunks.index) < chunks_before
    assert "collected" in repo.pruned()[ids[1]]
    for cid in (ids[0], ids[2], ids[3]):
        assert repo.load(cid)["w"][0] == ids.index(cid)
    assert repo.fsck().ok
    repo.close()


def test_repair_uses_only_its_protocol(repo: Repo) -> None:
    _history(repo)
    before = sorted(repo.chunks.index, key=lambda e: e.chunk_id)
    with repo._lock.hold(exclusive=True):
        report = rebuild_index(repo.root, _Only(repo.chunks, ("chunk_size", "backend", "index_dir", "index", "close_index")))
    assert report.chunks == len(before) == report.previous_chunks
    assert sorted(repo.chunks.index, key=lambda e: e.chunk_id) == before

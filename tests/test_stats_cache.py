"""stats() keeps what it read in a derived cache (stats-cache.json): the next call reads
only new commits, and the numbers always equal a full walk's, whatever happened to the
history or to the cache in between."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptvcs import Repo, layout
from ckptvcs.objects import ObjectStore


def _full_walk(repo: Repo) -> tuple[int, int, int, int]:
    """What stats() reported before the cache: every reachable commit read, every file sized."""
    commits = repo.all_commits()

    def folder(prefix: str) -> int:
        return sum(repo.backend.size(key) or 0 for key in repo.backend.list(prefix))

    return (len(commits), sum(int(c.stats.get("logical_bytes", 0)) for c in commits),
            folder(layout.PACKS), folder(layout.OBJECTS))


def _numbers(repo: Repo) -> tuple[int, int, int, int]:
    s = repo.stats()
    return s.commits, s.logical_bytes, s.pack_bytes, s.object_bytes


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the commit objects read through ObjectStore.read_commit."""
    seen: list[str] = []
    real = ObjectStore.read_commit

    def counting(self: ObjectStore, oid: str):  # type: ignore[no-untyped-def]
        seen.append(oid)
        return real(self, oid)

    monkeypatch.setattr(ObjectStore, "read_commit", counting)
    return seen


def test_second_stats_reads_only_new_commits_and_matches_a_full_walk(repo: Repo, reads: list[str]) -> None:
    for i in range(4):
        repo.commit({"w": torch.full((1000,), float(i))}, step=i)
    assert _numbers(repo) == _full_walk(repo)
    reads.clear()
    again = _numbers(repo)
    assert reads == []  # all four came from the cache
    assert again == _full_walk(repo)
    new = repo.commit({"w": torch.full((2000,), 9.0)}, step=9)
    reads.clear()
    after = _numbers(repo)
    assert reads == [new]
    assert after == _full_walk(repo)


def test_branches_deleted_and_gc_are_seen(repo: Repo) -> None:
    repo.commit({"w": torch.zeros(1000)})
    repo.branch("side")
    repo.commit({"w": torch.ones(3000)}, branch="side")
    repo.commit({"w": torch.ones(3000) * 2}, branch="side")
    assert _numbers(repo)[0] == 3
    repo.delete_branch("side", force=True)
    assert _numbers(repo) == _full_walk(repo)
    assert _numbers(repo)[0] == 1
    repo.gc(prune_unreachable_after="now")
    assert _numbers(repo) == _full_walk(repo)


@pytest.mark.parametrize("damage", [
    b"not json",
    b'{"version": 1, "checksum": "00", "commits": {}, "sizes": {}}\n',
    b"[]",
    b"",
])
def test_a_damaged_or_forged_cache_is_ignored_and_rebuilt(repo: Repo, damage: bytes) -> None:
    repo.commit({"w": torch.zeros(1000)})
    repo.commit({"w": torch.ones(1000)})
    want = _numbers(repo)
    cache = Path(repo.root) / layout.STATS_CACHE
    assert cache.is_file()
    cache.write_bytes(damage)
    assert _numbers(repo) == want == _full_walk(repo)
    cache.unlink()
    assert _numbers(repo) == want
    assert repo.fsck().ok


def test_an_edited_entry_fails_the_checksum(repo: Repo) -> None:
    repo.commit({"w": torch.zeros(1000)})
    want = _numbers(repo)
    cache = Path(repo.root) / layout.STATS_CACHE
    text = cache.read_text()
    forged = text.replace(f"[{want[1]},", f"[{want[1] + 1},", 1)
    assert forged != text
    cache.write_text(forged)
    assert _numbers(repo) == want

"""stats() keeps what it read in a derived cache (stats-cache.json, stats-cache.commits):
the next call reads only new commits and lists only folders whose change token moved,
and the numbers always equal a full walk's, whatever happened to the history, the
folders or the cache in between."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ckptvcs import Repo, layout
from ckptvcs.backends import MemoryBackend, local


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


def _exact(repo: Repo) -> tuple[int, int, int, int]:
    """stats() twice (the second from the cache it just wrote), both equal to a full walk."""
    first = _numbers(repo)
    assert first == _numbers(repo) == _full_walk(repo)
    return first


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Folders listed through LocalBackend.list_folder."""
    seen: list[str] = []
    real = local.LocalBackend.list_folder

    def counting(self: local.LocalBackend, prefix: str):  # type: ignore[no-untyped-def]
        seen.append(prefix)
        return real(self, prefix)

    monkeypatch.setattr(local.LocalBackend, "list_folder", counting)
    return seen


@pytest.fixture
def trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder tokens trusted however young (the cache path, in a test that takes a second).

    Safe only because every test using it calls :func:`_tick` between a stats() call and
    the next change: a change in the same clock tick as a token could keep the token."""
    monkeypatch.setattr(local, "TOKEN_MIN_AGE", 0.0)


def _tick(repo: Repo) -> None:
    """Wait until the file system's clock has moved past every time it has given so far,
    so that the next change gets a new folder time (a readiness signal, not a sleep)."""
    probe = Path(repo.root) / "tmp" / "tick-probe"
    probe.write_bytes(b"")
    start = os.stat(probe).st_mtime_ns
    while os.stat(probe).st_mtime_ns == start:
        probe.write_bytes(b"")
        os.utime(probe)
    probe.unlink()


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
    assert reads == [new]  # the others came from the commit table
    assert after == _full_walk(repo)


@pytest.fixture(params=["local", "memory"])
def any_repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repo]:
    if request.param == "local":
        repo = Repo.init(tmp_path / "store")
    else:
        repo = Repo.init(None, backend=MemoryBackend())
    with repo:
        yield repo


def test_objects_that_appear_and_disappear_without_refs_moving(any_repo: Repo) -> None:
    repo = any_repo
    repo.commit({"w": torch.zeros(1000)})
    _exact(repo)
    repo.stage({"w": torch.ones(5000)})  # a manifest and a pack, no ref moved
    _exact(repo)
    repo.tag("v1")
    repo.tag("v1-note", message="annotated")
    _exact(repo)
    repo.branch("side")
    repo.commit({"w": torch.ones(3000)}, branch="side")
    _exact(repo)
    repo.delete_branch("side", force=True)
    repo.delete_tag("v1-note")
    assert _exact(repo)[0] == 1
    repo.gc(prune_unreachable_after="now", staged_expire="now")
    _exact(repo)


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


def test_unchanged_folders_are_not_listed_and_changed_ones_are(repo: Repo, trusted: None,
                                                               listed: list[str]) -> None:
    for i in range(3):
        repo.commit({"w": torch.full((1000,), float(i))}, step=i)
    _exact(repo)
    _tick(repo)
    listed.clear()
    _exact(repo)
    assert listed == []  # every folder token matched
    objects = Path(repo.root) / layout.OBJECTS
    steps = [
        lambda: repo.stage({"w": torch.ones(4000)}),
        lambda: repo.tag("v1", message="note"),
        lambda: (objects / "zz" / "deeper").mkdir(parents=True),  # an empty folder: no bytes yet
        lambda: (objects / "zz" / "deeper" / "stray").write_bytes(b"x" * 77),  # then a file in it
        lambda: (objects / "stray-top").write_bytes(b"y" * 5),
        lambda: (objects / "zz" / "deeper" / "stray").unlink(),
        lambda: repo.gc(prune_unreachable_after="now", staged_expire="now"),
    ]
    for step in steps:
        step()
        listed.clear()
        _exact(repo)
        assert listed  # the changed folder was listed again
        _tick(repo)


def test_a_change_in_the_same_clock_tick_is_not_missed(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system whose clock has a 2-second tick, a folder changed right after it
    was listed keeps its times; its token is not trusted until the tick is long past."""
    tick = 2_000_000_000

    def coarse(path: str, *, dir_fd: int | None = None) -> SimpleNamespace:
        info = os.lstat(path, dir_fd=dir_fd)
        return SimpleNamespace(st_mode=info.st_mode, st_dev=info.st_dev, st_ino=info.st_ino, st_size=info.st_size,
                               st_mtime_ns=info.st_mtime_ns // tick * tick, st_ctime_ns=info.st_ctime_ns // tick * tick)

    monkeypatch.setattr(local, "_folder_stat", coarse)
    repo.commit({"w": torch.zeros(1000)})
    _exact(repo)
    for i in range(3):  # each change lands within a tick of the previous listing
        repo.stage({"w": torch.full((2000,), float(i))})
        _exact(repo)
    assert repo.backend.folder_tokens("", [layout.PACKS]) == [None]  # type: ignore[attr-defined]


def test_folder_tokens_trusted_only_when_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = local.LocalBackend(tmp_path)
    (tmp_path / "objects" / "ab").mkdir(parents=True)
    assert backend.folder_tokens("objects", ["ab", "none"]) == [None, None]  # just changed; absent
    monkeypatch.setattr(local, "TOKEN_MIN_AGE", -10.0)
    [token] = backend.folder_tokens("objects", ["ab"])
    assert token is not None
    (tmp_path / "objects" / "ab" / "f").write_bytes(b"abc")
    (tmp_path / "objects" / "ab" / "f.lock").write_bytes(b"abc")
    assert backend.folder_tokens("objects", ["ab"]) != [token]  # ctime moved
    assert backend.list_folder("objects/ab") == ([("f", 3)], [])
    assert backend.list_folder("objects") == ([], ["ab"])


@pytest.mark.parametrize("damage", [
    b"not json",
    b'{"version": 2, "checksum": "00"}\n{}\n',
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
    forged = text.replace(f'"logical_bytes":{want[1]}', f'"logical_bytes":{want[1] + 1}', 1)
    assert forged != text
    cache.write_text(forged)
    assert _numbers(repo) == want


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_a_damaged_commit_table_is_rebuilt_from_the_objects(repo: Repo, reads: list[str], damage: str) -> None:
    repo.commit({"w": torch.zeros(1000)})
    repo.commit({"w": torch.ones(1000)})
    _numbers(repo)
    table = Path(repo.root) / layout.STATS_CACHE_COMMITS
    data = table.read_bytes()
    if damage == "flip":
        table.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    elif damage == "truncate":
        table.write_bytes(data[:-7])
    elif damage == "delete":
        table.unlink()
    else:  # a valid table of other tips, as a concurrent stats() could leave it
        repo.commit({"w": torch.full((1000,), 3.0)})
        _numbers(repo)
        table.write_bytes(data)
    repo.commit({"w": torch.full((1000,), 2.0)})  # the tips move: the table is needed
    want = _full_walk(repo)
    reads.clear()
    assert _numbers(repo) == want
    assert len(reads) == want[0]  # every commit read again: the table was not trusted


def test_an_old_repository_with_a_version_1_cache(repo: Repo) -> None:
    repo.commit({"w": torch.zeros(1000)})
    cache = Path(repo.root) / layout.STATS_CACHE
    cache.write_bytes(b'{"checksum":"ab","version":1}\n{"commits":{},"sizes":{},"tips":[]}\n')
    (Path(repo.root) / layout.STATS_CACHE_COMMITS).unlink(missing_ok=True)
    assert _exact(repo)[0] == 1
    assert b'"version":2' in cache.read_bytes()

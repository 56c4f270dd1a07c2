"""Pack index objects and the per-host index cache of stores without local files.

Against a memory store and the real SeaweedFS server (the ``s3_server`` fixture): every
sealed pack gets its ``packs/<name>.idx``; an open reads those (one GET per pack) instead
of walking pack headers; a reopen on the same host reads nothing of ``packs/``; a missing
or damaged index object falls back to the header walk; a damaged cache is rebuilt; a stale
cache (another host's gc) is corrected; processes share the cache.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptvcs import Repo, layout
from ckptvcs.backends import Backend, MemoryBackend
from ckptvcs.backends.base import RangeReader
from ckptvcs.backends.counting import CountingBackend
from ckptvcs.pack import iter_backend_pack
from ckptvcs.pack_index import read_pack_index
from s3server import S3Server, make_bucket

CHUNK = 4096


class Spy(CountingBackend):
    """A counting backend that also remembers which pack keys were fetched or opened."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.got: list[str] = []
        self.opened: list[str] = []

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        self.got.append(key)
        return super().get(key, max_size=max_size)

    def open_reader(self, key: str) -> RangeReader:
        self.opened.append(key)
        return super().open_reader(key)

    def pack_gets(self) -> list[str]:
        return [k for k in self.got if k.startswith("packs/")]

    def pack_walks(self) -> list[str]:
        return [k for k in self.opened if k.startswith("packs/")]


def _state(seed: int, n: int = 20_000) -> dict[str, Any]:
    return {"w": torch.randn(n, generator=torch.Generator().manual_seed(seed)), "step": seed}


@pytest.fixture(params=["memory", "s3"])
def make_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Backend]:
    """A factory of handles on one fresh store (memory: the same object; S3: a new client)."""
    if request.param == "memory":
        backend = MemoryBackend(f"idx-{uuid.uuid4().hex[:8]}")
        return lambda: backend
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    server: S3Server = request.getfixturevalue("s3_server")
    bucket = f"idx-{uuid.uuid4().hex[:12]}"
    make_bucket(server, bucket)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return lambda: FsspecBackend(f"s3://{bucket}/repo")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Path]:
    """Point the index cache at a new folder: as if the next open ran on another host."""
    count = [0]

    def move(host: int | None = None) -> Path:
        """A new host's cache folder, or back to host ``host`` (1: the first)."""
        if host is None:
            count[0] += 1
        folder = tmp_path / f"host-{host or count[0]}"
        monkeypatch.setenv("CKPTVCS_INDEX_CACHE", str(folder))
        return folder

    move()
    return move


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The packs whose entry headers an index sync walks (instrumented, still walked)."""
    import ckptvcs.store_index

    seen: list[str] = []
    real = ckptvcs.store_index.iter_backend_pack

    def walk(backend: Backend, name: str, **kw: Any) -> Any:
        seen.append(name)
        return real(backend, name, **kw)

    monkeypatch.setattr(ckptvcs.store_index, "iter_backend_pack", walk)
    return seen


def _packs(backend: Backend) -> list[str]:
    return sorted(k[len("packs/"):-len(".pack")] for k in backend.list("packs") if k.endswith(".pack"))


def _commit_two(make_backend: Callable[[], Backend]) -> tuple[str, str]:
    with Repo.init(None, chunk_size=CHUNK, backend=make_backend()) as repo:
        return repo.commit(_state(1), "one", code_version=None), repo.commit(_state(2), "two", code_version=None)


def test_every_sealed_pack_gets_an_index_object_matching_its_headers(make_backend: Callable[[], Backend],
                                                                      fresh_cache: Callable[..., Path]) -> None:
    _commit_two(make_backend)
    backend = make_backend()
    names = _packs(backend)
    assert len(names) >= 2
    for name in names:
        assert read_pack_index(backend, name) == list(iter_backend_pack(backend, name))


def test_an_open_reads_one_index_object_per_pack_and_a_reopen_reads_nothing_of_packs(
        make_backend: Callable[[], Backend], fresh_cache: Callable[..., Path]) -> None:
    first, second = _commit_two(make_backend)
    fresh_cache()  # another host: its cache is empty
    spy = Spy(make_backend())
    with Repo.open(backend=spy) as repo:
        names = _packs(spy.inner)
        assert sorted(spy.pack_gets()) == sorted(layout.pack_index_key(n) for n in names)
        assert spy.pack_walks() == []  # no pack header read
        assert spy.counts.requests["LIST"] == 1
    spy = Spy(make_backend())  # the same host again: the cache knows every pack
    with Repo.open(backend=spy) as repo:
        assert spy.pack_gets() == [] and spy.pack_walks() == []
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])
        assert torch.equal(repo.load(second)["w"], _state(2)["w"])


def test_a_second_handle_learns_the_first_ones_new_packs_from_their_index_objects(
        make_backend: Callable[[], Backend], fresh_cache: Callable[..., Path], walks: list[str]) -> None:
    with Repo.init(None, chunk_size=CHUNK, backend=make_backend()) as writer:
        writer.commit(_state(1), "one", code_version=None)
        fresh_cache()  # the reader is on another host
        spy = Spy(make_backend())
        with Repo.open(backend=spy) as reader:
            before = set(_packs(spy.inner))
            new = writer.commit(_state(2), "two", code_version=None)
            spy.got.clear()
            assert torch.equal(reader.load(new)["w"], _state(2)["w"])
            added = set(_packs(spy.inner)) - before
            assert added and {layout.pack_index_key(n) for n in added} <= set(spy.pack_gets())
            assert walks == []
            assert not any(layout.pack_index_key(n) in spy.got for n in before)


def test_a_pack_without_index_object_is_walked(make_backend: Callable[[], Backend],
                                               fresh_cache: Callable[..., Path]) -> None:
    first, second = _commit_two(make_backend)
    backend = make_backend()
    old = _packs(backend)[0]
    backend.delete(layout.pack_index_key(old))  # as a store written before index objects
    fresh_cache()
    spy = Spy(make_backend())
    with Repo.open(backend=spy) as repo:
        assert spy.pack_walks() == [layout.pack_key(old)]
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])
        assert torch.equal(repo.load(second)["w"], _state(2)["w"])
        assert repo.fsck(read_data=True).ok


def test_a_damaged_index_object_is_walked_instead_and_reported_by_fsck(make_backend: Callable[[], Backend],
                                                                       fresh_cache: Callable[..., Path]) -> None:
    first, second = _commit_two(make_backend)
    backend = make_backend()
    bad = _packs(backend)[0]
    key = layout.pack_index_key(bad)
    data = bytearray(backend.get(key))
    data[30] ^= 0xFF  # inside the first record: the checksum no longer matches
    backend.put(key, bytes(data))
    fresh_cache()
    spy = Spy(make_backend())
    with Repo.open(backend=spy) as repo:
        assert spy.pack_walks() == [layout.pack_key(bad)]
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])
        assert torch.equal(repo.load(second)["w"], _state(2)["w"])
        report = repo.fsck()
        assert [f.objects for f in report.findings] == [(f"packs/{bad}.idx",)]
        assert report.findings[0].kind == "corrupt" and "BLAKE3" in report.findings[0].message


def test_a_damaged_cache_is_rebuilt_from_the_store(make_backend: Callable[[], Backend],
                                                   fresh_cache: Callable[..., Path]) -> None:
    first, _ = _commit_two(make_backend)
    folder = fresh_cache()
    with Repo.open(backend=make_backend()) as repo:
        cache = repo.root
    assert cache.parent == folder
    (cache / "index" / "data.mdb").write_bytes(b"not an lmdb file" * 100)
    with Repo.open(backend=make_backend()) as repo:
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])
        assert repo.fsck().ok


def test_a_stale_cache_is_corrected_after_another_hosts_gc(make_backend: Callable[[], Backend],
                                                           fresh_cache: Callable[..., Path]) -> None:
    with Repo.init(None, chunk_size=CHUNK, backend=make_backend()) as repo:
        first = repo.commit(_state(1), "one", code_version=None)
        repo.branch("dev", first)
        repo.checkout("dev")
        gone = repo.commit(_state(3), "on dev", code_version=None)
        repo.checkout("main")
        kept = repo.commit({**_state(1), "extra": torch.ones(5000)}, "two", code_version=None)
    with Repo.open(backend=make_backend()) as repo:  # this host's cache now knows every pack
        assert torch.equal(repo.load(gone)["w"], _state(3)["w"])
    fresh_cache()  # gc runs on another host
    with Repo.open(backend=make_backend()) as other:
        other.delete_branch("dev", force=True)
        report = other.gc(prune_unreachable_after=0)
        assert report.packs_deleted or report.packs_rewritten
    backend = make_backend()
    assert not [k for k in backend.list("packs") if k.endswith(".idx")
                and k.removesuffix(".idx") + ".pack" not in set(backend.list("packs"))]  # gc removed their indexes
    fresh_cache(1)  # back on the first host: its cache names packs gc deleted
    with Repo.open(backend=make_backend()) as repo:
        existing = set(_packs(repo.backend))
        assert {e.pack for e in repo.chunks.index} <= existing
        assert repo.chunks.index.indexed_packs() == existing
        assert torch.equal(repo.load(kept)["extra"], torch.ones(5000))
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])
        assert repo.fsck(read_data=True).ok


def _count_pack_reads(url: str, env: dict[str, str]) -> None:
    """Child process: open the store, print which pack keys the open fetched or walked."""
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    spy = Spy(FsspecBackend(url))
    with Repo.open(backend=spy) as repo:
        opened = list(spy.opened)
        loaded = repo.load("HEAD")["w"]
    spy.opened = opened
    print(json.dumps({"gets": spy.pack_gets(), "walks": spy.pack_walks(), "sum": float(loaded.sum())}))


def test_the_cache_survives_a_process_restart(s3_server: S3Server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    bucket = f"idx-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/repo"
    env = {**s3_server.env(), "CKPTVCS_INDEX_CACHE": str(tmp_path / "host")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with Repo.init(None, chunk_size=CHUNK, backend=FsspecBackend(url)) as repo:
        repo.commit(_state(1), "one", code_version=None)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import test_index_cache as t; "
            "t._count_pack_reads(sys.argv[1], {})")
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code, url, str(Path(__file__).parent)], capture_output=True,
                             text=True, timeout=300, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] and runs[0]["gets"] == [] and runs[0]["walks"] == []
    assert runs[0]["sum"] == pytest.approx(float(_state(1)["w"].sum()))


def _stage_rank(args: tuple[str, int]) -> dict[str, Any]:
    """A rank process: open the store on S3 (sharing this host's cache) and stage a shard."""
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    url, rank = args
    spy = Spy(FsspecBackend(url))
    with Repo.open(backend=spy) as repo:
        staged = repo.stage({f"rank{rank}": {"w": _state(10 + rank)["w"]}})
    return {"staged": staged, "walks": spy.pack_walks()}


@pytest.fixture
def s3_store(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    bucket = f"idx-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server, bucket)
    for name, value in {**s3_server.env(), "CKPTVCS_INDEX_CACHE": str(tmp_path / "host")}.items():
        monkeypatch.setenv(name, value)
    yield f"s3://{bucket}/repo"


def test_ranks_on_one_host_share_the_cache(s3_store: str) -> None:
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    Repo.init(None, chunk_size=CHUNK, backend=FsspecBackend(s3_store)).close()
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        parts = pool.map(_stage_rank, [(s3_store, r) for r in range(3)])
    assert all(p["walks"] == [] for p in parts)
    spy = Spy(FsspecBackend(s3_store))
    with Repo.open(backend=spy) as coord:
        # every rank recorded its own packs in the shared cache: the coordinator reads none
        assert spy.pack_gets() == [] and spy.pack_walks() == []
        commit = coord.publish(coord.combine_staged([p["staged"] for p in parts]), "sharded", code_version=None)
        loaded = coord.load(commit)
        for r in range(3):
            assert torch.equal(loaded[f"rank{r}"]["w"], _state(10 + r)["w"])


def test_fsck_names_an_index_object_without_its_pack_as_garbage_and_opens_ignore_it() -> None:
    backend = MemoryBackend(f"idx-{uuid.uuid4().hex[:8]}")
    with Repo.init(None, chunk_size=CHUNK, backend=backend) as repo:
        first = repo.commit(_state(1), "one", code_version=None)
        name = _packs(backend)[0]
        stray = "0" * 32
        backend.put(layout.pack_index_key(stray), backend.get(layout.pack_index_key(name)))
        report = repo.fsck()
        assert [(f.kind, f.objects) for f in report.findings] == [("garbage", (f"packs/{stray}.idx",))]
    with Repo.open(backend=backend) as repo:
        assert stray not in repo.chunks.index.indexed_packs()
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])


def test_a_cache_folder_that_cannot_be_made_gives_a_private_index(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("CKPTVCS_INDEX_CACHE", str(blocker / "cache"))
    backend = MemoryBackend(f"idx-{uuid.uuid4().hex[:8]}")
    with Repo.init(None, chunk_size=CHUNK, backend=backend) as repo:
        first = repo.commit(_state(1), "one", code_version=None)
        private = repo.root
        assert private.name.startswith("ckptvcs-index-")
    assert not private.exists()  # removed at close
    with Repo.open(backend=backend) as repo:
        assert torch.equal(repo.load(first)["w"], _state(1)["w"])

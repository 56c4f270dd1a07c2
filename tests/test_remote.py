"""Remotes: push, fetch, pull, clone against memory:// (fast logic) and a real SeaweedFS S3 server.

The S3 tests use the session's ``s3_server`` fixture (tests/s3server.py), one fresh bucket
each. Faults are injected with a small wrapper backend (``Spy``) that counts writes and can
fail the N-th one: a push cut there must leave the remote ref on the old, complete commit.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptvcs import Repo
from ckptvcs.backends import ConcurrentUpdate, KeyMissing
from ckptvcs.backends.fsspec_backend import FsspecBackend
from ckptvcs.errors import (
    CorruptObjectError,
    IntegrityError,
    NonFastForwardError,
    RefExistsError,
    RemoteNotFoundError,
    StorageError,
)
from ckptvcs.remotes import add_remote, clone, fetch, list_remotes, pull, push, remove_remote
from helpers import assert_tensor_identical
from s3server import S3Server, make_bucket, run_server, weed_binary


class Spy:
    """A backend wrapper counting successful writes, failing the ``fail_at``-th write (1-based)."""

    def __init__(self, inner: Any, fail_at: int | None = None, before_swap: Any = None, at_fail: Any = None) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.before_swap = before_swap
        self.at_fail = at_fail  # instead of raising at the fail_at-th write: call this, then write
        self.writes: list[str] = []  # keys written (puts that created, writer commits, swaps)
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _attempt(self, key: str) -> None:
        self.attempts += 1
        if self.fail_at is not None and self.attempts == self.fail_at:
            if self.at_fail is not None:
                self.at_fail()
                return
            raise OSError(5, "injected failure (connection lost)", key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        self._attempt(key)
        created = self.inner.put(key, data, if_absent=if_absent)
        if created:
            self.writes.append(key)
        return created

    def open_writer(self, key: str) -> Any:
        inner, spy = self.inner.open_writer(key), self

        class Writer:
            def write(self, data: bytes) -> None:
                inner.write(data)

            def commit(self) -> None:
                spy._attempt(key)
                inner.commit()
                spy.writes.append(key)

            def abort(self) -> None:
                inner.abort()

        return Writer()

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        if self.before_swap is not None:
            hook, self.before_swap = self.before_swap, None
            hook()
        self._attempt(key)
        self.inner.compare_and_swap(key, expected, new)
        self.writes.append(key)


def _state(seed: int, n: int = 6000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(n, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16)},
        "opt": {"m": torch.randn(n, generator=g), "step": torch.tensor(seed, dtype=torch.int64)},
        "step": seed,
        "meta": {"lr": 0.1, "name": "run"},
    }


def _assert_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("w", "b"):
        assert_tensor_identical(actual["model"][key], expected["model"][key])
    assert_tensor_identical(actual["opt"]["m"], expected["opt"]["m"])
    assert_tensor_identical(actual["opt"]["step"], expected["opt"]["step"])
    assert actual["step"] == expected["step"] and actual["meta"] == expected["meta"]


def _open(url: str) -> FsspecBackend:
    return FsspecBackend(url)


# -- the backend ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "local", "s3"])
def test_fsspec_backend_contract(where: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = {"memory": lambda: f"memory://contract-{uuid.uuid4().hex}/x", "local": lambda: str(tmp_path / "r"),
           "s3": lambda: request.getfixturevalue("s3_url")}[where]()
    b = _open(url)
    assert b.capabilities.conditional_put == (where == "s3")
    assert not b.capabilities.advisory_locks and b.local_root() is None
    assert b.put("a/b/k1", b"hello") is True
    assert b.put("a/b/k1", b"other", if_absent=True) is False
    assert b.get("a/b/k1") == b"hello" and b.size("a/b/k1") == 5 and b.size("nope") is None
    with pytest.raises(KeyMissing):
        b.get("nope")
    with pytest.raises(CorruptObjectError, match="a/b/k1"):  # as every backend (test_backend_contract.py)
        b.get("a/b/k1", max_size=2)
    reader = b.open_reader("a/b/k1")
    assert reader.read(1, 3) == b"ell" and reader.size == 5
    assert reader.read(3, 10) == b"lo"  # short only where the object ends
    buf = bytearray(2)
    assert reader.readinto([buf], 0) == 2 and buf == b"he"
    b.compare_and_swap("refs/x", None, b"1")
    with pytest.raises(ConcurrentUpdate) as lost:
        b.compare_and_swap("refs/x", None, b"2")
    assert lost.value.current == b"1"
    b.compare_and_swap("refs/x", b"1", b"2")
    with pytest.raises(ConcurrentUpdate):
        b.compare_and_swap("refs/x", b"1", b"3")
    assert b.get("refs/x") == b"2"
    writer = b.open_writer("packs/p1")
    writer.write(b"x" * 100)
    assert b.size("packs/p1") is None  # invisible until commit
    writer.commit()
    assert b.size("packs/p1") == 100
    aborted = b.open_writer("packs/p2")
    aborted.write(b"y")
    aborted.abort()
    assert b.size("packs/p2") is None
    b.append("log", b"l1\n")
    b.append("log", b"l2\n")
    assert b.get("log") == b"l1\nl2\n"
    assert list(b.list()) == ["a/b/k1", "log", "packs/p1", "refs/x"]
    assert list(b.list("a")) == ["a/b/k1"] and list(b.list("none")) == []
    b.compare_and_swap("refs/x", b"2", None)
    assert b.size("refs/x") is None
    assert b.delete("a/b/k1") and not b.delete("a/b/k1")
    with pytest.raises(NotImplementedError):
        b.lock("gc", exclusive=True, timeout=1)


def test_s3_conditional_put_is_native(s3_url: str) -> None:
    """Two writers of one absent key through two clients: the server itself refuses the second."""
    first, second = _open(s3_url), _open(s3_url)
    assert first.put("k", b"1", if_absent=True) is True
    assert second.put("k", b"2", if_absent=True) is False
    assert first.get("k") == b"1"


# -- push, clone, fetch --------------------------------------------------------------------


def test_push_clone_load_bit_exact_s3(origin: Repo, s3_url: str, s3_server: S3Server, tmp_path: Path) -> None:
    s1, s2 = _state(1), _state(2)
    c1 = origin.commit(s1, "one", step=1)
    c2 = origin.commit(s2, "two", step=2)
    origin.tag("v1", c1)
    add_remote(origin, "origin", s3_url, endpoint_url=s3_server.endpoint_url)
    report = push(origin, "origin", ["main", "v1"])
    assert set(report.updated) == {"refs/heads/main", "refs/tags/v1"}
    assert origin.refs.read_raw("refs/remotes/origin/main") == c2
    with clone(s3_url, tmp_path / "copy", endpoint_url=s3_server.endpoint_url) as copy:
        assert copy.head() == ("main", c2)
        assert copy.resolve("v1") == c1
        _assert_state(copy.load(), s2)
        _assert_state(copy.load(c1), s1)
        assert [c.id for c in copy.log()] == [c2, c1]
        assert copy.fsck(read_data=True).findings == []
        assert list_remotes(copy)["origin"].url == s3_url


def test_second_push_sends_only_new_data(origin: Repo, s3_url: str) -> None:
    state = _state(1, n=20000)
    origin.commit(state, "one")
    spy = Spy(_open(s3_url))
    first = push(origin, spy)
    first_packs = {k for k in spy.writes if k.endswith(".pack")}
    assert first.packs_sent and first.bytes_sent > 80_000
    state["opt"]["step"] = torch.tensor(2)  # a tiny change: one small new chunk
    state["step"] = 2
    c2 = origin.commit(state, "two")
    spy.writes.clear()
    second = push(origin, spy)
    assert second.updated["refs/heads/main"][1] == c2
    assert not first_packs & set(spy.writes)  # nothing sent twice
    assert 0 < second.bytes_sent < first.bytes_sent / 10
    spy.writes.clear()
    third = push(origin, spy)
    assert third.up_to_date == ["refs/heads/main"] and not third.updated and spy.writes == []


def test_two_pushers_one_wins(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    origin.commit(_state(1), "base")
    push(origin, memory_url)
    with clone(memory_url, tmp_path / "a") as a, clone(memory_url, tmp_path / "b") as b:
        ca = a.commit(_state(2), "from a")
        b.commit(_state(3), "from b")
        push(a, "origin")
        with pytest.raises(NonFastForwardError, match="non-fast-forward") as err:
            push(b, "origin")
        assert err.value.exit_code == 7 and err.value.current == ca
        assert _open(memory_url).get("refs/heads/main").decode().strip() == ca


def test_two_concurrent_pushers_race_at_the_swap_s3(origin: Repo, s3_url: str, tmp_path: Path) -> None:
    """B checks fast-forward, uploads, and just before its compare-and-swap A's push lands:
    the server's conditional put refuses B's swap."""
    origin.commit(_state(1), "base")
    push(origin, s3_url)
    with clone(s3_url, tmp_path / "a") as a, clone(s3_url, tmp_path / "b") as b:
        ca = a.commit(_state(2), "from a")
        b.commit(_state(3), "from b")
        spy = Spy(_open(s3_url), before_swap=lambda: push(a, "origin"))
        with pytest.raises(NonFastForwardError, match="another push won"):
            push(b, spy)
        assert _open(s3_url).get("refs/heads/main").decode().strip() == ca
        with clone(s3_url, tmp_path / "c") as c:
            assert c.head()[1] == ca
            c.load()


def test_interrupted_push_keeps_old_commit_and_resumes(origin: Repo, s3_url: str, tmp_path: Path) -> None:
    s1 = _state(1)
    c1 = origin.commit(s1, "one")
    push(origin, s3_url)
    s2 = _state(2)
    c2 = origin.commit(s2, "two")
    # writes of the second push: pack (1), its index (2), manifest (3), commit (4), ref swap (5)
    faulty = Spy(_open(s3_url), fail_at=3)
    with pytest.raises(StorageError, match="injected failure"):
        push(origin, faulty)
    arrived = [k for k in faulty.writes if k.endswith((".pack", ".idx"))]
    assert len(arrived) == 2
    assert _open(s3_url).get("refs/heads/main").decode().strip() == c1
    with clone(s3_url, tmp_path / "meanwhile") as seen:  # a reader sees the old, complete commit
        assert seen.head()[1] == c1
        _assert_state(seen.load(), s1)
    retry = Spy(_open(s3_url))
    report = push(origin, retry)
    assert report.updated["refs/heads/main"] == (c1, c2)
    assert not [k for k in retry.writes if k.startswith("packs/")]  # arrived packs were not re-sent
    with clone(s3_url, tmp_path / "after") as after:
        _assert_state(after.load(), s2)


def test_push_interrupted_inside_a_pack_resends_it(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    origin.commit(_state(1), "one")
    with pytest.raises(StorageError):
        push(origin, Spy(_open(memory_url), fail_at=1))  # the pack upload itself fails
    assert _open(memory_url).size("refs/heads/main") is None
    retry = Spy(_open(memory_url))
    push(origin, retry)
    assert any(k.endswith(".pack") for k in retry.writes)
    with clone(memory_url, tmp_path / "c") as c:
        _assert_state(c.load(), _state(1))


def test_corrupted_remote_chunk_is_detected_on_fetch(origin: Repo, s3_url: str, tmp_path: Path) -> None:
    origin.commit(_state(1), "one")
    push(origin, s3_url)
    remote = _open(s3_url)
    pack_key = next(k for k in remote.list("packs") if k.endswith(".pack"))
    good = remote.get(pack_key)
    bad = bytearray(good)
    bad[200] ^= 0x40  # inside the first entry's payload: frame and index still match
    remote.put(pack_key, bytes(bad))
    with pytest.raises(IntegrityError, match="remote pack"):
        clone(s3_url, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # a failed clone leaves nothing
    with Repo.init(tmp_path / "other", chunk_size=4096) as other:
        add_remote(other, "origin", s3_url)
        with pytest.raises(IntegrityError):
            fetch(other, "origin")
        assert other.refs.read_raw("refs/remotes/origin/main") is None
        assert len(other.chunks.index) == 0 and not list((other.root / "packs").iterdir())
        remote.put(pack_key, good)  # the remote repaired: the same fetch now succeeds
        report = fetch(other, "origin")
        assert report.chunks_verified > 0 and other.refs.read_raw("refs/remotes/origin/main") is not None


def test_corrupted_remote_object_is_detected(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    c1 = origin.commit(_state(1), "one")
    push(origin, memory_url)
    remote = _open(memory_url)
    key = f"objects/{c1[:2]}/{c1[2:]}"
    data = bytearray(remote.get(key))
    data[-3] ^= 0x01
    remote.put(key, bytes(data))
    with pytest.raises(IntegrityError, match="on the remote"):
        clone(memory_url, tmp_path / "copy")


def test_non_fast_forward_and_tags(origin: Repo, memory_url: str) -> None:
    c1 = origin.commit(_state(1), "one")
    c2 = origin.commit(_state(2), "two")
    push(origin, memory_url)
    assert push(origin, memory_url, []).updated == {}  # nothing named: nothing moves
    origin.tag("v1", c1)
    push(origin, memory_url, ["v1"])
    origin.delete_tag("v1")
    origin.tag("v1", c2)
    with pytest.raises(NonFastForwardError, match="tags do not move"):
        push(origin, memory_url, ["v1"])
    push(origin, memory_url, ["v1"], force=True)


def test_pull_fast_forwards_and_refuses_diverged(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    origin.commit(_state(1), "one")
    push(origin, memory_url)
    with clone(memory_url, tmp_path / "copy") as copy:
        c2 = origin.commit(_state(2), "two")
        push(origin, memory_url)
        _, moved = pull(copy, "origin")
        assert moved == c2 and copy.head() == ("main", c2)
        assert pull(copy, "origin")[1] is None  # up to date
        origin.commit(_state(3), "three")
        push(origin, memory_url)
        copy.commit(_state(4), "diverging")
        with pytest.raises(NonFastForwardError, match="diverged"):
            pull(copy, "origin")


def test_remote_config(origin: Repo, memory_url: str) -> None:
    with pytest.raises(RemoteNotFoundError, match="no remote named 'origin'"):
        push(origin, "origin")
    add_remote(origin, "origin", memory_url, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(RefExistsError):
        add_remote(origin, "origin", memory_url)
    with Repo.open(origin.root) as again:
        assert list_remotes(again)["origin"].endpoint_url == "http://127.0.0.1:1"
    remove_remote(origin, "origin")
    assert list_remotes(origin) == {}
    with pytest.raises(RemoteNotFoundError):
        push(origin, "origin")


def test_fetched_history_survives_gc(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    """gc keeps what remote-tracking refs reach, like branches."""
    origin.commit(_state(1), "one")
    push(origin, memory_url)
    with Repo.init(tmp_path / "other", chunk_size=4096) as other:
        add_remote(other, "origin", memory_url)
        fetch(other, "origin")
        other.gc(prune_unreachable_after="now")  # no reflog grace: only refs keep data
        _assert_state(other.load("refs/remotes/origin/main"), _state(1))


# -- the CLI -------------------------------------------------------------------------------


def test_cli_remote_push_clone_fetch_pull(origin: Repo, s3_url: str, s3_server: S3Server, tmp_path: Path) -> None:
    """The installed command against the S3 server: torch-free, one-line errors with exit codes."""
    from test_cli import assert_one_line_error, ok, run
    from test_cli_git_habits import audited

    env = s3_server.env()
    store = str(origin.root)
    c1 = origin.commit(_state(1), "one")
    ok("--repo", store, "remote", "add", "origin", s3_url, "--endpoint-url", s3_server.endpoint_url, cwd=tmp_path)
    assert ok("--repo", store, "remote", "-v", cwd=tmp_path).split() == [
        "origin", s3_url, "(endpoint", f"{s3_server.endpoint_url})"]
    result, torch_imported = audited("--repo", store, "push", cwd=tmp_path, env=env)
    assert result.returncode == 0 and not torch_imported, result.stderr
    assert f"refs/heads/main: (none) -> {c1[:12]}" in result.stdout
    result, torch_imported = audited("clone", s3_url, str(tmp_path / "copy"), cwd=tmp_path, env=env)
    assert result.returncode == 0 and not torch_imported, result.stderr
    assert f"main at {c1[:12]}" in result.stdout
    ok("clone", "--lazy", s3_url, str(tmp_path / "lazy"), cwd=tmp_path, env=env)
    with Repo.open(tmp_path / "lazy") as lazy:
        _assert_state(lazy.load(), _state(1))
    copy = str(tmp_path / "copy")
    c2 = origin.commit(_state(2), "two")
    push(origin, "origin")
    assert f"Fast-forwarded main to {c2[:12]}" in ok("--repo", copy, "pull", cwd=tmp_path, env=env)
    with Repo.open(copy) as cloned:
        cloned.commit(_state(3), "diverging")
    origin.commit(_state(4), "three")
    push(origin, "origin")
    assert_one_line_error(run("--repo", copy, "push", cwd=tmp_path, env=env), 7, "non-fast-forward")


# -- lazy clones -----------------------------------------------------------------------------


def test_lazy_clone_loads_one_key_by_ranged_reads_s3(origin: Repo, s3_url: str, tmp_path: Path) -> None:
    """A lazy clone fetches history only; load(keys=["model"]) fetches just the model's chunks, verified."""
    s1, s2 = _state(1, n=20000), _state(2, n=20000)
    origin.commit(s1, "one")
    c2 = origin.commit(s2, "two")
    push(origin, s3_url)
    remote_bytes = sum(_open(s3_url).size(k) or 0 for k in _open(s3_url).list("packs") if k.endswith(".pack"))
    with clone(s3_url, tmp_path / "lazy", lazy=True) as lazy:
        assert lazy.head() == ("main", c2) and len(lazy.chunks.index) == 0
        assert [c.message for c in lazy.log()] == ["two", "one"]  # history is local
    with Repo.open(tmp_path / "lazy") as lazy:  # a fresh open still knows where chunks come from
        model = lazy.load(keys=["model"])
        assert_tensor_identical(model["model"]["w"], s2["model"]["w"])
        assert_tensor_identical(model["model"]["b"], s2["model"]["b"])
        model_chunks = len(lazy.chunks.index)
        local_bytes = sum(p.stat().st_size for p in (lazy.root / "packs").iterdir())
        assert 0 < local_bytes < remote_bytes / 2  # the optimizer state stayed on the remote
        _assert_state(lazy.load(), s2)  # the rest arrives on demand
        assert len(lazy.chunks.index) > model_chunks
        _assert_state(lazy.load("HEAD~1"), s1)


def test_lazy_clone_refuses_a_corrupted_chunk(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    origin.commit(_state(1), "one")
    push(origin, memory_url)
    remote = _open(memory_url)
    pack_key = next(k for k in remote.list("packs") if k.endswith(".pack"))
    bad = bytearray(remote.get(pack_key))
    bad[200] ^= 0x40
    remote.put(pack_key, bytes(bad))
    with clone(memory_url, tmp_path / "lazy", lazy=True) as lazy:
        with pytest.raises(IntegrityError, match="fetched from remote pack"):
            lazy.load()
        assert len(lazy.chunks.index) == 0  # nothing unverified stays indexed


# -- fsck --remote ---------------------------------------------------------------------------


def test_fsck_remote_structure_and_data(origin: Repo, memory_url: str) -> None:
    from ckptvcs.remotes.check import check_remote

    origin.commit(_state(1), "one")
    c2 = origin.commit(_state(2), "two")
    add_remote(origin, "origin", memory_url)
    push(origin, "origin")
    healthy = check_remote(origin, "origin", read_data=True)
    assert healthy.ok and healthy.commits == 2 and healthy.chunks > 0, healthy.findings
    remote = _open(memory_url)
    pack_key = next(k for k in remote.list("packs") if k.endswith(".pack"))
    good = remote.get(pack_key)
    bad = bytearray(good)
    bad[200] ^= 0x40
    remote.put(pack_key, bytes(bad))
    assert check_remote(origin, "origin").ok  # the structure is intact
    damaged = check_remote(origin, "origin", read_data=True)
    assert not damaged.ok and "remote pack" in damaged.findings[0]
    remote.put(pack_key, good)
    remote.delete(f"objects/{c2[:2]}/{c2[2:]}")
    missing = check_remote(origin, "origin")
    assert not missing.ok and c2 in missing.findings[0] and "missing" in missing.findings[0]


@pytest.mark.slow
def test_server_killed_mid_push_then_retry(origin: Repo, tmp_path: Path) -> None:
    """SIGKILL the S3 server between the pack and the objects of a push; restart it on the
    same data: the remote ref still names the old commit, and the retried push completes."""
    if weed_binary() is None:
        pytest.skip("no SeaweedFS weed binary")
    data, url = tmp_path / "weed", "s3://killed/repo"
    s1, s2 = _state(1), _state(2)
    c1 = origin.commit(s1, "one")
    with run_server(data) as server:
        make_bucket(server, "killed")
        push(origin, FsspecBackend(url, **server.storage_options()))
        c2 = origin.commit(s2, "two")
        # writes: pack (1), index (2), manifest (3): the server dies just before the manifest
        dying = Spy(FsspecBackend(url, **server.storage_options()), fail_at=3, at_fail=server.kill)
        with pytest.raises(StorageError):
            push(origin, dying)
        ports = server.ports
    with run_server(data, ports) as server:
        backend = FsspecBackend(url, **server.storage_options())
        assert backend.get("refs/heads/main").decode().strip() == c1
        with clone(backend, tmp_path / "before") as before:
            _assert_state(before.load(), s1)
        retry = Spy(backend)
        assert push(origin, retry).updated["refs/heads/main"] == (c1, c2)
        assert not [k for k in retry.writes if k.startswith("packs/")]
        with clone(backend, tmp_path / "after") as after:
            _assert_state(after.load(), s2)


# -- tiers ---------------------------------------------------------------------------------


def test_archive_keeps_last_n_local_and_loads_the_rest_back(origin: Repo, memory_url: str) -> None:
    from ckptvcs.remotes import archive

    states = [_state(i, n=20000) for i in range(4)]
    ids = [origin.commit(s, f"step {i}") for i, s in enumerate(states)]
    origin.tag("release", ids[0])
    add_remote(origin, "origin", memory_url)
    not_pushed = archive(origin, "origin", keep_last=1, dry_run=True)
    assert not_pushed.archived == [] and set(not_pushed.not_on_remote) == {ids[1], ids[2]}
    push(origin, "origin")
    before = sum(p.stat().st_size for p in (origin.root / "packs").iterdir())
    report = archive(origin, "origin", keep_last=1)
    assert set(report.archived) == {ids[1], ids[2]}  # ids[3] is the newest, ids[0] tagged
    assert report.bytes_compared > 0 and report.gc is not None and report.gc.bytes_reclaimed > 0
    after = sum(p.stat().st_size for p in (origin.root / "packs").iterdir())
    assert after < before
    with Repo.open(origin.root) as again:  # a fresh handle loads archived commits from the remote
        assert again.show(ids[1]).pruned["rule"] == "archived"
        for commit_id, state in zip(ids, states):
            _assert_state(again.load(commit_id), state)
        assert again.fsck().ok


def test_interrupted_fetch_resumes_without_downloading_again(origin: Repo, memory_url: str, tmp_path: Path) -> None:
    origin.commit(_state(1), "one")
    push(origin, memory_url)
    origin.commit(_state(2), "two")
    push(origin, memory_url)  # two packs on the remote

    class Reads(Spy):
        def __init__(self, inner: Any, fail_pack: int | None) -> None:
            super().__init__(inner)
            self.packs_read: list[str] = []
            self.fail_pack = fail_pack

        def open_reader(self, key: str) -> Any:
            self.packs_read.append(key)
            if self.fail_pack is not None and len(self.packs_read) == self.fail_pack:
                raise OSError(104, "injected: connection reset", key)
            return self.inner.open_reader(key)

    with Repo.init(tmp_path / "other", chunk_size=4096) as other:
        first = Reads(_open(memory_url), fail_pack=2)
        with pytest.raises(StorageError, match="connection reset"):
            fetch(other, first, workers=1)
        assert len(other.chunks.index) == 0  # nothing placed: the fetch was all or nothing
        second = Reads(_open(memory_url), fail_pack=None)
        fetch(other, second, workers=1)
        assert second.packs_read == [first.packs_read[1]]  # only the pack that had not arrived
        _assert_state(other.load(next(iter(fetch(other, second).remote_refs.values()))), _state(2))

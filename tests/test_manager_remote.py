"""CheckpointManager(remote=...): background pushes and two-tier retention, against a real SeaweedFS S3 server.

A real training loop (a tiny model, SGD) saves through the manager; each save is pushed
by the manager's background worker (ckptvcs.training.remote_sync). Failures are real
ones: a bucket that does not exist yet (the push fails, training goes on, the bucket is
created, the next save's push carries everything), and, in the slow variant, the server
killed between saves and started again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptvcs import CheckpointManager, Repo
from ckptvcs.backends.fsspec_backend import FsspecBackend
from ckptvcs.errors import CkptvcsError, RemoteNotFoundError
from ckptvcs.remotes import add_remote, clone, list_remotes
from helpers import assert_tensor_identical
from s3server import S3Server, make_bucket, run_server, weed_binary


class Loop:
    """A tiny model trained with SGD; ``snapshots`` keeps each saved step's state."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def train_step(self) -> float:
        x = torch.randn(16, 64)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def remember(self, commit_id: str) -> None:
        self.snapshots[commit_id] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class Outage:
    """A TCP relay in front of the S3 server: ``down()`` closes it (connections refused, open
    ones cut), ``up()`` listens again on the same port. A real network outage for a remote
    configured with this relay's endpoint, without restarting the server."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def _assert_model(loaded: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded["model"]) == set(expected)
    for key, tensor in expected.items():
        assert_tensor_identical(loaded["model"][key], tensor)


def _remote_ref(url: str, branch: str = "main") -> str | None:
    value = FsspecBackend(url).get(f"refs/heads/{branch}") if FsspecBackend(url).size(f"refs/heads/{branch}") else None
    return value.decode().strip() if value is not None else None


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    name = f"ckptvcs-mgr-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_env, name)
    return name


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Repo]:
    repo = Repo.init(tmp_path / "run", chunk_size=4096)
    try:
        yield repo
    finally:
        repo.close()


def test_loop_pushes_every_save_and_a_clone_loads_it_bit_exact(store: Repo, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/runs/a"
    loop = Loop()
    with CheckpointManager(store, {"model": loop.model, "opt": loop.opt}, every_steps=1, remote=url,
                           code_version=None) as mgr:
        assert list_remotes(store)["origin"].url == url  # a URL becomes the remote "origin"
        for step in range(1, 4):
            loss = loop.train_step()
            commit_id = mgr.step(step, {"loss": loss})
            loop.remember(commit_id)
            mgr.wait()  # drains the background push
            assert mgr.remote_error is None
            assert _remote_ref(url) == commit_id  # every save reached the remote
        last = mgr.last_commit
    assert store.refs.read_raw("refs/remotes/origin/main") == last
    with clone(url, tmp_path / "elsewhere") as other:
        assert other.head()[1] == last
        for commit_id, expected in loop.snapshots.items():
            _assert_model(other.load(commit_id), expected)


def test_async_saves_push_in_order_and_close_drains(store: Repo, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/runs/async"
    add_remote(store, "backup", url)
    loop = Loop(1)
    with CheckpointManager(store, {"model": loop.model}, every_steps=1, async_save=True, remote="backup",
                           code_version=None) as mgr:
        for step in range(1, 6):
            loop.train_step()
            mgr.step(step).result()
            loop.remember(mgr.last_commit)
    assert _remote_ref(url) == mgr.last_commit  # close() drained the queue
    with clone(url, tmp_path / "c") as other:
        _assert_model(other.load("main"), loop.snapshots[mgr.last_commit])


def test_failed_push_does_not_stop_training_and_is_retried(store: Repo, bucket: str, s3_env: S3Server,
                                                           tmp_path: Path) -> None:
    """The remote is unreachable (its endpoint refuses connections): pushes fail, training
    goes on, a warning says so; once it is back the next save's push sends every commit the
    remote lacks."""
    url = f"s3://{bucket}/run"
    outage = Outage(s3_env.endpoint_url)
    add_remote(store, "origin", url, endpoint_url=outage.endpoint)
    loop = Loop(2)
    with CheckpointManager(store, {"model": loop.model, "opt": loop.opt}, every_steps=1, remote="origin",
                           code_version=None) as mgr:
        loop.train_step()
        loop.remember(mgr.step(1))  # down from the start
        mgr.wait()
        assert mgr.remote_error is not None  # reported, not raised
        assert store.resolve("main") == mgr.last_commit  # the save itself is there
        outage.up()
        try:
            loop.train_step()
            with pytest.warns(RuntimeWarning, match="background push to remote 'origin' failed"):
                loop.remember(mgr.step(2))  # the step-1 failure is reported at the next call
            mgr.wait()
            assert mgr.remote_error is None
            assert _remote_ref(url) == mgr.last_commit
        finally:
            outage.down()
    with clone(url, tmp_path / "c") as other:
        for commit_id, expected in loop.snapshots.items():  # the commits whose own push failed too
            _assert_model(other.load(commit_id), expected)


def test_close_raises_when_the_last_push_still_fails(store: Repo, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    add_remote(store, "origin", str(tmp_path / "a-file" / "remote"))  # a folder that cannot be made
    loop = Loop(3)
    mgr = CheckpointManager(store, {"model": loop.model}, every_steps=1, remote="origin", code_version=None)
    loop.train_step()
    mgr.step(1)
    with pytest.raises(CkptvcsError):
        mgr.close()
    assert store.resolve("main") == mgr.last_commit  # the local checkpoint is there


def test_retention_archives_to_the_remote_and_archived_commits_load_bit_exact(store: Repo, bucket: str) -> None:
    url = f"s3://{bucket}/runs/tiers"
    loop = Loop(4)
    with CheckpointManager(store, {"model": loop.model, "opt": loop.opt}, every_steps=1, keep_last=2, remote=url,
                           code_version=None) as mgr:
        for step in range(1, 6):
            loop.train_step()
            loop.remember(mgr.step(step))
            mgr.wait()
        assert mgr.remote_error is None
        ids = list(loop.snapshots)
        archived = [c for c in ids if (store.pruned_record(c) or {}).get("rule") == "archived"]
        assert archived and set(archived) <= set(ids[:-2])  # the last two stay local
        assert all(store.pruned_record(c) is None or c in archived for c in ids)  # nothing pruned and lost
        for commit_id in archived:  # the manager's own handle loads them back from the remote
            _assert_model(mgr.repo.load(commit_id), loop.snapshots[commit_id])
    with Repo.open(store.root) as again:
        assert again.config.get("lazy_remote") == "origin"
        for commit_id, expected in loop.snapshots.items():
            _assert_model(again.load(commit_id), expected)
        assert again.fsck().ok


def test_remote_option_validation(store: Repo) -> None:
    loop = Loop()
    with pytest.raises(RemoteNotFoundError):
        CheckpointManager(store, {"model": loop.model}, remote="nosuchremote")


@pytest.mark.slow
def test_server_killed_between_saves_then_back(store: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the S3 server while training: saves go on locally, pushes fail and are
    reported; the server comes back on the same data and the next save pushes the rest."""
    if weed_binary() is None:
        pytest.skip("no SeaweedFS weed binary")
    data, url = tmp_path / "weed", "s3://killed/run"
    loop = Loop(5)
    with run_server(data) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        make_bucket(server, "killed")
        mgr = CheckpointManager(store, {"model": loop.model}, every_steps=1, remote=url, code_version=None)
        loop.train_step()
        loop.remember(mgr.step(1))
        mgr.wait()
        assert mgr.remote_error is None
        server.kill()
        ports = server.ports
    loop.train_step()
    loop.remember(mgr.step(2))
    mgr.wait()
    assert mgr.remote_error is not None
    with run_server(data, ports):
        loop.train_step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            loop.remember(mgr.step(3))
        mgr.close()
        assert mgr.remote_error is None and _remote_ref(url) == mgr.last_commit
        with clone(url, tmp_path / "c") as other:
            for commit_id, expected in loop.snapshots.items():
                _assert_model(other.load(commit_id), expected)


# -- what lives where; gc and remotes ------------------------------------------------------


def _tensors(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(20000, generator=g)}, "opt": {"m": torch.randn(20000, generator=g)}}


def test_where_splits_commits_by_tier_and_the_cli_shows_it(store: Repo, tmp_path: Path) -> None:
    from ckptvcs.remotes import archive, push, where

    ids = [store.commit(_tensors(i), f"step {i}") for i in range(3)]
    assert where(store).counts["local_only"] == 3 and "no remotes configured" in where(store).line()
    remote = tmp_path / "remote"  # a folder remote: the CLI in a child process reaches it too
    add_remote(store, "origin", str(remote))
    push(store, "origin")
    ids.append(store.commit(_tensors(3), "step 3"))  # not pushed
    report = archive(store, "origin", keep_last=2)
    assert set(report.archived) == {ids[0], ids[1]}
    tiers = where(store)
    assert tiers.commits == {ids[0]: "remote_only", ids[1]: "remote_only", ids[2]: "local_and_remote",
                             ids[3]: "local_only"}
    assert tiers.on_remote[ids[2]] == ["origin"]
    with clone(str(remote), tmp_path / "lazy", lazy=True) as lazy:
        lazy_tiers = where(lazy)
        assert lazy_tiers.lazy_remote == "origin" and set(lazy_tiers.commits.values()) == {"not_fetched"}
        lazy.load(ids[2], keys=["model"])  # the model's chunks only: still partly fetched
        assert where(lazy).commits[ids[2]] == "not_fetched"
        lazy.load(ids[2])
        assert where(lazy).commits[ids[2]] == "local_and_remote"

    from test_cli import ok

    stats = __import__("json").loads(ok("--repo", str(store.root), "stats", "--json", cwd=tmp_path))
    assert stats["tiers"]["counts"]["remote_only"] == 2 and stats["tiers"]["commits"][ids[3]] == "local_only"
    text = ok("--repo", str(store.root), "stats", cwd=tmp_path)
    assert "1 local only, 1 local + remote, 2 only on the remote (archived)" in text
    status = __import__("json").loads(ok("--repo", str(store.root), "status", "--json", cwd=tmp_path))
    assert status["tiers"]["counts"]["local_and_remote"] == 1 and status["tiers"]["remotes"] == {"origin": str(remote)}
    assert "tiers:   1 local only" in ok("--repo", str(store.root), "status", cwd=tmp_path)

    from ckptvcs.report import build_summary, render_html

    summary = build_summary(store)
    assert summary["remotes"]["counts"]["remote_only"] == 2
    assert "Storage tiers: 1 local only, 1 local + remote, 2 only on the remote (archived)" in render_html(summary)


def test_local_gc_keeps_what_remote_tracking_refs_need_and_never_touches_the_remote(store: Repo, tmp_path: Path) -> None:
    """gc keeps a commit only a remote-tracking ref names (the local branch moved off it), and
    deletes nothing on the remote: archived commits still load back after a full gc."""
    from ckptvcs.remotes import archive, push

    remote = tmp_path / "remote"
    add_remote(store, "origin", str(remote))
    ids = [store.commit(_tensors(i), f"step {i}") for i in range(4)]
    push(store, "origin")
    assert set(archive(store, "origin", keep_last=2).archived) == {ids[0], ids[1]}
    before = sorted((p.relative_to(remote), p.read_bytes()) for p in remote.rglob("*") if p.is_file())
    store.branch("side", ids[2])
    store.checkout("side")
    store.delete_branch("main", force=True)  # only refs/remotes/origin/main still names ids[3]
    store.gc(prune_unreachable_after="now")
    _assert_tensors(store.load("refs/remotes/origin/main"), _tensors(3))
    with Repo.open(store.root) as again:
        _assert_tensors(again.load(ids[0]), _tensors(0))  # archived: fetched back from the remote
    after = sorted((p.relative_to(remote), p.read_bytes()) for p in remote.rglob("*") if p.is_file())
    assert [k for k, _ in before if not str(k).endswith(".lock")] == [k for k, _ in after if not str(k).endswith(".lock")]


def _assert_tensors(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for part in ("model", "opt"):
        for key, tensor in expected[part].items():
            assert_tensor_identical(actual[part][key], tensor)

"""gc never loses a live chunk nor leaves an undecodable index row; commits never dedup
against one; gc and commits never starve each other of the repository lock.

(Issue 9 points 1, 2 and 4. The randomised campaign and the soak are in
test_gc_campaign.py.)
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import pytest
import torch
from click.testing import CliRunner

from ckptvcs import CheckpointManager, IndexMismatchError, LockTimeoutError, Repo, _fs
from ckptvcs.cli import cli
from ckptvcs.index import encode_entry
from helpers import assert_tensor_identical, store_snapshot


def tensor(seed: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def assert_no_errors(repo: Repo) -> None:
    report = repo.fsck()
    assert report.ok, [str(f) for f in report.errors]


def orphaned_delta_history(repo: Repo) -> tuple[torch.Tensor, str]:
    """c2's delta chunk of ``a`` sits in a pack that stays (its big tensor is still used by
    c3) while its base, c1's ``a``, sits in a pack that gc deletes; c1 and c2 are pruned.
    Returns c2's ``a`` (one 4 KiB chunk, stored as a delta) and c3's id."""
    a1 = tensor(1, 1024)
    a2 = a1.clone()
    a2[:10] += 1
    big = tensor(9, 16384)
    c1 = repo.commit({"a": a1, "u": tensor(2, 4096)}, "c1", code_version=None)
    c2 = repo.commit({"a": a2, "big": big}, "c2", code_version=None)
    c3 = repo.commit({"a": tensor(3, 1024), "big": big}, "c3", code_version=None)
    delta = repo.chunks.index.get(bytes.fromhex(repo.manifest(c2).blobs[0]["chunks"][0]))
    assert delta.base is not None  # the scenario needs a2 stored as a delta against a1
    repo.prune(c1, "manual")
    repo.prune(c2, "manual")
    return a2, c3


def test_gc_drops_the_row_of_a_dead_delta_whose_base_it_deletes(small_repo) -> None:
    a2, _ = orphaned_delta_history(small_repo)
    chunk = bytes.fromhex(small_repo.manifest("HEAD~1").blobs[0]["chunks"][0])
    report = small_repo.gc()
    assert len(report.packs_deleted) == 1 and not report.packs_rewritten  # c2's pack stays, mostly live
    assert report.stale_index_rows == 1
    assert small_repo.chunks.index.get(chunk) is None
    assert_no_errors(small_repo)  # no index row names a base that is gone
    again = small_repo.commit({"a": a2}, "a2 again", code_version=None)
    assert small_repo.show(again).stats["new_chunks"] == 1  # stored anew, not deduplicated
    assert_tensor_identical(small_repo.load(again)["a"], a2)


def test_a_commit_never_dedups_against_a_broken_chain(small_repo) -> None:
    a2, _ = orphaned_delta_history(small_repo)
    chunk = bytes.fromhex(small_repo.manifest("HEAD~1").blobs[0]["chunks"][0])
    delta = small_repo.chunks.index.get(chunk)
    base = small_repo.chunks.index.get(delta.base)
    small_repo.chunks.index.update(put=[], remove=[base])  # the delta's row stays, its base's goes
    again = small_repo.commit({"a": a2}, "a2 again", code_version=None)
    assert_tensor_identical(small_repo.load(again)["a"], a2)
    assert small_repo.show(again).stats["new_chunks"] == 1
    assert small_repo.chunks.has_complete_chain(chunk)  # the new row replaced the broken one


def test_repair_index_leaves_out_a_delta_whose_base_is_in_no_pack(small_repo) -> None:
    a2, c3 = orphaned_delta_history(small_repo)
    small_repo.gc()
    report = small_repo.repair_index()  # the dead delta's pack entry is still there
    assert report.undecodable == 1 and "1 delta entries left out" in report.summary()
    assert_no_errors(small_repo)
    again = small_repo.commit({"a": a2}, "a2 again", code_version=None)
    assert_tensor_identical(small_repo.load(again)["a"], a2)
    assert_tensor_identical(small_repo.load(c3)["big"], tensor(9, 16384))


def _damage_row(repo: Repo, chunk: bytes, **changes) -> None:
    """Rewrite one index value as bit rot in the LMDB file would."""
    index = repo.chunks.index
    damaged = dataclasses.replace(index.get(chunk), **changes)
    with index._env.begin(db=index._db, write=True) as txn:
        txn.put(chunk, encode_entry(damaged))


@pytest.mark.parametrize("damage", ["pack", "offset"])
def test_gc_refuses_to_trust_a_damaged_index_row_of_a_live_chunk(small_repo, damage) -> None:
    x = tensor(1, 1024)
    c1 = small_repo.commit({"x": x}, "c1", code_version=None)  # x's chunk is alone in its pack
    small_repo.commit({"y": tensor(2, 2048)}, "c2", code_version=None)
    chunk = bytes.fromhex(small_repo.manifest(c1).blobs[0]["chunks"][0])
    entry = small_repo.chunks.index.get(chunk)
    _damage_row(small_repo, chunk, **({"pack": "ab" * 16} if damage == "pack" else {"offset": entry.offset + 8}))
    before = store_snapshot(small_repo.root)
    with pytest.raises(IndexMismatchError, match="repair index") as err:
        small_repo.gc()
    assert chunk.hex() in str(err.value)
    assert store_snapshot(small_repo.root) == before  # nothing deleted, nothing written
    result = CliRunner().invoke(cli, ["--repo", str(small_repo.root), "gc"])
    assert result.exit_code == IndexMismatchError.exit_code and result.output.startswith("error: ")
    assert "Traceback" not in result.output
    small_repo.repair_index()
    small_repo.gc()
    assert_tensor_identical(small_repo.load(c1)["x"], x)
    assert_no_errors(small_repo)


# -- the repository lock ------------------------------------------------------------------------


def _holders(lock: _fs.RepoLock, count: int, *, exclusive: bool) -> tuple[threading.Event, list[threading.Thread]]:
    """``count`` threads that take ``lock`` again and again, each holding it a moment;
    returns once each has held it (so their holds overlap from then on)."""
    stop = threading.Event()
    started = [threading.Event() for _ in range(count)]
    errors: list[BaseException] = []

    def run(ready: threading.Event) -> None:
        try:
            while not stop.is_set():
                with lock.hold(exclusive=exclusive, timeout=120):
                    ready.set()
                    stop.wait(0.02)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
            ready.set()

    threads = [threading.Thread(target=run, args=(ready,), daemon=True) for ready in started]
    for thread in threads:
        thread.start()
        started[threads.index(thread)].wait(120)
    assert not errors, errors
    return stop, threads


@pytest.mark.parametrize(("holders", "holders_exclusive"), [(4, False), (2, True)],
                         ids=["exclusive taker behind overlapping shared holders",
                              "shared taker behind repeated exclusive takers"])
def test_a_taker_gets_the_lock_behind_busy_holders(tmp_path, holders: int, holders_exclusive: bool) -> None:
    lock = _fs.RepoLock(tmp_path / "lock")
    stop, threads = _holders(lock, holders, exclusive=holders_exclusive)
    try:
        # polling LOCK_NB never found a free moment behind overlapping shared holders
        with lock.hold(exclusive=not holders_exclusive, timeout=60):
            took = True
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert took


def test_lock_timeout_still_raises_and_leaves_the_lock_free(tmp_path) -> None:
    lock = _fs.RepoLock(tmp_path / "lock")
    with lock.hold(exclusive=False):
        with pytest.raises(LockTimeoutError, match="exclusive repository lock"):
            with lock.hold(exclusive=True, timeout=0.2):
                pass
    with lock.hold(exclusive=True, timeout=5):  # the abandoned waiter dropped what it got
        pass


def test_an_automatic_gc_that_cannot_get_the_lock_never_fails_the_save(small_repo) -> None:
    weights = torch.zeros(4096)
    mgr = CheckpointManager(small_repo, {"w": weights}, every_steps=1, keep_last=1, gc_every=1, code_version=None)
    mgr.gc_lock_timeout = 0.2
    try:
        mgr.step(1)
        weights.copy_(tensor(2, 4096))
        with _fs.RepoLock(small_repo.root / "lock").hold(exclusive=False):  # a long fsck, say
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mgr.step(2)  # prunes step 1; its gc cannot run now
        assert any("automatic gc skipped" in str(w.message) for w in caught)
        assert small_repo.show("HEAD").step == 2 and len(small_repo.pruned()) == 1
        weights.copy_(tensor(3, 4096))
        mgr.step(3)  # the gc runs after this save
    finally:
        mgr.close()
    assert small_repo.gc(dry_run=True).bytes_reclaimed == 0
    assert_tensor_identical(small_repo.load()["w"], tensor(3, 4096))

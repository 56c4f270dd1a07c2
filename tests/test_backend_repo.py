"""The whole repository over the storage seam: MemoryBackend end to end, and faults
injected with FaultyBackend (ckptvcs/backends/faults.py) instead of monkeypatched primitives."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from ckptvcs import IntegrityError, Repo, StorageError
from ckptvcs.backends import Fault, FaultyBackend, LocalBackend, MemoryBackend


def _state(i: int) -> dict:
    gen = torch.Generator().manual_seed(i)
    return {"w": torch.randn(6000, generator=gen), "b": torch.randn(300, generator=gen), "i": i}


def test_memory_backend_repository_round_trip() -> None:
    backend = MemoryBackend()
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        first = repo.commit(_state(0), "first", code_version=None)
        second = repo.commit(_state(1), "second", code_version=None)
        repo.branch("dev", first)
        repo.checkout("dev")
        third = repo.commit(_state(2), "on dev", code_version=None)
        repo.tag("v1", second)
        assert repo.branches() == {"main": second, "dev": third}
        assert [c.id for c in repo.log()] == [third, first]
        assert [e.new for e in repo.reflog("dev")][:1] == [third]
        repo.checkout("main")
        repo.prune(first, rule="test")  # dev still reaches it: its data stays
        repo.delete_branch("dev", force=True)
        report = repo.gc(prune_unreachable_after=0)
        assert report.packs_deleted or report.packs_rewritten or report.pack_bytes_after <= report.pack_bytes_before
        assert repo.fsck(read_data=True).ok
        assert torch.equal(repo.load(second)["w"], _state(1)["w"])
    assert not any(key.startswith("tmp/") for key in backend.list())
    with Repo.open(backend=backend) as again:  # the index is rebuilt from the packs
        assert again.resolve("v1") == second and again.resolve("HEAD") == second
        assert torch.equal(again.load("v1")["w"], _state(1)["w"])
        assert again.fsck(read_data=True).ok


def test_enospc_on_a_pack_write_leaves_no_half_written_store(tmp_path: Path) -> None:
    backend = FaultyBackend(LocalBackend(tmp_path / "r"))
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        base = repo.commit(_state(0), code_version=None)
        # The pack writer batches small entries: one write may carry the whole commit.
        fault = Fault("write", "packs/*", nth=1, errno=errno.ENOSPC)
        backend.faults.append(fault)
        with pytest.raises(StorageError, match="disk full") as err:
            repo.commit(_state(1), code_version=None)
        assert fault.fired == 1 and "\n" not in str(err.value)
        assert repo.resolve("HEAD") == base
        assert list((tmp_path / "r" / "tmp").iterdir()) == []  # the unsealed pack is dropped
        assert repo.fsck(read_data=True).ok
        cid = repo.commit(_state(1), code_version=None)  # a retry succeeds
        assert torch.equal(repo.load(cid)["w"], _state(1)["w"])


def test_enospc_on_the_ref_update_of_a_memory_store() -> None:
    backend = FaultyBackend(MemoryBackend())
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        base = repo.commit(_state(0), code_version=None)
        backend.faults.append(Fault("cas", "refs/heads/*", errno=errno.ENOSPC))
        with pytest.raises(StorageError, match="disk full"):
            repo.commit(_state(1), code_version=None)
        assert repo.resolve("HEAD") == base
        assert repo.fsck().ok  # the new commit's chunks and objects are garbage, not damage


def test_bit_flip_on_read_names_the_chunk() -> None:
    backend = FaultyBackend(MemoryBackend())
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        cid = repo.commit(_state(0), code_version=None)
        backend.faults.append(Fault("read", "packs/*", flip=True, flip_offset=40, times=None))
        with pytest.raises(IntegrityError) as err:
            repo.load(cid)
        assert err.value.chunk_id is not None and len(err.value.chunk_id) == 64
        assert err.value.chunk_id in str(err.value) or err.value.chunk_id[:12] in str(err.value)
        backend.faults.clear()
        assert torch.equal(repo.load(cid)["w"], _state(0)["w"])  # the stored bytes were never damaged


def test_eio_on_read_is_a_storage_error(tmp_path: Path) -> None:
    backend = FaultyBackend(LocalBackend(tmp_path / "r"))
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        cid = repo.commit(_state(0), code_version=None)
        backend.faults.append(Fault("read", "packs/*", errno=errno.EIO, times=None))
        with pytest.raises(StorageError, match="I/O error"):
            repo.load(cid)
        backend.faults.clear()
        assert torch.equal(repo.load(cid)["w"], _state(0)["w"])


@pytest.mark.parametrize("kind", ["memory", "local"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_every_failing_write_of_a_commit(tmp_path: Path, kind: str, err: int) -> None:
    """SQLite's I/O-error loop at the seam: the N-th write operation of a commit fails, N = 1, 2, ...

    Each time: one typed line, HEAD at the old commit or (a fault after the ref update:
    the reflog append) at the new, complete one, fsck clean, and the next commit succeeds.
    """
    from ckptvcs.backends.faults import WRITES

    inner = MemoryBackend() if kind == "memory" else LocalBackend(tmp_path / "r")
    backend = FaultyBackend(inner)
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        states = {repo.commit(_state(0), code_version=None): 0}
        n = 0
        while True:
            n += 1
            fault = Fault(WRITES, nth=n, errno=err)
            backend.faults[:] = [fault]
            before = repo.resolve("HEAD")
            try:
                cid = repo.commit(_state(n), f"attempt {n}", code_version=None)
            except StorageError as error:
                backend.faults.clear()
                assert "\n" not in str(error) and error.exit_code == 13
                head = repo.resolve("HEAD")
                if head != before:
                    assert repo.show(head).message == f"attempt {n}"
                    states[head] = n
                assert repo.fsck(read_data=True).ok
                assert torch.equal(repo.load(head)["w"], _state(states[head])["w"])
                continue
            backend.faults.clear()
            assert fault.fired == 0  # the commit no longer reaches the N-th write: each one failed once
            states[cid] = n
            break
        assert n > 3
        assert repo.fsck(read_data=True).ok


def test_memory_backend_records_audit_verifications_and_keys(tmp_path: Path) -> None:
    """The modules beside the seam (records, audit, verify, trust) write through the backend."""
    from ckptvcs import signing
    from ckptvcs import verify as verification
    from ckptvcs.errors import UsageError

    backend = MemoryBackend()
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        first = repo.commit(_state(0), "first", code_version=None)
        repo.gc(prune_unreachable_after=0)
        assert len(repo.read_records("gc").records) == 1
        assert repo.add_record("restore", {"commit": first, "load_seconds": 0.5})
        assert repo.read_records("restore").records[0]["commit"] == first
        # verify restores in a child process, which opens a local directory: refused, clearly
        with pytest.raises(UsageError, match="local directory"):
            repo.verify(first)
        record = {"version": 1, "commit": first, "ok": True, "time": "2026-01-01T00:00:00Z"}
        verification.write_record(repo.backend, first, record)
        assert repo.last_verification(first) == record and repo.verifications() == {first: record}
        _, public, kid = signing.generate_key(tmp_path / "k")
        assert repo.trust_key(public) == kid and repo.trusted_keys() == [kid]
        signed = repo.tag("v1", first, key=tmp_path / "k")
        assert repo.verify_tag("v1")["commit"] == first and signed
        events = [e.event for e in repo.audit_events()]
        assert {"key.trust", "tag.create"} <= set(events) and events[-1] == "tag.verify"
        assert repo.check_audit().ok and repo.check_audit().events == len(events)
        assert repo.fsck().ok
    keys = set(backend.list())
    assert {"records/gc.jsonl", "records/restore.jsonl", f"verified/{first}", f"keys/{kid}.pub",
            "audit/log.jsonl", "audit/head.json"} <= keys
    with Repo.open(backend=backend) as again:  # another handle reads what the first wrote
        assert again.trusted_keys() == [kid] and again.last_verification(first) == record
        assert again.check_audit().events == len(events)


def test_audit_log_without_advisory_locks_chains_by_compare_and_swap() -> None:
    """A backend without locks (an object store) appends audit events by compare-and-swap."""
    from dataclasses import replace

    from ckptvcs.audit import AuditLog

    backend = MemoryBackend()
    backend.capabilities = replace(MemoryBackend.capabilities, advisory_locks=False)  # type: ignore[misc]
    log = AuditLog(backend)
    for i in range(3):
        log.append("test.event", "w@h", {"i": i})
    backend.append("audit/log.jsonl", b'{"torn')  # a crash mid-append on a backend that appends
    event = log.append("test.event", "w@h", {"i": 3})
    assert event.seq == 3
    verdict = log.check()
    assert verdict.ok and verdict.events == 4, verdict.problems


def test_two_handles_on_one_memory_store_see_each_others_packs() -> None:
    """Each handle on a store without local files keeps its own index; a read or a publish
    picks up the packs the other handle wrote (the multi-host DCP writer relies on it)."""
    backend = MemoryBackend()
    with Repo.init(None, chunk_size=4096, backend=backend) as first, Repo.open(backend=backend) as second:
        base = first.commit(_state(0), "by the first handle", code_version=None)
        assert torch.equal(second.load(base)["w"], _state(0)["w"])  # the second handle never indexed it
        staged = second.stage(_state(1))  # a rank stages through its own handle...
        cid = first.publish(staged, "published by the coordinator", code_version=None)  # ...the coordinator publishes it
        assert torch.equal(first.load(cid)["w"], _state(1)["w"])
        assert second.resolve("HEAD") == cid and first.fsck(read_data=True).ok
        assert second.chunks.refresh_index() == 0  # nothing new: a listing, no pack read again


def test_a_linked_verified_folder_is_reported_not_followed(tmp_path: Path) -> None:
    """verified/ read through LocalBackend: a link in its place is named, never followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        cid = repo.commit(_state(0), code_version=None)
        (outside / cid).write_text(json.dumps({"ok": True, "commit": cid}))
        (tmp_path / "r" / "verified").symlink_to(outside)
        with pytest.warns(RuntimeWarning, match="verified/ is unreadable"):
            assert repo.verifications() == {}

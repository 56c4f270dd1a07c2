"""Repack: branch tips re-encoded as keyframes, older versions as deltas against newer ones.

Every commit keeps loading bit-exact, chains stay within the keyframe interval, stored
bytes barely move, and faults, bit rot and a rebuilt index are handled as for gc.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckptvcs import Repo, StorageError
from ckptvcs.backends import Fault, FaultyBackend, LocalBackend
from ckptvcs.cli import cli
from ckptvcs.store import MAX_CHAIN_LENGTH
from helpers import assert_tensor_identical, flip_payload_byte, store_snapshot

N = 6_000  # floats per tensor: several 4 KiB chunks


def drifting_state(i: int, *, branch: int = 0) -> dict:
    """Step ``i`` of a dense fine-tune: every weight moves a little at every step, so every
    chunk of a new commit is stored as an XOR delta against its parent's."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(N).astype(np.float32)
    for step in range(1, i + 1):
        w = w + np.random.default_rng(1000 * branch + step).standard_normal(N).astype(np.float32) * 1e-4
    return {"model": {"w": torch.from_numpy(w)}, "step": i}


def commit_steps(repo: Repo, steps: range, *, branch: str | None = None, tag: int = 0) -> dict[str, dict]:
    out = {}
    for i in steps:
        state = drifting_state(i, branch=tag)
        out[repo.commit(state, f"step {i}", branch=branch, step=i, code_version=None)] = state
    return out


def assert_all_load(repo: Repo, states: dict[str, dict]) -> None:
    for cid, state in states.items():
        loaded = repo.load(cid)
        assert loaded["step"] == state["step"]
        assert_tensor_identical(loaded["model"]["w"], state["model"]["w"])


def tip_rows(repo: Repo, rev: str = "HEAD") -> list:
    manifest = repo.objects.get(repo.objects.read_commit(repo.resolve(rev)).manifest, "manifest")[1]
    return [repo.chunks.index.get(bytes.fromhex(c)) for blob in manifest["blobs"] for c in blob["chunks"]]


def max_chain(repo: Repo) -> int:
    return max(repo.chunks.chain_length(e) for e in repo.chunks.index)


def stored_bytes(repo: Repo) -> int:
    return sum(e.stored_len for e in repo.chunks.index)


def test_repack_makes_the_tip_keyframes_and_keeps_every_commit(small_repo: Repo) -> None:
    states = commit_steps(small_repo, range(6))
    tip = tip_rows(small_repo)
    assert all(e.base is not None for e in tip)  # dense updates: every tip chunk is a delta
    before = stored_bytes(small_repo)

    report = small_repo.repack()
    assert report.keyframes == len(tip) and report.rebased > 0

    assert all(e.base is None for e in tip_rows(small_repo))
    assert max_chain(small_repo) <= small_repo.chunks.keyframe_interval - 1
    assert_all_load(small_repo, states)
    fsck = small_repo.fsck(read_data=True)
    assert fsck.ok and not fsck.garbage, fsck.summary()
    # XOR is symmetric: the deltas are the same payloads, only the keyframe moved.
    assert abs(stored_bytes(small_repo) - before) <= 0.05 * before
    assert report.pack_bytes_after <= report.pack_bytes_before * 1.05
    assert small_repo.repack().keyframes == 0  # nothing left to do


def test_repack_again_after_more_commits_keeps_chains_bounded_and_bytes_flat(small_repo: Repo) -> None:
    states = commit_steps(small_repo, range(4))
    forward = Repo.init(small_repo.root.parent / "forward", chunk_size=4096)
    commit_steps(forward, range(12))
    for i in range(4, 12):  # a repack after every commit: the tip is always a keyframe
        small_repo.repack()
        states.update(commit_steps(small_repo, range(i, i + 1)))
    small_repo.repack()
    assert all(e.base is None for e in tip_rows(small_repo))
    assert max_chain(small_repo) <= small_repo.chunks.keyframe_interval - 1
    assert_all_load(small_repo, states)
    assert small_repo.fsck(read_data=True).ok
    # At most one keyframe per chunk more than the forward layout of the same history.
    assert stored_bytes(small_repo) <= stored_bytes(forward) * 1.15
    forward.close()


def test_branches_sharing_history_each_get_keyframe_tips(small_repo: Repo) -> None:
    states = commit_steps(small_repo, range(3))
    fork = small_repo.resolve("HEAD")
    small_repo.branch("side", fork)
    states.update(commit_steps(small_repo, range(3, 5)))
    states.update(commit_steps(small_repo, range(3, 5), branch="side", tag=7))
    small_repo.repack()
    for rev in ("main", "side"):
        assert all(e.base is None for e in tip_rows(small_repo, rev))
    assert max_chain(small_repo) <= small_repo.chunks.keyframe_interval - 1
    assert_all_load(small_repo, states)
    assert small_repo.fsck(read_data=True).ok


def test_dry_run_changes_nothing(small_repo: Repo) -> None:
    commit_steps(small_repo, range(3))
    snapshot = store_snapshot(small_repo.root / "packs")
    report = small_repo.repack(dry_run=True)
    assert report.dry_run and report.keyframes > 0 and not report.packs_written
    assert store_snapshot(small_repo.root / "packs") == snapshot
    assert all(e.base is not None for e in tip_rows(small_repo))


def test_every_failing_write_of_a_repack_leaves_every_commit_loadable(tmp_path: Path) -> None:
    """The n-th write (pack data, seal, record, delete) of a repack fails, for every n in
    turn, each on a fresh copy of one repository: every commit still loads bit-exact,
    fsck finds no damage, and a repack afterwards completes."""
    Repo.init(tmp_path / "base", chunk_size=4096).close()
    with Repo.open(tmp_path / "base") as repo:
        states = commit_steps(repo, range(6))
    for nth in range(1, 60):
        store = tmp_path / f"round{nth}"
        shutil.copytree(tmp_path / "base", store)
        fault = Fault(("write", "commit", "put", "delete", "append"), key="*", nth=nth, errno=errno.EIO)
        with Repo.open(store, backend=FaultyBackend(LocalBackend(store), fault)) as repo:
            try:
                repo.repack()
            except StorageError as err:
                assert "\n" not in str(err)
        with Repo.open(store) as repo:
            assert_all_load(repo, states)
            fsck = repo.fsck(read_data=True)
            assert fsck.ok, fsck.summary()
            if not fault.fired:
                break
            repo.repack()
            assert all(e.base is None for e in tip_rows(repo))
            assert_all_load(repo, states)
        shutil.rmtree(store)
    else:
        pytest.fail("the repack never ran to completion")
    assert nth > 3


def test_bit_rot_in_a_repacked_pack_is_found_by_fsck(small_repo: Repo) -> None:
    states = commit_steps(small_repo, range(6))
    report = small_repo.repack()
    written = set(report.packs_written)
    victim = next(e for e in small_repo.chunks.index if e.pack in written and e.base is not None)
    flip_payload_byte(small_repo, victim)
    fsck = small_repo.fsck(read_data=True)
    assert not fsck.ok
    assert any(victim.chunk_id.hex() in str(f) or victim.pack in str(f) for f in fsck.errors)
    del states


def test_repair_index_with_both_encodings_present_picks_a_verifying_copy(small_repo: Repo, tmp_path: Path) -> None:
    """A crash after the new pack is sealed and before the old ones go leaves every
    re-encoded chunk in two packs, each with its own base: the rebuilt index must pick
    entries whose chains resolve and verify, whichever pack comes first."""
    states = commit_steps(small_repo, range(6))
    packs = small_repo.root / "packs"
    saved = tmp_path / "saved"
    shutil.copytree(packs, saved)
    written = set(small_repo.repack().packs_written)
    for pack in saved.iterdir():  # the old packs back, as after a crash before gc's sweep
        if not (packs / pack.name).exists():
            shutil.copy(pack, packs / pack.name)
    # Rot the new copy of a chunk stored twice (a keyframe, and a delta whose base is
    # now its newer version): the repair must choose the old copies.
    victims = [next(e for e in small_repo.chunks.index if e.pack in written and e.base is None),
               next(e for e in small_repo.chunks.index if e.pack in written and e.base is not None)]
    for victim in victims:
        flip_payload_byte(small_repo, victim)
    # The new packs first in the rebuild's order (pack names are not stored inside packs),
    # so the rotten copies are the ones found first.
    for n, name in enumerate(sorted(written)):
        (packs / f"{name}.pack").rename(packs / f"{n:032x}.pack")
    report = small_repo.repair_index()
    assert len(report.dropped) >= 2
    for victim in victims:
        row = small_repo.chunks.index.get(victim.chunk_id)
        assert row is not None and row.pack in {p.stem for p in saved.iterdir()}
    assert max(small_repo.chunks.chain_length(e) for e in small_repo.chunks.index) < MAX_CHAIN_LENGTH
    assert_all_load(small_repo, states)
    small_repo.gc()
    assert small_repo.fsck(read_data=False).ok
    assert_all_load(small_repo, states)


def test_cli_repack_dry_run_and_run(small_repo: Repo) -> None:
    commit_steps(small_repo, range(4))
    runner = CliRunner()
    dry = runner.invoke(cli, ["--repo", str(small_repo.root), "repack", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would re-encode" in dry.output
    done = runner.invoke(cli, ["--repo", str(small_repo.root), "repack"])
    assert done.exit_code == 0, done.output
    assert "re-encoded" in done.output and "packs" in done.output


def test_cli_repack_on_no_repository_is_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--repo", str(tmp_path / "nothing"), "repack"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output


def test_manager_with_async_save_repacks_in_the_background(small_repo: Repo) -> None:
    """repack_every=1 with async_save: every save is followed by a repack on the
    background worker, so the newest checkpoint is always stored as keyframes."""
    from ckptvcs import CheckpointManager

    weights = {"w": drifting_state(0)["model"]["w"].clone()}
    with CheckpointManager(small_repo, {"model": weights}, async_save=True, repack_every=1, code_version=None) as mgr:
        for step in range(1, 7):
            weights["w"] += torch.from_numpy(np.random.default_rng(step).standard_normal(N).astype(np.float32)) * 1e-4
            mgr.save(step).result()
        mgr.wait()
        expected = weights["w"].clone()
    assert all(e.base is None for e in tip_rows(small_repo))
    assert max_chain(small_repo) <= small_repo.chunks.keyframe_interval - 1
    assert_tensor_identical(small_repo.load("HEAD")["model"]["w"], expected)
    assert small_repo.fsck(read_data=True).ok


def test_manager_repack_every_is_checked_and_off_by_default(small_repo: Repo) -> None:
    from ckptvcs import CheckpointManager, InvalidInputError

    with pytest.raises(InvalidInputError, match="repack_every"):
        CheckpointManager(small_repo, {"w": torch.zeros(4)}, repack_every=-1, code_version=None)
    with CheckpointManager(small_repo, {"w": torch.zeros(4)}, code_version=None) as mgr:
        assert mgr.repack_every == 0

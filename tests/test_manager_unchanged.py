"""CheckpointManager's unchanged-tensor hints: untouched tensors are not re-hashed; writes behind
torch's back (``.data``, numpy views) are caught by the rotating check; resumes re-hash."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ckptvcs import CheckpointManager, Repo, reuse
from ckptvcs.store import WriteSession, chunk_hash
from helpers import assert_tensor_identical

CHUNK = 4096


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of the state the commits read and hashed (the write session's and the reuse check's),
    one entry per chunk."""
    seen: list[int] = []
    encode = WriteSession._encode

    def counting(self, raw, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(len(raw))
        return encode(self, raw, *args, **kwargs)

    def checking(data):  # type: ignore[no-untyped-def]
        seen.append(len(data))
        return chunk_hash(data)

    monkeypatch.setattr(WriteSession, "_encode", counting)
    monkeypatch.setattr(reuse, "chunk_hash", checking)
    return seen


def run(fused: bool = False, frozen_in_optimizer: bool = False):  # type: ignore[no-untyped-def]
    """A frozen 256 KiB layer and a trained one: the frozen one is what hints skip. With
    ``frozen_in_optimizer`` the optimizer holds both (the frozen one never gets a gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    model[0].requires_grad_(False)
    params = model.parameters() if frozen_in_optimizer else model[1].parameters()
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 256)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}}


def assert_commit_holds(repo: Repo, commit: str, expected: dict[str, dict]) -> None:
    loaded = repo.load(commit)
    for key, value in expected["model"].items():
        assert_tensor_identical(loaded["model"][key], value)
    for index, moments in expected["opt"].items():
        for key, value in moments.items():
            assert_tensor_identical(loaded["opt"]["state"][index][key], value)


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    with Repo.init(tmp_path / "store", chunk_size=CHUNK) as repo:
        yield repo


FROZEN = 256 * 256 * 4


@pytest.mark.parametrize(("fused", "frozen_in_optimizer"), [(False, False), (True, True)])
def test_untouched_tensors_are_not_rehashed_and_every_commit_is_exact(
    store: Repo, hashed: list[int], fused: bool, frozen_in_optimizer: bool
) -> None:
    model, opt = run(fused, frozen_in_optimizer)
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None) as mgr:
        totals = []
        for step in range(1, 5):
            train(model, opt)
            expected = snapshot(model, opt)
            hashed.clear()
            commit = mgr.save(step)
            totals.append(sum(hashed))
            assert_commit_holds(store, commit, expected)  # fused AdamW bumps no version: its step hook tells
    first, later = totals[0], totals[1:]
    assert first >= 2 * FROZEN
    for total in later:
        # the frozen weight went unread but for its 1/8 check (8 of 64 chunks); the trained layer was read
        assert total == first - FROZEN + FROZEN // 8


def test_a_write_through_data_is_caught_at_the_next_save_and_turns_hints_off(store: Repo, hashed: list[int]) -> None:
    model, opt = run()
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None) as mgr:
        train(model, opt)
        mgr.save(1)
        model[0].weight.data.add_(1.0)  # every chunk changes, no version bump
        train(model, opt)
        expected = snapshot(model, opt)
        with pytest.warns(RuntimeWarning, match="without a torch version bump"):
            commit = mgr.save(2)
        assert_commit_holds(store, commit, expected)
        hashed.clear()
        train(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mgr.save(3)
        assert sum(hashed) >= 2 * FROZEN  # hints are off for the rest of the run


def test_a_sparse_write_through_a_numpy_view_is_caught_within_check_every_saves(store: Repo) -> None:
    model, opt = run()
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None, reuse_check_every=4) as mgr:
        train(model, opt)
        mgr.save(1)
        model[0].weight.detach().numpy()[200, 7] += 1.0  # one chunk of 64
        caught = None
        for step in range(2, 2 + 4):
            train(model, opt)
            expected = snapshot(model, opt)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                commit = mgr.save(step)
            if any("without a torch version bump" in str(w.message) for w in seen):
                caught = step
                assert_commit_holds(store, commit, expected)
                break
        assert caught is not None


def test_a_replaced_parameter_is_hashed(store: Repo) -> None:
    model, opt = run()
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None) as mgr:
        mgr.save(1)
        model[0].weight = nn.Parameter(torch.randn(256, 256), requires_grad=False)
        expected = snapshot(model, opt)
        assert_commit_holds(store, mgr.save(2), expected)


def test_a_resumed_or_restored_manager_hashes_everything_first(store: Repo, hashed: list[int]) -> None:
    model, opt = run()
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None) as mgr:
        train(model, opt)
        mgr.save(1)
        train(model, opt)
        mgr.save(2)
        mgr.restore()
        hashed.clear()
        train(model, opt)
        mgr.save(3)
        assert sum(hashed) >= 2 * FROZEN
    model, opt = run()
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None) as mgr:
        mgr.restore()
        hashed.clear()
        train(model, opt)
        mgr.save(4)
        assert sum(hashed) >= 2 * FROZEN


def test_the_off_switch_and_async_saves(store: Repo, hashed: list[int]) -> None:
    model, opt = run()
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None, reuse_unchanged=False) as mgr:
        mgr.save(1)
        hashed.clear()
        mgr.save(2, message="again")
        assert sum(hashed) >= 2 * FROZEN
    model, opt = run(fused=True)  # no version bumps: only the step hook tells what trained
    with CheckpointManager(store, {"model": model, "opt": opt}, code_version=None, async_save=True) as mgr:
        train(model, opt)
        hashed.clear()
        mgr.save(3).result()
        full = sum(hashed)
        train(model, opt)
        expected = snapshot(model, opt)
        hashed.clear()
        with store._lock.hold(exclusive=True):  # the background commit waits for it: the step below lands mid-commit
            pending = mgr.save(4)
            train(model, opt)  # a step while the commit is in flight counts for the next save
        commit = pending.result()
        assert sum(hashed) == full - FROZEN + FROZEN // 8
        assert_commit_holds(store, commit, expected)
        expected = snapshot(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the hint was right: no check had to catch anything
            assert_commit_holds(store, mgr.save(5).result(), expected)

"""Bodies of processes that tests spawn next to gc (importable in a spawned child)."""

from __future__ import annotations

import torch


def chain_tensor(i: int, numel: int = 16384) -> torch.Tensor:
    """A tensor determined by ``i`` (64 KiB of float32 by default)."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(i))


def chain_state(i: int) -> dict:
    """Commit ``i`` holds tensor ``i`` and, again, tensor ``i - 1`` of the previous commit:
    its second half dedups against a commit that gc may be about to release."""
    return {"new": chain_tensor(i), "old": chain_tensor(i - 1), "i": i}


def chain_committer(store: str, first: int, count: int) -> None:
    """Commit states ``first .. first+count-1`` onto branch ``chain``, one after another."""
    from ckptvcs import Repo

    with Repo.open(store) as repo:
        for i in range(first, first + count):
            repo.commit(chain_state(i), f"chain {i}", branch="chain", step=i, code_version=None)

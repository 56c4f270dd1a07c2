"""A commit takes its delta bases from the manifest this Repo just wrote, not from disk.

The parent's manifest is what the previous commit of the same Repo published; reading
it back (open, decompress, hash, parse) was a fixed cost of every commit. These tests
check that the remembered manifest gives exactly the delta bases the stored one gives
(same chunk ids, same bases: the same stored repository), and that it is only used
for the commit it belongs to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptvcs import Repo


def _state(seed: int) -> dict[str, Any]:
    """A nested state with tuples, a tied tensor, numpy arrays and a bytes value; ``seed`` nudges it."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 1024, generator=gen)
    weight += seed * 1e-4
    moments = (torch.randn(96, 1024, generator=gen) + seed * 1e-3, torch.rand(4096, generator=gen))
    return {
        "model": {"embed.weight": weight, "head.weight": weight, "bias": torch.zeros(7) + seed},
        "optimizer": {"state": {0: {"exp_avg": moments[0], "exp_avg_sq": moments[1]}}, "groups": [{"lr": 1e-3}]},
        "extra": (np.arange(5000, dtype=np.float64) + seed, b"tokenizer" * 900),
        "step": seed,
    }


def _bases(repo: Repo, rev: str) -> dict[str, str | None]:
    """Chunk id → its delta base (hex, or None for a self-contained chunk) for one commit."""
    out: dict[str, str | None] = {}
    for blob in repo.manifest(rev).blobs:
        for chunk in blob["chunks"]:
            entry = repo.chunks.index.get(bytes.fromhex(chunk))
            out[chunk] = None if entry.base is None else entry.base.hex()
    return out


def test_remembered_manifest_gives_the_bases_the_stored_one_gives(tmp_path: Path) -> None:
    warm = Repo.init(tmp_path / "warm")
    warm.commit(_state(0), code_version=None)
    second = warm.commit(_state(1), code_version=None)  # bases from the remembered manifest

    cold = Repo.init(tmp_path / "cold")
    cold.commit(_state(0), code_version=None)
    cold.close()
    cold = Repo.open(tmp_path / "cold")  # nothing remembered: bases read from disk
    second_cold = cold.commit(_state(1), code_version=None)

    warm_bases, cold_bases = _bases(warm, second), _bases(cold, second_cold)
    assert warm_bases == cold_bases
    assert any(base is not None for base in warm_bases.values()), "the nudged tensors should be deltas"
    assert warm.manifest(second).blobs == cold.manifest(second_cold).blobs
    warm.close()
    cold.close()


def test_second_commit_does_not_read_the_parent_manifest(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r")
    repo.commit(_state(0), code_version=None)
    reads: list[str] = []
    original = repo.manifest

    def counting(rev: str = "HEAD") -> Any:
        reads.append(rev)
        return original(rev)

    repo.manifest = counting  # type: ignore[method-assign]
    repo.commit(_state(1), code_version=None)
    assert reads == []
    repo.close()


def test_a_commit_on_another_parent_reads_that_parent(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r")
    first = repo.commit(_state(0), code_version=None)
    repo.branch("side", first)
    repo.commit(_state(1), code_version=None)  # main moves on; remembered: this one
    reads: list[str] = []
    original = repo.manifest

    def counting(rev: str = "HEAD") -> Any:
        reads.append(rev)
        return original(rev)

    repo.manifest = counting  # type: ignore[method-assign]
    on_side = repo.commit(_state(2), branch="side", code_version=None)
    assert reads == [first]
    assert repo.log(on_side)[1].id == first
    np.testing.assert_array_equal(repo.load(on_side)["extra"][0], _state(2)["extra"][0])
    repo.close()


def test_tensor_paths_with_every_kind_of_key() -> None:
    """Delta pairing names tensors by key path: plain keys (str, int, bool, None) take a
    fast path, the others (float, tuple, bytes) are decoded; both must name the same paths
    as before."""
    from ckptvcs.delta import first_paths
    from ckptvcs.state import encode_state, iter_tensors

    t = torch.zeros(3)
    state = {"a": {0: t + 1, True: t + 2, None: t + 3, 1.5: t + 4, ("x", 2): t + 5, b"k": t + 6}, 7: [t + 7]}
    root = encode_state(state).root
    paths = [path for path, _, _ in iter_tensors(root)]
    assert paths == ["a/0", "a/True", "a/None", "a/1.5", "a/('x', 2)", "a/b'k'", "7/0"]
    assert sorted(first_paths(root).values()) == sorted(paths)
    again = [path for path, _, _ in iter_tensors(encode_state(state).root)]
    assert again == paths

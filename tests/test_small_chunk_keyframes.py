"""Chunks far below the chunk size (a small tensor's only chunk) are stored self-contained.

A delta on such a chunk saves a few KB and costs a read and decode of its base chain,
which was most of a small state's commit time (docs/performance.md, "Tiny commits, fifth
pass"). Larger chunks still become deltas against the parent's version.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptvcs import Repo


def test_small_chunks_are_keyframes_and_large_ones_deltas(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 * 1024)
    assert repo.chunks.min_delta_bytes == 4 * 1024
    gen = torch.Generator().manual_seed(0)
    large = torch.randn(64 * 1024 // 4, generator=gen)  # one full 64 KiB chunk
    small = torch.randn(512, generator=gen)  # 2 KiB: under a sixteenth of the chunk size
    repo.commit({"large": large, "small": small}, code_version=None)
    large += 1e-4
    small += 1e-4
    repo.commit({"large": large, "small": small}, code_version=None)

    manifest = repo.manifest("HEAD")
    by_size = {blob["nbytes"]: blob["chunks"] for blob in manifest.blobs}
    large_entry = repo.chunks.index.get(bytes.fromhex(by_size[large.numel() * 4][0]))
    small_entry = repo.chunks.index.get(bytes.fromhex(by_size[small.numel() * 4][0]))
    assert large_entry is not None and large_entry.base is not None, "the large chunk is a delta on its parent"
    assert small_entry is not None and small_entry.base is None, "the small chunk is stored self-contained"

    loaded = repo.load("HEAD")
    assert torch.equal(loaded["large"], large) and torch.equal(loaded["small"], small)
    assert repo.fsck(read_data=True).ok
    repo.close()

"""put_blobs encodes runs of small chunks in one pool task; results stay per chunk, in order.

A tiny state is hundreds of few-KB chunks, and a pool task per chunk cost about as much
as encoding it (docs/performance.md, "Tiny commits, sixth pass"). Grouping must not
change which id lands where, what each blob is charged, or what progress reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ckptvcs import Repo
from ckptvcs.store import chunk_hash


def test_mixed_small_large_known_and_repeated_blobs_keep_their_chunks_in_order(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=256 * 1024)
    store = repo.chunks
    rng = np.random.default_rng(0)

    def weights(n: int) -> memoryview:
        return memoryview((rng.standard_normal(n) * 0.02).astype(np.float32).view(np.uint8))

    earlier = weights(3000)
    first = store.write_session()
    known_ids = first.put_blobs([earlier], dtypes=["<f4"])[0]
    first.finish()

    small = [weights(int(n)) for n in rng.integers(1, 5000, 40)]
    large = weights(3 * 256 * 1024 // 4 + 1000)  # three full chunks and a small tail
    blobs = [*small[:20], large, earlier, *small[20:], small[3]]  # small[3] again at the end
    known = [None] * len(blobs)
    known[21] = known_ids
    dtypes = ["<f4"] * len(blobs)
    calls: list[tuple[int, int]] = []

    session = store.write_session()
    ids = session.put_blobs(blobs, lambda done, total: calls.append((done, total)), dtypes=dtypes, known=known)
    stats = session.finish()

    for blob, blob_ids in zip(blobs, ids):
        spans = store.split(len(blob))
        assert blob_ids == [chunk_hash(blob[s:e]) for s, e in spans]
        for cid, (s, e) in zip(blob_ids, spans):
            assert bytes(store.read_chunk(cid, describe=lambda: "test")) == bytes(blob[s:e])
    total = sum(len(b) for b in blobs)
    assert len(calls) == sum(len(store.split(len(b))) for b in blobs)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (total, total)
    charged = stats.blob_new_stored_bytes
    assert charged[21] == 0 and charged[-1] == 0, "a known blob and a repeated one add nothing"
    assert all(c > 0 for c in charged[:21]) and all(c > 0 for c in charged[22:-1])
    assert stats.known_chunks == len(known_ids)
    repo.close()

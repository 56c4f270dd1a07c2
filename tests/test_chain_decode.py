"""The faster paths of delta commits and loads keep every guarantee of the slow ones.

* A delta chain is decoded in the plane domain in one pass and only its result is
  hashed; damage anywhere in the chain still raises IntegrityError naming the tensor,
  the commit and the damaged chunk (the level-by-level fallback finds it).
* ``codec.ChainDecoder`` gives exactly what decoding level by level gives.
* ``codec.encode`` skips the self-contained candidates only when the XOR delta clearly
  beats the expected size, and its result is still verified.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptvcs import IntegrityError, Repo, codec, planes
from ckptvcs.errors import CorruptObjectError
from ckptvcs.hugepages import advise_huge_pages
from ckptvcs.store import ChunkStore, chunk_hash
from helpers import assert_tensor_identical, flip_payload_byte


def _run(n: int, steps: int, seed: int = 0):
    """States of one fp32 weight tensor after each of ``steps`` small updates."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen) * 0.02
    for _ in range(steps):
        w = w - 1e-4 * torch.randn(n, generator=gen).sign()
        yield {"model": {"w": w.clone()}, "step": 1}


def _chain(repo: Repo, chunk_id: bytes) -> list:
    """Index entries from ``chunk_id`` down to its keyframe."""
    entries = [repo.chunks.index.get(chunk_id)]
    while entries[-1].base is not None:
        entries.append(repo.chunks.index.get(entries[-1].base))
    return entries


@pytest.fixture
def deep_repo(tmp_path: Path):
    """Four commits of a drifting tensor: the last one's chunks sit 3 deltas deep (K = 4)."""
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    states = list(_run(60_000, 4))
    commits = [repo.commit(state) for state in states]
    try:
        yield repo, states, commits
    finally:
        repo.close()


def test_a_deep_chain_loads_in_one_pass_without_verifying_each_level(deep_repo, monkeypatch) -> None:
    repo, states, commits = deep_repo
    top = bytes.fromhex(repo.manifest(commits[-1]).blobs[0]["chunks"][0])
    assert len(_chain(repo, top)) == 4
    slow_levels = []
    original = ChunkStore._decode_verified

    def counting(self, entry, out, describe, depth):
        if entry.base is not None:
            slow_levels.append(entry.chunk_id)
        return original(self, entry, out, describe, depth)

    monkeypatch.setattr(ChunkStore, "_decode_verified", counting)
    assert_tensor_identical(repo.load(commits[-1])["model"]["w"], states[-1]["model"]["w"])
    assert slow_levels == []  # every delta chunk took the one-pass path


@pytest.mark.parametrize("level", [1, 2], ids=["next-to-top", "next-to-keyframe"])
def test_damage_in_the_middle_of_a_chain_names_tensor_commit_and_chunk(deep_repo, level) -> None:
    repo, _states, commits = deep_repo
    top = bytes.fromhex(repo.manifest(commits[-1]).blobs[0]["chunks"][0])
    damaged = _chain(repo, top)[level]
    flip_payload_byte(repo, damaged)
    with pytest.raises(IntegrityError) as err:
        repo.load(commits[-1])
    message = str(err.value)
    assert "model/w" in message and commits[-1][:12] in message
    assert damaged.chunk_id.hex() in message
    with pytest.raises(IntegrityError, match=damaged.chunk_id.hex()):
        repo.chunks.read_chunk(top, describe=lambda: "chunk")


def test_a_damaged_chain_is_not_used_as_a_delta_base(deep_repo) -> None:
    repo, states, commits = deep_repo
    parent_first = bytes.fromhex(repo.manifest(commits[2]).blobs[0]["chunks"][0])  # 2 deltas deep
    flip_payload_byte(repo, _chain(repo, parent_first)[1])
    changed = {"model": {"w": states[2]["model"]["w"] - 1e-4}, "step": 2}
    repo.branch("side", commits[2])
    new = repo.commit(changed, branch="side")
    first, second = (repo.chunks.index.get(bytes.fromhex(c)) for c in repo.manifest(new).blobs[0]["chunks"][:2])
    assert first.base is None  # its base's chain fails verification: stored as a keyframe
    assert second.base is not None  # an intact neighbour still becomes a delta
    assert_tensor_identical(repo.load(new)["model"]["w"], changed["model"]["w"])


def _random_chain(rng: np.random.Generator, n: int, layout: int, depth: int) -> tuple[list[bytes], list]:
    """Versions of a chunk and their encodings: a keyframe, then XOR deltas on the previous one."""
    versions = [(rng.standard_normal(n // 4 + 1).astype(np.float32).view(np.uint8)[:n]).copy()]
    for _ in range(depth):
        nxt = versions[-1].copy()
        nxt[rng.integers(0, n, max(1, n // 7))] ^= rng.integers(0, 256, max(1, n // 7), dtype=np.uint8)
        versions.append(nxt)
    if layout == planes.BYTES:
        encoded = [codec.Encoded(codec.ZSTD, codec._compressor().compress(versions[0]))]
    else:
        encoded = [codec.Encoded(codec.PLANES, codec.encode_planes(versions[0], layout))]
    for old, new in zip(versions, versions[1:]):
        encoded.append(codec.Encoded(codec.XOR_PLANES, codec.encode_planes(new ^ old, layout), b"b" * 32))
    return versions, encoded


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), layout=st.sampled_from([planes.BYTES, planes.NIBBLES, 2, 4, 8]),
       depth=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_chain_decoder_matches_level_by_level_decoding(n, layout, depth, seed) -> None:
    versions, encoded = _random_chain(np.random.default_rng(seed), n, layout, depth)
    out = bytearray(n)
    decoder = codec.ChainDecoder(memoryview(out))
    for enc in encoded:
        assert decoder.add(enc.codec, enc.payload)
    decoder.finish()
    assert bytes(out) == versions[-1].tobytes()


def test_chain_decoder_declines_mixed_layouts_and_misplaced_codecs() -> None:
    rng = np.random.default_rng(0)
    _, four = _random_chain(rng, 4096, 4, 1)
    _, two = _random_chain(rng, 4096, 2, 1)
    decoder = codec.ChainDecoder(memoryview(bytearray(4096)))
    assert decoder.add(four[0].codec, four[0].payload)
    assert not decoder.add(two[1].codec, two[1].payload)  # a delta in another layout
    assert not codec.ChainDecoder(memoryview(bytearray(4096))).add(four[1].codec, four[1].payload)  # no keyframe
    with pytest.raises(CorruptObjectError):
        codec.ChainDecoder(memoryview(bytearray(4096))).finish()


def _step(n: int) -> tuple[memoryview, memoryview]:
    old = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.02
    new = old - 1e-5 * torch.sign(old)
    return (memoryview(new.numpy().view(np.uint8)).cast("B"), memoryview(old.numpy().view(np.uint8)).cast("B"))


def test_encode_skips_plain_planes_only_when_the_delta_clearly_wins(monkeypatch) -> None:
    raw, base = _step(1 << 16)
    calls = []
    original = codec._plane_parts

    def counting(data, layout, slot):
        calls.append(slot)
        return original(data, layout, slot)

    monkeypatch.setattr(codec, "_plane_parts", counting)
    cid, base_id = chunk_hash(raw), chunk_hash(base)
    won = codec.encode(raw, cid, layout=4, base=(base_id, base), plain_estimate=0.95)
    assert won.codec == codec.XOR_PLANES and calls == ["split-delta"]
    out = bytearray(len(raw))
    codec.decode_into(won.codec, won.payload, memoryview(out), base=base)
    assert chunk_hash(out) == cid
    calls.clear()
    # A keyframe that compressed better than this delta: the plain candidate is tried too.
    codec.encode(raw, cid, layout=4, base=(base_id, base), plain_estimate=len(won.payload) / len(raw) * 0.9)
    assert sorted(calls) == ["split", "split-delta"]
    calls.clear()
    codec.encode(raw, cid, layout=4, base=(base_id, base))
    assert sorted(calls) == ["split", "split-delta"]


def test_huge_page_advice_keeps_contents_and_skips_small_buffers() -> None:
    big = torch.arange(3 << 20, dtype=torch.int32).view(torch.uint8)
    before = big.clone()
    advised = advise_huge_pages(big.data_ptr(), big.numel())
    assert torch.equal(big, before)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform.startswith("linux") and thp.exists() and "[never]" not in thp.read_text():
        assert advised  # the advice is really given where the kernel takes it
    assert advise_huge_pages(big.data_ptr(), 4096) is False

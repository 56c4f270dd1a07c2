"""Tensor-aware codecs: byte planes, XOR deltas against the parent, bounded delta chains."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckptvcs import IntegrityError, Repo, codec, planes
from ckptvcs.index import ChunkIndex
from ckptvcs.pack import iter_pack_entries
from ckptvcs.store import chunk_hash
from helpers import assert_tensor_identical, flip_payload_byte

FLOAT_DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen) * 0.02
    if dtype.is_complex:
        return torch.complex(values, values.flip(0)).to(dtype)
    return values.to(dtype)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _decode(enc: codec.Encoded, nbytes: int, base: memoryview | None = None) -> bytes:
    out = bytearray(nbytes)
    codec.decode_into(enc.codec, enc.payload, memoryview(out), base=base)
    return bytes(out)


# -- codecs alone ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_name)
@given(n=st.integers(0, 3000), cut=st.integers(0, 15), seed=st.integers(0, 2**16), touched=st.floats(0, 1))
def test_every_codec_round_trips_every_float_dtype_and_odd_length(dtype, n, cut, seed, touched) -> None:
    old32 = _weights(torch.float32, n, seed)
    new32 = old32.clone()
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < touched
    new32[mask] = _weights(torch.float32, int(mask.sum()), seed + 2)
    old, new = (t.to(dtype) if not dtype.is_complex else torch.complex(t, t.flip(0)).to(dtype) for t in (old32, new32))
    raw, base = _raw(new), _raw(old)
    # Odd lengths: a chunk that ends inside an element (only ever a blob's last chunk).
    raw, base = raw[: max(0, len(raw) - cut)], base[: max(0, len(base) - cut)]
    cid = chunk_hash(raw)
    layout = planes.layout_for_dtype(_dtype_name(dtype))
    assert layout != planes.BYTES
    # Every codec, forced: decode(encode(x)) == x.
    assert _decode(codec.Encoded(codec.ZSTD, codec._compressor().compress(raw)), len(raw)) == bytes(raw)
    assert _decode(codec.Encoded(codec.PLANES, codec.encode_planes(np.frombuffer(raw, np.uint8), layout)), len(raw)) == bytes(raw)
    delta = planes.xor_into(np.frombuffer(raw, np.uint8), np.frombuffer(base, np.uint8), np.empty(len(raw), np.uint8))
    forced = codec.Encoded(codec.XOR_PLANES, codec.encode_planes(delta, layout), chunk_hash(base))
    assert _decode(forced, len(raw), base) == bytes(raw)
    # And whatever encode() picks.
    chosen = codec.encode(raw, cid, layout=layout, base=(chunk_hash(base), base))
    assert _decode(chosen, len(raw), base if chosen.base else None) == bytes(raw)


@pytest.mark.parametrize("layout", [2, 4, 8])
@pytest.mark.parametrize("nbytes", [0, 7, 3601, 32 * 1024 - 3, 32 * 1024, 32 * 1024 + 5, 100_003])
def test_byte_planes_are_byte_i_of_each_element_on_both_sides_of_the_small_path(layout, nbytes) -> None:
    # Small data is split and merged by a strided copy, larger data by shifts: both
    # must give the layout of docs/format.md 5.2 and invert each other.
    data = np.random.default_rng(nbytes + layout).integers(0, 256, nbytes, dtype=np.uint8)
    count = nbytes // layout
    expected = data[: count * layout].reshape(count, layout).T
    for out in (None, np.empty(nbytes + 8, np.uint8)):
        grouped, tail = planes.split(data, layout, out)
        assert np.array_equal(grouped, expected) and np.array_equal(tail, data[count * layout :])
    merged = np.empty(nbytes, np.uint8)
    planes.merge_into([row.copy() for row in expected], data[count * layout :], layout, merged)
    assert np.array_equal(merged, data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=_dtype_name)
def test_byte_planes_beat_plain_zstd_on_weights(dtype) -> None:
    raw = _raw(_weights(dtype, 1 << 18, 0))
    plain = len(codec._compressor().compress(raw))
    enc = codec.encode(raw, chunk_hash(raw), layout=planes.layout_for_dtype(_dtype_name(dtype)))
    assert enc.codec == codec.PLANES
    assert len(enc.payload) < 0.98 * plain


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=_dtype_name)
def test_fp8_keeps_the_smaller_of_nibble_planes_and_zstd(dtype) -> None:
    raw = _raw(_weights(dtype, 1 << 18, 0))
    nibbles = len(codec.encode_planes(np.frombuffer(raw, np.uint8), planes.NIBBLES))
    plain = len(codec._compressor().compress(raw))
    enc = codec.encode(raw, chunk_hash(raw), layout=planes.NIBBLES)
    assert len(enc.payload) == min(nibbles, plain) < len(raw)


def test_small_update_is_stored_as_a_small_delta() -> None:
    old = _weights(torch.float32, 1 << 18, 0)
    new = old - 1e-5 * torch.sign(old)  # one small optimizer-like step on every weight
    raw, base = _raw(new), _raw(old)
    enc = codec.encode(raw, chunk_hash(raw), layout=4, base=(chunk_hash(base), base))
    assert enc.codec == codec.XOR_PLANES and enc.base == chunk_hash(base)
    alone = codec.encode(raw, chunk_hash(raw), layout=4)
    assert len(enc.payload) < 0.8 * len(alone.payload)


def test_random_bytes_stay_raw() -> None:
    raw = memoryview(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    for layout in planes.LAYOUTS:
        assert codec.encode(raw, chunk_hash(raw), layout=layout).codec == codec.RAW


def test_verify_after_encode_rejects_a_broken_encoder(monkeypatch) -> None:
    real = codec._plane_parts

    def broken(data, layout, slot):
        parts = real(data, layout, slot)
        last = bytearray(parts[-2])
        last[-1] ^= 0x01  # silently wrong, but well-formed
        return [*parts[:-2], bytes(last), parts[-1]]

    monkeypatch.setattr(codec, "_plane_parts", broken)
    raw = _raw(torch.zeros(4096))
    with pytest.warns(codec.EncodingRejectedWarning):
        enc = codec.encode(raw, chunk_hash(raw), layout=4)
    assert enc.codec == codec.ZSTD or enc.codec == codec.RAW  # the broken candidate was not kept
    assert _decode(enc, len(raw)) == bytes(raw)


def test_a_commit_with_a_broken_encoder_still_loads_bit_exact(repo: Repo, monkeypatch) -> None:
    real = codec._plane_parts
    monkeypatch.setattr(codec, "_plane_parts", lambda data, layout, slot: [*real(data, layout, slot), b"\x00"])
    state = {"w": _weights(torch.float32, 300_000, 1) * 0}  # zeros: planes would win
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        repo.commit(state)
    assert any(issubclass(w.category, codec.EncodingRejectedWarning) for w in caught)
    assert all(e.codec != codec.PLANES for e in repo.chunks.index)
    assert_tensor_identical(repo.load()["w"], state["w"])


def test_corrupt_payloads_raise_instead_of_decoding() -> None:
    raw = _raw(_weights(torch.float32, 4096, 3))
    payload = codec.encode_planes(np.frombuffer(raw, np.uint8), 4)
    for bad in (payload[:1], payload[:-1], payload + b"x", bytes([9]) + payload[1:], payload[:2] + bytes([7]) + payload[3:]):
        with pytest.raises(codec.CorruptObjectError):
            codec.decode_into(codec.PLANES, bad, memoryview(bytearray(len(raw))))
    with pytest.raises(codec.CorruptObjectError):
        codec.decode_into(codec.XOR_PLANES, payload, memoryview(bytearray(len(raw))))  # no base
    with pytest.raises(codec.CorruptObjectError):
        codec.decode_into(99, payload, memoryview(bytearray(len(raw))))


# -- deltas in a repository -----------------------------------------------------------


def _training_run(n: int, steps: int, seed: int = 0):
    """States of a weight tensor after each of ``steps`` small updates."""
    w = _weights(torch.float32, n, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        w = w - 1e-4 * torch.randn(n, generator=gen).sign()
        yield {"model": {"w": w.clone()}, "step": 1}


def _chain_lengths(repo: Repo, rev: str) -> list[int]:
    blob = repo.manifest(rev).blobs[0]
    return [repo.chunks.chain_length(repo.chunks.index.get(bytes.fromhex(c))) for c in blob["chunks"]]


def test_delta_chains_stop_at_the_keyframe_interval(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10, keyframe_interval=3)
    try:
        states = list(_training_run(100_000, 7))
        lengths = []
        for state in states:
            repo.commit(state)
            lengths.append(_chain_lengths(repo, "HEAD"))
        # keyframe, delta, delta (the bound: K - 1 = 2 deltas), keyframe, ...
        assert [set(x) for x in lengths] == [{0}, {1}, {2}, {0}, {1}, {2}, {0}]
        for back, state in enumerate(reversed(states)):
            assert_tensor_identical(repo.load(f"HEAD~{back}")["model"]["w"], state["model"]["w"])
        assert repo.show("HEAD~5").stats["new_stored_bytes"] < 0.8 * repo.show("HEAD~6").stats["new_stored_bytes"]
    finally:
        repo.close()


def test_keyframe_interval_one_disables_deltas(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10, keyframe_interval=1)
    try:
        for state in _training_run(50_000, 3):
            repo.commit(state)
        assert all(e.base is None for e in repo.chunks.index)
    finally:
        repo.close()


def test_bad_keyframe_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="keyframe_interval"):
        Repo.init(tmp_path / "r", keyframe_interval=0)


def test_delta_base_is_recorded_in_pack_and_index(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    try:
        for state in _training_run(40_000, 2):
            repo.commit(state)
        deltas = [e for e in repo.chunks.index if e.base is not None]
        assert deltas and all(e.codec == codec.XOR_PLANES for e in deltas)
        walked = {e.chunk_id: e for p in (repo.root / "packs").glob("*.pack") for e in iter_pack_entries(p)}
        for entry in repo.chunks.index:
            assert walked[entry.chunk_id] == entry  # the index is rebuildable from the packs, bases included
            if entry.base is not None:
                assert entry.base in walked
        # A fresh index rebuilt from the packs serves the same loads.
        rebuilt = ChunkIndex(tmp_path / "rebuilt")
        rebuilt.add(walked.values())
        assert sorted(rebuilt, key=lambda e: e.chunk_id) == sorted(repo.chunks.index, key=lambda e: e.chunk_id)
        rebuilt.close()
    finally:
        repo.close()


def test_corrupted_delta_base_raises_integrity_error(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    try:
        for state in _training_run(40_000, 2):
            repo.commit(state)
        delta_entry = next(e for e in repo.chunks.index if e.base is not None)
        base_entry = repo.chunks.index.get(delta_entry.base)
        flip_payload_byte(repo, base_entry)
        with pytest.raises(IntegrityError, match="model/w"):
            repo.load("HEAD")
        with pytest.raises(IntegrityError):
            repo.chunks.read_chunk(delta_entry.chunk_id, describe=lambda: "chunk")
    finally:
        repo.close()


def test_missing_delta_base_raises_integrity_error(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    try:
        for state in _training_run(40_000, 2):
            repo.commit(state)
        delta_entry = next(e for e in repo.chunks.index if e.base is not None)
        with repo.chunks.index._env.begin(db=repo.chunks.index._db, write=True) as txn:
            txn.delete(delta_entry.base)
        with pytest.raises(IntegrityError, match="base chunk"):
            repo.load("HEAD")
    finally:
        repo.close()


def test_a_damaged_parent_chunk_is_not_used_as_a_base(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    try:
        states = list(_training_run(40_000, 2))
        repo.commit(states[0])
        entry = next(iter(repo.chunks.index))
        flip_payload_byte(repo, entry)
        repo.commit(states[1])
        assert repo.chunks.index.get(entry.chunk_id) is not None
        assert all(e.base != entry.chunk_id for e in repo.chunks.index)
        assert_tensor_identical(repo.load()["model"]["w"], states[1]["model"]["w"])
    finally:
        repo.close()


def test_bases_pair_tensors_by_name_when_the_structure_shifts(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    try:
        first, second = _training_run(40_000, 2)
        repo.commit({"model": first["model"]})
        # A new tensor in front shifts blob positions; "model/w" still finds its base.
        state = {"extra": torch.arange(10.0), "model": second["model"]}
        repo.commit(state)
        assert any(e.base is not None for e in repo.chunks.index)
        loaded = repo.load()
        assert_tensor_identical(loaded["model"]["w"], state["model"]["w"])
        assert_tensor_identical(loaded["extra"], state["extra"])
    finally:
        repo.close()


def test_unchanged_tensors_cost_no_encoding(repo: Repo, monkeypatch) -> None:
    state = {"w": _weights(torch.float32, 300_000, 5)}
    repo.commit(state)
    calls = []
    real = codec.encode
    monkeypatch.setattr(codec, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    repo.commit(state, "again")
    assert calls == [] and repo.show().stats["new_chunks"] == 0


def test_cli_init_records_the_keyframe_interval(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ckptvcs.cli import cli

    result = CliRunner().invoke(cli, ["init", str(tmp_path / "r"), "--keyframe-interval", "6"])
    assert result.exit_code == 0, result.output
    with Repo.open(tmp_path / "r") as repo:
        assert repo.config["keyframe_interval"] == 6 and repo.chunks.keyframe_interval == 6
    bad = CliRunner().invoke(cli, ["init", str(tmp_path / "s"), "--keyframe-interval", "0"])
    assert bad.exit_code != 0 and "keyframe_interval" in bad.output


def test_a_failed_background_flush_fails_the_seal(tmp_path: Path, monkeypatch) -> None:
    import errno

    from ckptvcs import _fs

    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "injected writeback error")

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(_fs, "_fsync", failing_fsync)
        flush = _fs.EarlyWriteback(fd, step=10)
        flush.wrote(5)
        flush.finish()  # below the step: nothing started, nothing to report
        assert calls == []
        flush.wrote(20)
        with pytest.raises(OSError, match="injected"):
            flush.finish()
        assert calls == [fd]
        flush.finish()  # reported once, like the kernel does; the seal's own fsync decides next
    finally:
        os.close(fd)


def test_mixed_dtypes_over_many_small_chunks_round_trip_through_deltas(small_repo: Repo) -> None:
    """Many chunks in flight at once: recycled payload buffers and scratch never leak between chunks."""
    gen = torch.Generator().manual_seed(7)
    state = {
        "w32": torch.randn(100_003, generator=gen) * 0.02,
        "w16": (torch.randn(50_001, generator=gen) * 0.02).to(torch.bfloat16),
        "h16": (torch.randn(30_000, generator=gen)).to(torch.float16),
        "f8": (torch.randn(20_001, generator=gen)).to(torch.float8_e4m3fn),
        "ids": torch.arange(10_000, dtype=torch.int64),
        "arr": np.linspace(0, 1, 9_999, dtype=np.float64),
    }
    versions = []
    for step in range(3):
        state = {k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in state.items()}
        if step:
            state["w32"] -= 1e-4 * torch.randn(100_003, generator=gen).sign()
            state["w16"] = (state["w16"].float() * 1.001).to(torch.bfloat16)
            state["h16"][::7] += 1
            state["arr"][::3] *= 1.0001
        small_repo.commit(state, f"v{step}")
        versions.append(state)
    assert any(e.base is not None for e in small_repo.chunks.index)
    for back, expected in enumerate(reversed(versions)):
        loaded = small_repo.load(f"HEAD~{back}")
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert loaded[key].tobytes() == value.tobytes()
            else:
                assert_tensor_identical(loaded[key], value)


def test_gc_keeps_delta_bases_of_kept_commits_and_moves_deltas_intact(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=16 << 10)
    try:
        ids, states = [], []
        for i, state in enumerate(_training_run(20_000, 4)):
            state["junk"] = _weights(torch.float32, 40_000, 1000 + i) * 50  # this commit's own, bigger
            ids.append(repo.commit(state, f"c{i}", code_version=None))
            states.append(state)
        for cid in ids[:2]:
            repo.prune(cid, "keep_last=2", "test")
        predicted = repo.gc(dry_run=True)
        report = repo.gc()
        # Entry sizes count base ids: the dry run predicts the real one up to the 72-byte
        # frames (header + footer) of the packs written and merged away.
        frames = 72 * (len(report.packs_written) + len(report.packs_rewritten))
        assert abs(predicted.bytes_reclaimed - report.bytes_reclaimed) <= frames
        assert report.packs_rewritten  # c0's and c1's packs held live bases beside dead junk
        moved = [e for e in repo.chunks.index if e.pack in report.packs_written]
        assert any(e.base is not None for e in moved)  # delta entries moved with their base ids
        for cid, state in zip(ids[2:], states[2:]):
            loaded = repo.load(cid)
            assert_tensor_identical(loaded["model"]["w"], state["model"]["w"])
            assert_tensor_identical(loaded["junk"], state["junk"])
        walked = {e.chunk_id: e for p in (repo.root / "packs").glob("*.pack") for e in iter_pack_entries(p)}
        for entry in repo.chunks.index:
            assert walked[entry.chunk_id] == entry
        assert repo.gc().bytes_reclaimed == 0
    finally:
        repo.close()


def test_fsck_and_repair_index_understand_delta_chains(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 << 10)
    try:
        states = list(_training_run(40_000, 3))
        for state in states:
            repo.commit(state, code_version=None)
        assert any(e.base is not None for e in repo.chunks.index)
        report = repo.fsck(read_data=True)
        assert report.ok, [str(f) for f in report.errors]
        before = sorted(repo.chunks.index, key=lambda e: e.chunk_id)
        repo.repair_index()
        assert sorted(repo.chunks.index, key=lambda e: e.chunk_id) == before  # bases rebuilt from the packs
        assert_tensor_identical(repo.load()["model"]["w"], states[-1]["model"]["w"])
    finally:
        repo.close()

"""Loads and diffs read many blobs at once: one index transaction, small chunks grouped.

A state of 100,000 small tensors paid, per tensor, an index transaction, a pool task and
(in diff) a whole read; batching must not change which bytes land where, what damage
names, or what diff reports (docs/performance.md, "Many small tensors").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ckptvcs import Repo, diff, index
from ckptvcs.errors import IntegrityError, KeyNotFoundError
from ckptvcs.state import iter_tensors
from ckptvcs.store import BlobRead


def _state(n: int, seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    model = {f"layer{i}.weight": torch.randn(3 + i % 7, generator=gen) for i in range(n)}
    model["zeros"] = torch.zeros(40_000)  # ten identical 4 KiB chunks: decoded once, copied
    model["big"] = torch.randn(30_000, generator=gen)
    model["tied"] = model["layer1.weight"]
    return {"model": model, "array": np.arange(1000, dtype=np.float64), "step": 3}


def _same(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b)
    else:
        assert a == b


def test_a_load_of_many_small_tensors_asks_the_index_once_and_is_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=4096)
    state = _state(300)
    repo.commit(state, message="one")
    repo.close()

    calls = {"get": 0, "get_many": 0}
    get, get_many = index.ChunkIndex.get, index.ChunkIndex.get_many

    def counting_get(self: index.ChunkIndex, chunk_id: bytes) -> object:
        calls["get"] += 1
        return get(self, chunk_id)

    def counting_get_many(self: index.ChunkIndex, *args: object, **kwargs: object) -> object:
        calls["get_many"] += 1
        return get_many(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index.ChunkIndex, "get", counting_get)
    monkeypatch.setattr(index.ChunkIndex, "get_many", counting_get_many)
    repo = Repo.open(tmp_path / "r")
    loaded = repo.load()
    _same(state, loaded)
    assert loaded["model"]["tied"].untyped_storage().data_ptr() == loaded["model"]["layer1.weight"].untyped_storage().data_ptr()
    assert calls == {"get": 0, "get_many": 1}
    repo.close()


def test_damage_in_a_grouped_small_chunk_names_its_tensor(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=4096)
    state = {f"t{i}": torch.full((5,), float(i)) for i in range(50)}
    commit = repo.commit(state, message="one")
    manifest = repo.manifest(commit)
    blob = next(body["blob"] for path, _, body in iter_tensors(manifest.root) if path.endswith("t17"))
    victim = manifest.blobs[blob]["chunks"][0]
    entry = repo.chunks.index.get(bytes.fromhex(victim))
    assert entry is not None
    pack = repo.chunks.packs.path(entry.pack)
    data = bytearray(pack.read_bytes())
    data[entry.offset + entry.stored_len - 1] ^= 0x01  # the payload's last byte
    pack.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as caught:
        repo.load()
    assert "t17" in str(caught.value) and commit[:12] in str(caught.value)
    repo.close()


def test_read_blobs_fills_repeats_and_mixed_sizes(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=64 * 1024)
    store = repo.chunks
    rng = np.random.default_rng(1)
    blobs = [rng.integers(0, 255, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 9000, 30)]
    blobs.append(bytes(5 * 64 * 1024 + 10))  # a zero blob: its full chunks repeat
    blobs.append(rng.integers(0, 255, 3 * 64 * 1024, dtype=np.uint8).tobytes())
    session = store.write_session()
    ids = session.put_blobs([memoryview(b) for b in blobs])
    session.finish()
    outs = [bytearray(len(b)) for b in blobs]
    futures = store.read_blobs([BlobRead(i, memoryview(o), lambda: "blob") for i, o in zip(ids, outs)])
    assert sum(f.result() for f in futures) == sum(len(b) for b in blobs)
    assert [bytes(o) for o in outs] == blobs
    repo.close()


def test_diff_in_batches_reports_what_one_by_one_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repo.init(tmp_path / "r", chunk_size=4096)
    state = _state(120)
    repo.commit(state, message="one")
    model = state["model"]
    assert isinstance(model, dict)
    for i in range(0, 120, 3):
        model[f"layer{i}.weight"][0] += 1.0
    model["big"][7] = 2.5
    model["layer5.weight"] = torch.randn(9)  # shape changed
    del model["layer6.weight"]
    model["new"] = torch.ones(2)
    state["step"] = 4
    repo.commit(state, message="two")

    monkeypatch.setattr(diff, "COMPARE_BATCH_BYTES", 64)  # one or two tensors a batch: as one by one
    batched = repo.diff("HEAD~1", "HEAD")
    monkeypatch.setattr(diff, "COMPARE_BATCH_BYTES", 1 << 40)  # all at once
    together = repo.diff("HEAD~1", "HEAD")
    assert batched == together
    changed = {e.path for e in batched if e.status == "changed" and e.kind == "tensor"}
    assert {f"model/layer{i}.weight" for i in range(0, 120, 3)} - {"model/layer6.weight"} <= changed
    assert "model/big" in changed and "model/layer5.weight" in changed
    assert "model/layer1.weight" not in changed and "model/layer2.weight" not in changed
    by_path = {e.path: e for e in batched}
    assert by_path["model/layer6.weight"].status == "removed" and by_path["model/new"].status == "added"
    assert by_path["model/big"].fraction_changed == pytest.approx(1 / 30_000)
    assert by_path["step"].old == 3 and by_path["step"].new == 4
    repo.close()


def test_a_load_and_a_diff_leave_the_garbage_collector_as_they_found_it(tmp_path: Path) -> None:
    import gc

    repo = Repo.init(tmp_path / "r")
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(1100)}  # many small: the read is paused too
    repo.commit(state, message="one")
    state["t5"] += 1
    repo.commit(state, message="two")
    assert gc.isenabled()
    repo.load()
    assert [e.path for e in repo.diff("HEAD~1", "HEAD")] == ["t5"]
    assert gc.isenabled()
    with pytest.raises(KeyNotFoundError):  # raised inside a paused phase
        repo.load(keys=["no-such-key"])
    assert gc.isenabled()
    gc.disable()
    try:
        repo.load()
        assert not gc.isenabled(), "a caller's own choice to disable it stands"
    finally:
        gc.enable()
    repo.close()

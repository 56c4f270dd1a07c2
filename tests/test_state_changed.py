"""A chunk's bytes are never stored under an id they do not hash to, even when the
tensor changes while the commit reads it and every encoding fails verification."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ckptvcs import Repo, codec
from ckptvcs.errors import StateChangedError, UsageError
from ckptvcs.store import chunk_hash


def _mutating_encoder(monkeypatch: pytest.MonkeyPatch, target: np.ndarray) -> None:
    """Plane coding that first changes ``target`` (the live tensor memory), as a trainer
    thread stepping the optimizer during the commit would, and then corrupts its output."""
    real = codec._plane_parts

    def mutate_then_encode(data, layout, slot):
        target[:] += 1  # the tensor moves after its chunk was hashed
        parts = real(data, layout, slot)
        return [*parts, b"\x00"]  # and the encoding is wrong too: verification must fail

    monkeypatch.setattr(codec, "_plane_parts", mutate_then_encode)


def test_fallback_refuses_bytes_that_changed_since_they_were_hashed(monkeypatch) -> None:
    buf = np.zeros(4096, dtype=np.uint8)
    raw = memoryview(buf)
    cid = chunk_hash(raw)
    _mutating_encoder(monkeypatch, buf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", codec.EncodingRejectedWarning)
        with pytest.raises(StateChangedError) as caught:
            codec.encode(raw, cid, layout=4)
    assert caught.value.chunk_id == cid.hex()
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 9


def test_fallback_stores_a_snapshot_that_hashes_to_the_id(monkeypatch) -> None:
    real = codec._plane_parts
    monkeypatch.setattr(codec, "_plane_parts", lambda data, layout, slot: [*real(data, layout, slot), b"\x00"])
    buf = np.zeros(4096, dtype=np.uint8)
    cid = chunk_hash(memoryview(buf))
    with pytest.warns(codec.EncodingRejectedWarning):
        enc = codec.encode(memoryview(buf), cid, layout=4)
    assert enc.codec == codec.RAW
    buf[:] = 7  # changing the tensor afterwards does not change what would be written
    assert chunk_hash(enc.payload) == cid


def test_commit_of_a_state_changing_mid_commit_fails_and_stores_nothing(repo: Repo, monkeypatch) -> None:
    first = repo.commit({"w": torch.ones(1000)})
    w = torch.zeros(300_000)  # zeros: planes win, so the corrupting encoder is the one verified
    _mutating_encoder(monkeypatch, w.view(torch.uint8).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", codec.EncodingRejectedWarning)
        with pytest.raises(StateChangedError):
            repo.commit({"w": w})
    assert repo.head()[1] == first
    monkeypatch.undo()
    w2 = torch.full((300_000,), 3.0)
    second = repo.commit({"w": w2})
    assert second != first
    assert torch.equal(repo.load()["w"], w2)
    assert repo.fsck().ok

"""Repo.commit(reuse=ReuseHint): chunk ids of hinted tensors taken without hashing, the rotating check."""

from __future__ import annotations

import pytest
import torch

from ckptvcs import InvalidInputError, Repo, ReuseHint
from ckptvcs.reuse import checked_chunks
from ckptvcs.store import WriteSession
from helpers import assert_tensor_identical

CHUNK = 4096


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each commit's write session read and hashed (one entry per chunk)."""
    seen: list[int] = []
    encode = WriteSession._encode

    def counting(self, raw, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(len(raw))
        return encode(self, raw, *args, **kwargs)

    monkeypatch.setattr(WriteSession, "_encode", counting)
    return seen


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(64, 256, generator=g), "b": torch.randn(16, 256, generator=g)}  # 16 and 4 chunks


def chunks_of(repo: Repo, rev: str, path: str) -> list[str]:
    manifest = repo.manifest(rev)
    node = dict(manifest.root["dict"])[path]["tensor"]
    return manifest.blobs[node["blob"]]["chunks"]


def test_hint_reuses_ids_without_reading_the_bytes(small_repo: Repo, hashed: list[int]) -> None:
    s = state()
    first = small_repo.commit(s, code_version=None)
    s["b"].add_(1.0)
    hashed.clear()
    hint = ReuseHint(first, {"a"}, check_every=4, check_round=1)
    second = small_repo.commit(s, code_version=None, reuse=hint)
    assert hint.outcome is not None and hint.outcome.mismatch is None and hint.outcome.refused is None
    assert (hint.outcome.reused_chunks, hint.outcome.checked_chunks) == (12, 4)
    assert hint.outcome.reused_bytes == 12 * CHUNK
    assert sum(hashed) == s["b"].nbytes  # "a" went through the session without being read
    assert chunks_of(small_repo, second, "a") == chunks_of(small_repo, first, "a")
    loaded = small_repo.load(second)
    for key in s:
        assert_tensor_identical(loaded[key], s[key])


def test_a_correct_hint_gives_the_commit_an_unhinted_commit_would_have(tmp_path, small_repo: Repo) -> None:
    s = state()
    first = small_repo.commit(s, code_version=None)
    hinted = small_repo.commit(s, code_version=None, reuse=ReuseHint(first, {"a", "b"}, check_every=8))
    with Repo.init(tmp_path / "plain", chunk_size=CHUNK) as plain:
        plain.commit(s, code_version=None)
        unhinted = plain.commit(s, code_version=None)
        assert plain.show(unhinted).manifest == small_repo.show(hinted).manifest


def test_a_wrong_hint_is_caught_by_the_check_and_the_whole_commit_hashed(small_repo: Repo, hashed: list[int]) -> None:
    s = state()
    first = small_repo.commit(s, code_version=None)
    s["a"].mul_(2.0)  # every chunk of "a" changed, and the hint says it did not
    hashed.clear()
    hint = ReuseHint(first, {"a", "b"}, check_every=8, check_round=0)
    second = small_repo.commit(s, code_version=None, reuse=hint)
    assert hint.outcome is not None and hint.outcome.mismatch == "a"
    assert hint.outcome.reused_chunks == 0
    assert sum(hashed) == s["a"].nbytes + s["b"].nbytes
    assert_tensor_identical(small_repo.load(second)["a"], s["a"])


def test_a_sparse_unannounced_change_is_caught_within_check_every_commits(small_repo: Repo) -> None:
    s = state()
    parent = small_repo.commit(s, code_version=None)
    s["a"][37, 5] += 1.0  # one element of one chunk
    caught_at = None
    for rnd in range(8):
        hint = ReuseHint(parent, {"a", "b"}, check_every=8, check_round=100 + rnd)
        parent = small_repo.commit(s, code_version=None, reuse=hint)
        assert hint.outcome is not None
        if hint.outcome.mismatch is not None:
            caught_at = rnd
            assert_tensor_identical(small_repo.load(parent)["a"], s["a"])
            break
    assert caught_at is not None


def test_the_rotation_checks_every_chunk_once_per_cycle() -> None:
    names = {0: "a", 2: "c"}
    plan = [[b"x"] * 16, None, [b"y"] * 5]
    seen: list[tuple[int, int]] = []
    for rnd in range(7, 7 + 8):
        seen += checked_chunks(names, plan, 8, rnd)
    assert sorted(seen) == [(0, j) for j in range(16)] + [(2, j) for j in range(5)]
    assert len(checked_chunks(names, plan, 1, 0)) == 21


def test_a_pruned_or_unknown_commit_is_not_reused(small_repo: Repo, hashed: list[int]) -> None:
    s = state()
    first = small_repo.commit(s, code_version=None)
    small_repo.commit(s, code_version=None)
    small_repo.prune(first, "keep_last")
    hashed.clear()
    hint = ReuseHint(first, {"a", "b"})
    small_repo.commit(s, code_version=None, reuse=hint)
    assert hint.outcome is not None and "pruned" in (hint.outcome.refused or "")
    assert sum(hashed) == s["a"].nbytes + s["b"].nbytes
    hint = ReuseHint("0" * 64, {"a", "b"})
    small_repo.commit(s, code_version=None, reuse=hint)
    assert hint.outcome is not None and "does not exist" in (hint.outcome.refused or "")


def test_a_changed_layout_or_dtype_is_not_reused(small_repo: Repo) -> None:
    s = state()
    first = small_repo.commit(s, code_version=None)
    moved = {"a": s["a"].t(), "b": s["b"].double()}  # same bytes for "a", another layout; "b" another dtype
    hint = ReuseHint(first, {"a", "b"}, check_every=1000)
    second = small_repo.commit(moved, code_version=None, reuse=hint)
    assert hint.outcome is not None and hint.outcome.reused_chunks == hint.outcome.checked_chunks == 0
    loaded = small_repo.load(second)
    assert_tensor_identical(loaded["a"], moved["a"])
    assert_tensor_identical(loaded["b"], moved["b"])


def test_a_bad_check_every_is_refused(small_repo: Repo) -> None:
    first = small_repo.commit(state(), code_version=None)
    with pytest.raises(InvalidInputError):
        small_repo.commit(state(), code_version=None, reuse=ReuseHint(first, {"a"}, check_every=0))

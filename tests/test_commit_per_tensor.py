"""The per-tensor commit path (issue 16, many small tensors): the speed-ups keep every
manifest byte-identical and every refusal as it was.

The manifest ids pinned here were computed by the code before the per-tensor speed-ups
(main at 036bf7d): the same state must give the same manifest, byte for byte.
"""

from __future__ import annotations

import enum
import gc
import json
import pathlib
import random
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch

import ckptvcs
from ckptvcs import _gcpause, components, delta
from ckptvcs.errors import UnsupportedValueError
from ckptvcs.objects import canonical_json, json_depth_exceeds, json_text_depth_exceeds
from ckptvcs.state import encode_state, iter_tensors


class Color(enum.IntEnum):
    RED = 1


def _golden_state() -> dict:
    """A deterministic state touching every tensor case the encoder treats apart."""
    base = torch.arange(64, dtype=torch.float32)
    odict: OrderedDict = OrderedDict([("w", torch.arange(6, dtype=torch.float64).reshape(2, 3))])
    odict._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    tied = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(3, 4))
    return {
        "model": {f"layer{i}.weight": torch.arange(16, dtype=torch.float32) * i for i in range(40)},
        "param": torch.nn.Parameter(torch.ones(5)),
        "frozen": torch.nn.Parameter(torch.ones(3), requires_grad=False),
        "grad": torch.zeros(4).requires_grad_(True),
        "tied": {"a": tied, "b": tied, "view": tied.detach()[1]},
        "offset_views": [base[3:10], base[17:40:3], base[5:6]],
        "transposed": torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "bool": torch.tensor([True, False]),
        "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(),
        "neg": torch.tensor([1.0, 2.0])._neg_view(),
        "numpy": np.arange(10, dtype=np.int16),
        "big_bytes": bytes(range(256)) * 300,
        "small_bytes": b"abc",
        "odict": odict,
        "enum": Color.RED,
        "path": pathlib.PurePosixPath("/a/b"),
        "tuple": (1, 2.5, float("nan"), None, "s"),
        "optimizer": {"state": {0: {"exp_avg": torch.full((4,), 0.5), "step": torch.tensor(3.0)}}},
        # alone in their storage: 1-D, dense, starting on a 16-byte boundary or not
        "aligned_view": torch.arange(32, dtype=torch.float32)[8:16],
        "unaligned_view": torch.arange(32, dtype=torch.float32)[3:9],
        "half": torch.arange(24, dtype=torch.float16)[8:],
        "bf16": torch.arange(5, dtype=torch.bfloat16),
        "complex": torch.arange(4, dtype=torch.float32).to(torch.complex64),
        "one": torch.ones(1, dtype=torch.int8),
        "matrix": torch.arange(20, dtype=torch.int32).reshape(4, 5),
        "rng": torch.arange(8, dtype=torch.uint8),
        7: [torch.arange(3)],
    }


GOLDEN_MANIFEST = "02bc75659dd73bfcb6cbf24868b8376fe91d5357b5c69ca56e5d2b777364a71c"
GOLDEN_SECOND = "c7104618b59cb759941e1c835cd1582eeb779bd23c0ce5c74454b49a86698d3e"


def test_manifest_bytes_unchanged(tmp_path: pathlib.Path) -> None:
    """First commit and a second one (some tensors changed, delta bases taken from the
    first) give the manifests the code before the speed-ups gave."""
    repo = ckptvcs.Repo.init(tmp_path / "r")
    state = _golden_state()
    first = repo.show(repo.commit(state, "one", code_version=None)).manifest
    for i in range(0, 40, 10):
        state["model"][f"layer{i}.weight"].add_(1)
    second = repo.show(repo.commit(state, "two", code_version=None)).manifest
    assert (first, second) == (GOLDEN_MANIFEST, GOLDEN_SECOND)
    repo.close()
    loaded = repo.load()
    assert type(loaded["param"]) is torch.nn.Parameter and loaded["param"].requires_grad
    assert type(loaded["frozen"]) is torch.nn.Parameter and not loaded["frozen"].requires_grad
    assert type(loaded["grad"]) is torch.Tensor and loaded["grad"].requires_grad
    for key in ("aligned_view", "unaligned_view", "half", "bf16", "complex", "one", "matrix", "rng", "scalar",
                "transposed", "bool", "conj", "neg"):
        assert torch.equal(loaded[key], state[key].resolve_conj().resolve_neg()), key
        assert loaded[key].stride() == state[key].stride(), key
    assert loaded["tied"]["a"].untyped_storage().data_ptr() == loaded["tied"]["view"].untyped_storage().data_ptr()
    repo.close()


class _MyParameter(torch.nn.Parameter):
    pass


class _MyTensor(torch.Tensor):
    pass


@pytest.mark.parametrize("value", [
    _MyParameter(torch.ones(2)),
    torch.ones(2).as_subclass(_MyTensor),
], ids=["parameter-subclass", "tensor-subclass"])
def test_tensor_subclasses_are_still_refused(value: torch.Tensor) -> None:
    """The exact-type fast path must not let a subclass through (its extra state would be lost)."""
    with pytest.raises(UnsupportedValueError, match="tensor subclass"):
        encode_state({"model": {"w": torch.zeros(3), "bad": value}})


def test_lone_surrogate_keys_and_values_are_still_refused() -> None:
    """The plain-str fast paths still check UTF-8."""
    with pytest.raises(UnsupportedValueError, match="Unicode"):
        encode_state({"a\ud800": torch.zeros(1)})
    with pytest.raises(UnsupportedValueError, match="Unicode"):
        encode_state({"a": "\udfff"})


def _random_json(rng: random.Random, depth: int = 0) -> object:
    pick = rng.random()
    if depth > 10 or pick < 0.45:
        return rng.choice([1, None, 2.5, True, "a[{", 'x\\"]]}', "}}}]]", '"{', "\\\\", "é[", ""])
    if pick < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", "[", ']"', "\\", "{{"]) + str(i): _random_json(rng, depth + 1) for i in range(rng.randint(0, 3))}


def _deep(depth: int, inner: object) -> object:
    """Alternating objects and arrays, with strings full of closing brackets and quotes on the way."""
    value = inner
    for i in range(depth):
        value = [value, "]]"] if i % 2 else {'"]': value, "a": "]]]]}"}
    return value


def test_depth_of_json_text_agrees_with_the_walk() -> None:
    """json_text_depth_exceeds answers as json_depth_exceeds on the parsed value: brackets and
    escaped quotes inside strings do not count, and hostile nesting is still refused."""
    rng = random.Random(16)
    values = [_random_json(rng) for _ in range(600)]
    values += [_deep(n, _random_json(rng)) for n in range(250, 262)] + [_deep(n, "x") for n in (255, 256, 257)]
    seen = set()
    for value in values:
        text = canonical_json(value)
        for limit in (2, 5, 256):
            expected = json_depth_exceeds(value, limit)
            seen.add(expected)
            assert json_text_depth_exceeds(text, limit) == expected, text[:120]
            assert json_text_depth_exceeds(b"manifest\n" + text, limit) == expected
            assert json_text_depth_exceeds(json.dumps(value, indent=1).encode(), limit) == expected
    assert seen == {True, False}
    assert json_text_depth_exceeds(b"[" * 300 + b"]" * 300)
    assert not json_text_depth_exceeds(b'["' + b"[" * 300 + b'"]')


def test_deep_manifest_is_refused_before_writing(tmp_path: pathlib.Path) -> None:
    """The writer's check (now on the encoded text) still refuses what readers would refuse."""
    repo = ckptvcs.Repo.init(tmp_path / "r")
    with pytest.raises(UnsupportedValueError, match="nests deeper"):
        repo.objects.put("manifest", {"root": _deep(300, 1), "blobs": []})
    repo.close()


def test_components_from_known_paths_match_the_walk() -> None:
    """Component sizes computed from a commit's one walk equal those of the full walk."""
    state = {
        "model": {"w": torch.ones(3), "b": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}, 1: {"momentum_buffer": torch.ones(2)}}},
        "lr_scheduler": {"x": torch.ones(1)}, "rng": np.arange(3), "tied": None, "blob": b"x" * 70000,
    }
    state["tied"] = state["model"]["w"]
    encoded = encode_state(state)
    paths = delta.first_paths(encoded.root)
    assert paths == {body["blob"]: path for path, _, body in reversed(list(iter_tensors(encoded.root)))}
    count = len(encoded.blobs)
    assert components.blob_components(encoded.root, count, paths) == components.blob_components(encoded.root, count)
    sizes = [len(b.data) for b in encoded.blobs]
    assert components.split(encoded.root, sizes, sizes, paths) == components.split(encoded.root, sizes, sizes)


def test_second_commit_stores_the_same_with_or_without_the_kept_paths(tmp_path: pathlib.Path) -> None:
    """The parent's tensor paths kept from the previous commit choose the delta bases that
    reading the parent's manifest back would choose: the same bytes stored."""
    def states() -> tuple[dict, dict]:
        gen = torch.Generator().manual_seed(3)
        first = {f"layer{i}": torch.randn(4096, generator=gen) for i in range(6)}
        second = {k: v + 1e-3 if i % 2 else v for i, (k, v) in enumerate(first.items())}
        return first, second

    stored = []
    for reopen in (False, True):
        repo = ckptvcs.Repo.init(tmp_path / f"r{reopen}", chunk_size=4096)
        first, second = states()
        repo.commit(first, code_version=None)
        if reopen:
            repo.close()
            repo = ckptvcs.Repo.open(tmp_path / f"r{reopen}")
            assert repo._staged_paths is None
        else:
            assert repo._staged_paths is not None
        stats = repo.show(repo.commit(second, code_version=None)).stats
        stored.append((stats["new_stored_bytes"], stats.get("components")))
        repo.close()
    assert stored[0] == stored[1]
    assert stored[0][0] < sum(v.nbytes for v in states()[1].values()) // 2  # deltas were taken


def test_gc_pause_restores_the_collector(tmp_path: pathlib.Path) -> None:
    """A commit leaves the collector as it found it: enabled, or disabled by the caller; also
    when the commit fails; overlapping pauses from several threads re-enable it once, at the end."""
    assert gc.isenabled()
    repo = ckptvcs.Repo.init(tmp_path / "r")
    small = {f"t{i}": torch.full((4,), float(i)) for i in range(1100)}  # many, small: storing is paused too
    repo.commit(small, code_version=None)
    assert gc.isenabled()
    gc.disable()
    try:
        repo.commit({**small, "t0": torch.ones(4)}, code_version=None)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert torch.equal(repo.load()["t0"], torch.ones(4))
    repo.close()
    many = {f"t{i}": torch.zeros(1) for i in range(2000)}
    encode_state(many)
    assert gc.isenabled()
    with pytest.raises(UnsupportedValueError):
        encode_state({**many, "bad": {1, 2}})
    assert gc.isenabled()
    gc.disable()
    try:
        encode_state(many)
        assert not gc.isenabled()
    finally:
        gc.enable()

    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with _gcpause.paused():
            inside.set()
            release.wait(60)

    worker = threading.Thread(target=hold)
    worker.start()
    assert inside.wait(60)
    with _gcpause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause still holds
    release.set()
    worker.join(60)
    assert gc.isenabled()
    with _gcpause.paused(False):
        assert gc.isenabled()


def test_small_items_rule() -> None:
    assert _gcpause.small_items(100_000, 100_000 * 64)
    assert not _gcpause.small_items(10, 10 * 64)  # few: the collector barely runs
    assert not _gcpause.small_items(2000, 2000 << 20)  # large: storing takes as long as the bytes

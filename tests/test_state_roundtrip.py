"""Round trips through ``Repo.commit`` and ``Repo.load``: every supported value comes
back with the same structure, Python types, dtypes, shapes, strides and bits; tied
storage is shared again; partial loads read only what they return."""

from __future__ import annotations

import math
import os
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckptvcs import IntegrityError, Repo, RevisionNotFoundError, UnsupportedValueError
from ckptvcs.state import TORCH_DTYPES
from helpers import assert_array_identical, assert_tensor_identical, record_chunk_reads

DTYPE_NAMES = sorted(TORCH_DTYPES)

NUMPY_DTYPES = [
    "|b1", "|i1", "|u1",
    "<i2", ">i2", "<u2", ">u2", "<i4", ">i4", "<u4", ">u4", "<i8", ">i8", "<u8", ">u8",
    "<f2", ">f2", "<f4", ">f4", "<f8", ">f8",
    "<c8", ">c8", "<c16", ">c16",
]
if np.dtype(np.longdouble).itemsize > 8:  # x86-64: 80-bit extended in 16 bytes
    NUMPY_DTYPES += [np.dtype(np.longdouble).str, np.dtype(np.clongdouble).str]


# -- comparison ----------------------------------------------------------------------


def same_float(a: float, b: float) -> bool:
    """Bitwise equality; NaNs are equal to NaNs (the format stores them as "nan")."""
    if math.isnan(a):
        return math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_same(actual: Any, expected: Any, path: str = "<root>") -> None:
    """Recursive identity of structure, Python types and bits."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert_tensor_identical(actual, expected)
    elif isinstance(expected, np.ndarray):
        assert_array_identical(actual, expected)
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, float):
        assert same_float(actual, expected), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert len(actual) == len(expected), path
        for (ka, va), (ke, ve) in zip(actual.items(), expected.items()):
            assert_same(ka, ke, f"{path}/key {ke!r}")
            assert_same(va, ve, f"{path}/{ke!r}")
        if isinstance(expected, OrderedDict):
            assert hasattr(actual, "_metadata") == hasattr(expected, "_metadata"), path
            if hasattr(expected, "_metadata"):
                assert_same(actual._metadata, expected._metadata, f"{path}/_metadata")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}/{i}")
    else:  # None, bool, int, str, bytes, torch.Size, torch.dtype, torch.device
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def roundtrip(repo: Repo, state: Any, **load_kwargs: Any) -> Any:
    repo.commit(state, code_version=None)
    return repo.load(**load_kwargs)


# -- strategies ----------------------------------------------------------------------


def _raw_tensor(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    base = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        base = base & 1  # only 0 and 1 are valid bools
    return base.view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[str] = DTYPE_NAMES) -> torch.Tensor:
    """Tensors of every dtype with arbitrary bits, contiguous or not."""
    dtype = TORCH_DTYPES[draw(st.sampled_from(dtypes))]
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    extra = draw(st.integers(0, 3))  # leading elements: a nonzero storage offset
    numel = math.prod(shape) + extra
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    t = _raw_tensor(raw, dtype, (numel,))[extra:].reshape(shape)
    for op in draw(st.lists(st.sampled_from(["transpose", "step", "expand", "permute", "unsqueeze"]), max_size=3)):
        if op == "transpose" and t.dim() >= 2:
            t = t.transpose(0, -1)
        elif op == "step" and t.dim() >= 1:
            t = t[draw(st.integers(0, 2)) :: draw(st.integers(1, 3))]
        elif op == "expand":
            t = t.unsqueeze(0).expand(draw(st.integers(0, 3)), *t.shape)  # stride 0
        elif op == "permute" and t.dim() >= 2:
            t = t.permute(*draw(st.permutations(range(t.dim()))))
        elif op == "unsqueeze":
            t = t.unsqueeze(draw(st.integers(0, t.dim())))
    return t


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    nbytes = math.prod(shape) * dtype.itemsize
    raw = bytearray(draw(st.binary(min_size=nbytes, max_size=nbytes)))
    flat = np.frombuffer(raw, dtype=np.uint8)
    if dtype.kind == "b":
        flat = flat & 1
    array = flat.view(dtype).reshape(shape)
    order = draw(st.sampled_from(["C", "F", "step", "T"]))
    if order == "F":
        array = np.asfortranarray(array)
    elif order == "step" and array.ndim:
        array = array[::2]
    elif order == "T":
        array = array.T
    return array


@st.composite
def npscalars(draw: st.DrawFn) -> np.generic:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    raw = bytearray(draw(st.binary(min_size=dtype.itemsize, max_size=dtype.itemsize)))
    if dtype.kind == "b":
        raw = bytearray(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dtype)[0]


plain_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.lists(st.integers(0, 9), max_size=4).map(torch.Size),
    st.sampled_from(list(TORCH_DTYPES.values())),
    st.just(torch.device("cpu")),
)
leaves = st.one_of(plain_leaves, tensors(), ndarrays(), npscalars())
keys = st.one_of(
    st.text(max_size=6),
    st.integers(-5, 1000),
    st.tuples(st.integers(0, 3), st.text(max_size=3)),
    st.none(),
    st.binary(max_size=4),
)
states = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(OrderedDict),
    ),
    max_leaves=10,
)


# -- property tests --------------------------------------------------------------------


@given(state=states)
def test_any_state_roundtrips(repo: Repo, state: Any) -> None:
    assert_same(roundtrip(repo, state), state)


@given(t=tensors())
def test_tensor_roundtrips_with_strides(repo: Repo, t: torch.Tensor) -> None:
    assert_same(roundtrip(repo, {"t": t}), {"t": t})


@given(a=ndarrays())
def test_ndarray_roundtrips(repo: Repo, a: np.ndarray) -> None:
    out = roundtrip(repo, [a])
    assert_same(out, [a])
    assert out[0].dtype.str == a.dtype.str  # big-endian stays big-endian


@given(s=npscalars())
def test_numpy_scalar_roundtrips(repo: Repo, s: np.generic) -> None:
    assert_same(roundtrip(repo, (s,)), (s,))


@given(x=st.floats(allow_nan=False))
def test_python_float_bits(repo: Repo, x: float) -> None:
    out = roundtrip(repo, {"x": x})["x"]
    assert type(out) is float
    assert struct.pack("<d", out) == struct.pack("<d", x)


# -- every dtype, shapes, layouts ----------------------------------------------------------


def _random_bits(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen, dtype=torch.uint8).view(torch.bool)
    return torch.randint(0, 256, (numel * dtype.itemsize,), generator=gen, dtype=torch.uint8).view(dtype)


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_every_shape(repo: Repo, name: str) -> None:
    dtype = TORCH_DTYPES[name]
    big = _random_bits(dtype, 3000, seed=1).reshape(50, 60)
    state = {
        "scalar": _random_bits(dtype, 1, seed=2).reshape(()),
        "empty": _random_bits(dtype, 0, seed=3),
        "empty_2d": _random_bits(dtype, 0, seed=3).reshape(0, 7),
        "vector": _random_bits(dtype, 17, seed=4),
        "big": big,
        "transposed": big.t(),
        "stepped": big[1::3, ::7],
        "expanded": _random_bits(dtype, 5, seed=5).expand(4, 5),
        "expanded_0d": _random_bits(dtype, 1, seed=6).reshape(()).expand(3, 2),
    }
    out = roundtrip(repo, state)
    assert_same(out, state)
    assert out["expanded"].stride() == (0, 1)
    assert out["transposed"].stride() == (1, 60)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "complex128", "bool", "uint64"])
def test_tensor_larger_than_chunk_size(small_repo: Repo, name: str) -> None:
    dtype = TORCH_DTYPES[name]
    numel = (3 * small_repo.chunk_size + 1000) // dtype.itemsize
    base = _random_bits(dtype, numel, seed=7)
    state = {"flat": base, "matrix": base[: numel // 10 * 10].reshape(-1, 10).t()[:, 3:], "offset": base[999:]}
    commit_id = small_repo.commit(state, code_version=None)
    manifest = small_repo.manifest(commit_id)
    assert max(len(b["chunks"]) for b in manifest.blobs) >= 4  # really multi-chunk
    assert_same(small_repo.load(commit_id), state)


def test_bytes_small_boundary_and_large(small_repo: Repo) -> None:
    rng = random.Random(3)
    state = {
        "empty": b"",
        "small": bytes(rng.randrange(256) for _ in range(100)),
        "at_limit": os.urandom(64 << 10),
        "over_limit": os.urandom((64 << 10) + 1),
        "large": os.urandom(300_000),  # many 4 KiB chunks
    }
    out = roundtrip(small_repo, state)
    assert_same(out, state)


def test_python_scalars(repo: Repo) -> None:
    state = {
        "ints": [0, -1, 2**63, -(2**64) - 1, 2**1000, -(10**300), 7],
        "floats": [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-310, 0.1, -1.5e300],
        "bools": (True, False),
        "none": None,
        "str": "h\u00e9llo \u2603 \U0001f600",
        "bytes": b"\x00\xff",
        "size": torch.Size([2, 0, 3]),
        "dtypes": [torch.float8_e4m3fn, torch.bool, torch.complex32],
        "device": torch.device("cpu"),
    }
    out = roundtrip(repo, state)
    assert_same(out, state)
    assert math.copysign(1.0, out["floats"][1]) == -1.0
    assert type(out["bools"][0]) is bool and type(out["ints"][0]) is int


def test_huge_int_roundtrips_or_is_refused_before_writing(repo: Repo) -> None:
    """Ints of thousands of digits work; past JSON's digit limit they are refused, typed."""
    assert roundtrip(repo, {"x": 2**10000})["x"] == 2**10000
    before = repo.show().id
    with pytest.raises(UnsupportedValueError, match="x"):
        repo.commit({"w": torch.randn(100), "x": 10**5000}, code_version=None)
    assert repo.show().id == before
    assert repo.stats().chunks == 0  # the tensor was not stored


def test_numpy_float64_scalar_keeps_its_type(repo: Repo) -> None:
    """np.float64 subclasses float; it must come back as np.float64, not float."""
    state = {"f8": np.float64(0.1), "f4": np.float32(0.5), "i": np.int64(-3), "b": np.bool_(True), "c": np.complex128(1 - 2j)}
    out = roundtrip(repo, state)
    assert_same(out, state)


def test_containers_and_keys(repo: Repo) -> None:
    inner = OrderedDict([("z", 1), ("a", 2)])
    state = {
        3: "int key",
        "s": [1, (2, [3, {"deep": (4,)}])],
        (1, "a"): "tuple key",
        (): "empty tuple key",
        None: "none key",
        b"\x01": "bytes key",
        2.5: "float key",
        "od": inner,
        "empty": ({}, [], (), OrderedDict()),
    }
    out = roundtrip(repo, state)
    assert_same(out, state)
    assert list(out["od"]) == ["z", "a"]
    assert list(out) == list(state)


def test_oversized_bytes_key_is_refused_not_stored_broken(repo: Repo) -> None:
    """A dict key is never a blob; an over-64-KiB bytes key is refused up front."""
    key = b"k" * ((64 << 10) + 1)
    with pytest.raises(UnsupportedValueError):
        repo.commit({key: 1}, code_version=None)
    with pytest.raises(RevisionNotFoundError):
        repo.show()  # nothing was committed


# -- tied storage, parameters, modules ---------------------------------------------------


def test_tied_storage_is_shared_after_load(repo: Repo) -> None:
    w = torch.randn(6, 6)
    state = {"a": w, "b": w, "v": w[2:5], "t": w.t(), "as_int": w.view(torch.int32)}
    out = roundtrip(repo, state)
    assert_same(out, state)
    ptr = out["a"].untyped_storage().data_ptr()
    for name in ("b", "v", "t", "as_int"):
        assert out[name].untyped_storage().data_ptr() == ptr, name
    assert out["v"].storage_offset() == 12
    out["a"][2, 0] = 1234.5  # writes through every view, as before the round trip
    assert out["v"][0, 0] == 1234.5 and out["t"][0, 2] == 1234.5 and out["b"][2, 0] == 1234.5
    assert repo.show().stats["logical_bytes"] == w.nbytes  # stored once


def test_only_the_viewed_span_is_stored(repo: Repo) -> None:
    big = torch.randn(100_000)
    window = big[5000:5010]
    out = roundtrip(repo, {"w": window})
    assert torch.equal(out["w"], window)
    assert repo.show().stats["logical_bytes"] <= window.nbytes + 16
    assert out["w"].untyped_storage().nbytes() <= window.nbytes + 16


def test_storages_with_one_address_and_different_sizes(repo: Repo) -> None:
    """Two from_numpy storages over one buffer start at the same address."""
    a = np.arange(10.0)
    state = {"head": torch.from_numpy(a[:2]), "all": torch.from_numpy(a)}
    out = roundtrip(repo, state)
    assert_same(out, state)


def test_parameters_and_requires_grad(repo: Repo) -> None:
    p = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    leaf = torch.randn(2, requires_grad=True)
    out = roundtrip(repo, {"p": p, "frozen": frozen, "leaf": leaf, "derived": (p * 2)})
    assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert type(out["frozen"]) is torch.nn.Parameter and not out["frozen"].requires_grad
    assert type(out["leaf"]) is torch.Tensor and out["leaf"].requires_grad and out["leaf"].is_leaf
    assert torch.equal(out["p"].detach(), p.detach())
    assert torch.equal(out["derived"].detach(), (p * 2).detach())


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_module_state_dict_metadata_survives(repo: Repo) -> None:
    torch.manual_seed(0)
    model = _model()
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    out = roundtrip(repo, {"model": sd})
    assert_same(out["model"], sd)
    assert out["model"]._metadata == sd._metadata
    fresh = _model()
    fresh.load_state_dict(out["model"], strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_trainer_state_roundtrips_and_rng_reproduces(repo: Repo) -> None:
    saved_rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        torch.manual_seed(1)
        random.seed(1)
        np.random.seed(1)
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

        def train_step(m: torch.nn.Module, o: torch.optim.Optimizer, s: Any, seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            s.step()

        train_step(model, opt, sched, seed=10)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "step": 1,
        }
        out = roundtrip(repo, state)
        assert_same(out, state)

        expected = (torch.rand(5), random.random(), np.random.rand(3))
        torch.set_rng_state(out["rng"]["torch"])
        random.setstate(out["rng"]["python"])
        np.random.set_state(out["rng"]["numpy"])
        again = (torch.rand(5), random.random(), np.random.rand(3))
        assert torch.equal(again[0], expected[0])
        assert again[1] == expected[1]
        assert np.array_equal(again[2], expected[2])

        # Resuming from the loaded state continues training bit for bit.
        model2 = _model()
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
        model2.load_state_dict(out["model"])
        opt2.load_state_dict(out["optimizer"])
        sched2.load_state_dict(out["scheduler"])
        train_step(model, opt, sched, seed=11)
        train_step(model2, opt2, sched2, seed=11)
        for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
            assert torch.equal(a, b), name
        assert sched2.get_last_lr() == sched.get_last_lr()
    finally:
        torch.set_rng_state(saved_rng[0])
        random.setstate(saved_rng[1])
        np.random.set_state(saved_rng[2])


# -- partial loads and placement ----------------------------------------------------------


def _chunk_ids(repo: Repo, commit_id: str, top_key: str) -> set[bytes]:
    """Chunk ids of the blobs used by one top-level entry."""
    from ckptvcs.state import blob_kinds, select_keys

    manifest = repo.manifest(commit_id)
    node = select_keys(manifest.root, [top_key])
    return {bytes.fromhex(c) for i in blob_kinds(node) for c in manifest.blobs[i]["chunks"]}


def test_load_keys_returns_only_those_entries(repo: Repo) -> None:
    state = OrderedDict(model={"w": torch.randn(10)}, optimizer={"m": torch.randn(10)}, step=5, blob=os.urandom(70_000))
    repo.commit(state, code_version=None)
    out = repo.load(keys=["step", "model"])
    assert type(out) is OrderedDict
    assert list(out) == ["step", "model"]
    assert out["step"] == 5 and torch.equal(out["model"]["w"], state["model"]["w"])
    assert repo.load(keys="step") == OrderedDict(step=5)
    assert repo.load(keys=["blob"])["blob"] == state["blob"]


def test_load_keys_reads_no_chunk_of_other_entries(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"model": {"w": torch.randn(300_000), "b": torch.randn(7)}, "optimizer": {"m": torch.randn(300_000)},
             "extra": np.random.rand(1000)}
    commit_id = repo.commit(state, code_version=None)
    wanted = _chunk_ids(repo, commit_id, "model")
    others = _chunk_ids(repo, commit_id, "optimizer") | _chunk_ids(repo, commit_id, "extra")
    assert wanted and others and not wanted & others

    read = record_chunk_reads(monkeypatch, repo)
    out = repo.load(keys=["model"])
    assert set(out) == {"model"}
    assert torch.equal(out["model"]["w"], state["model"]["w"])
    assert set(read) == wanted
    read.clear()
    repo.load()
    assert set(read) == wanted | others  # the recorder sees full loads


def test_load_keys_works_when_other_entries_packs_are_gone(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r") as repo:
        other = {"m": torch.randn(50_000)}
        repo.commit({"optimizer": other}, code_version=None)
        first_packs = set((repo.root / "packs").iterdir())
        wanted = torch.randn(50_000)
        commit_id = repo.commit({"model": wanted, "optimizer": other}, code_version=None)
        assert repo.show().stats["new_chunks"] >= 1  # only the model's chunks are new
        for pack in first_packs:
            pack.unlink()  # the pack holding only the optimizer's chunks
    with Repo.open(tmp_path / "r") as repo:
        out = repo.load(commit_id, keys=["model"])
        assert torch.equal(out["model"], wanted)
        with pytest.raises(IntegrityError, match="optimizer/m"):
            repo.load(commit_id)


@pytest.mark.parametrize(
    "location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda saved: "cpu"], ids=["str", "device", "map", "callable"]
)
def test_load_map_location(repo: Repo, location: Any) -> None:
    w = torch.randn(4, 4)
    state = {"w": w, "t": w.t(), "p": torch.nn.Parameter(torch.randn(2))}
    out = roundtrip(repo, state, map_location=location)
    assert_same(out, state)
    assert out["w"].device.type == "cpu"
    assert out["w"].untyped_storage().data_ptr() == out["t"].untyped_storage().data_ptr()

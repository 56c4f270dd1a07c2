"""Tests for ckptvcs.safetensors_file: round trips, interop with the reference library,
and rejection of malformed files and unwritable inputs."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptvcs.errors import InvalidInputError, StorageError
from ckptvcs.safetensors_file import SAFETENSORS_DTYPES, read_safetensors, write_safetensors

ALL_DTYPES = list(SAFETENSORS_DTYPES.items())


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included) of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def _raw_file(path: Path, header: object, data: bytes = b"", *, header_len: int | None = None) -> Path:
    """Write a hand-made safetensors file: ``header`` is a JSON-able object or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name,dtype", ALL_DTYPES, ids=[n for n, _ in ALL_DTYPES])
def test_round_trip_every_dtype(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    base = _random_tensor(dtype, (4, 6), seed=1)
    tensors = {
        "matrix": base,
        "scalar": _random_tensor(dtype, (), seed=2),
        "empty": _random_tensor(dtype, (0,), seed=3),
        "empty_2d": _random_tensor(dtype, (3, 0, 2), seed=4),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "vector": _random_tensor(dtype, (7,), seed=5),
    }
    assert not tensors["transposed"].is_contiguous()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors)
    loaded, metadata = read_safetensors(path)
    assert metadata == {}
    assert set(loaded) == set(tensors)
    for key, expected in tensors.items():
        assert_bit_equal(loaded[key], expected)
        assert loaded[key].is_contiguous()


def test_round_trip_metadata_and_mixed_dtypes(tmp_path: Path) -> None:
    tensors = {f"t_{name}": _random_tensor(dtype, (3,), seed=i) for i, (name, dtype) in enumerate(ALL_DTYPES)}
    metadata = {"format": "pt", "note": "ünïcödé ✓", "empty": ""}
    path = tmp_path / "mixed.safetensors"
    write_safetensors(str(path), tensors, metadata)
    loaded, got_metadata = read_safetensors(str(path))
    assert got_metadata == metadata
    for key, expected in tensors.items():
        assert_bit_equal(loaded[key], expected)


def test_written_layout_is_aligned_and_padded(tmp_path: Path) -> None:
    tensors = {name: _random_tensor(dtype, (3,), seed=i) for i, (name, dtype) in enumerate(ALL_DTYPES)}
    path = tmp_path / "aligned.safetensors"
    write_safetensors(path, tensors, {"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header.pop("__metadata__") == {"k": "v"}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        assert begin % SAFETENSORS_DTYPES[name].itemsize == 0
    assert 8 + n + max(info["data_offsets"][1] for info in header.values()) == len(raw)


def test_shared_storage_and_special_views(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    c = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    tensors = {
        "whole": base,
        "head": base[:4],
        "same": base,
        "reshaped": base.view(3, 4),
        "conj": c.conj(),
        "neg": c.conj().imag,
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    path = tmp_path / "shared.safetensors"
    write_safetensors(path, tensors)
    loaded, _ = read_safetensors(path)
    for key, expected in tensors.items():
        assert_bit_equal(loaded[key], expected)
    assert torch.equal(loaded["conj"], torch.tensor([1 - 2j, -3 + 4j], dtype=torch.complex64))


def test_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    write_safetensors(path, {})
    assert read_safetensors(path) == ({}, {})


def test_read_order_follows_data_offsets(tmp_path: Path) -> None:
    header = {
        "z": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
        "m": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]},
    }
    path = _raw_file(tmp_path / "order.safetensors", header, b"\x01\x02\x03")
    loaded, _ = read_safetensors(path)
    assert list(loaded) == ["z", "a", "m"]
    assert loaded["z"].tolist() == [1, 2] and loaded["a"].tolist() == [3]


def test_misaligned_offsets_are_copied(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.25, float("nan")], dtype=torch.float64)
    header = {
        "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f64": {"dtype": "F64", "shape": [3], "data_offsets": [1, 25]},
        "i16": {"dtype": "I16", "shape": [], "data_offsets": [25, 27]},
    }
    data = b"\x07" + values.numpy().tobytes() + struct.pack("<h", -300)
    # An unpadded header too: nothing may assume the buffer starts 8-aligned in the file.
    path = _raw_file(tmp_path / "misaligned.safetensors", b" " + json.dumps(header).encode(), data)
    loaded, _ = read_safetensors(path)
    assert_bit_equal(loaded["f64"], values)
    assert loaded["i16"].item() == -300 and loaded["i16"].shape == ()
    assert loaded["byte"].tolist() == [7]


def test_tensors_outlive_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "mutable.safetensors"
    write_safetensors(path, {"w": torch.arange(6, dtype=torch.int32)})
    loaded, _ = read_safetensors(path)
    write_safetensors(path, {"w": torch.zeros(6, dtype=torch.int32)})
    path.unlink()
    assert loaded["w"].tolist() == [0, 1, 2, 3, 4, 5]
    loaded["w"] += 1  # writable, owned memory
    assert loaded["w"].tolist() == [1, 2, 3, 4, 5, 6]


def test_null_metadata_is_empty(tmp_path: Path) -> None:
    header = {"__metadata__": None, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    path = _raw_file(tmp_path / "nullmeta.safetensors", header, b"\x05")
    assert read_safetensors(path)[1] == {}


_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        st.tuples(st.sampled_from(ALL_DTYPES), _shapes, st.integers(0, 2**31)),
        max_size=5,
    ),
    metadata=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
)
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, specs, metadata) -> None:
    tensors = {key: _random_tensor(dtype, shape, seed) for key, ((_, dtype), shape, seed) in specs.items()}
    path = tmp_path_factory.mktemp("prop") / "p.safetensors"
    write_safetensors(path, tensors, metadata)
    loaded, got_metadata = read_safetensors(path)
    assert got_metadata == metadata
    assert set(loaded) == set(tensors)
    for key, expected in tensors.items():
        assert_bit_equal(loaded[key], expected)


# ---------------------------------------------------------------------------- interop

safetensors_torch = pytest.importorskip("safetensors.torch")


def _interop_tensors() -> dict[str, torch.Tensor]:
    tensors = {
        f"t_{name}": _random_tensor(dtype, (2, 3), seed=i) for i, (name, dtype) in enumerate(ALL_DTYPES)
    }
    tensors["scalar"] = torch.tensor(3.25)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    return tensors


def test_reads_files_written_by_reference(tmp_path: Path) -> None:
    tensors = _interop_tensors()
    metadata = {"format": "pt", "step": "100"}
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata=metadata)
    loaded, got_metadata = read_safetensors(path)
    assert got_metadata == metadata
    reference = safetensors_torch.load_file(str(path))
    assert set(loaded) == set(tensors) == set(reference)
    for key, expected in tensors.items():
        assert_bit_equal(loaded[key], expected)
        assert_bit_equal(loaded[key], reference[key])


def test_reference_reads_files_we_write(tmp_path: Path) -> None:
    tensors = _interop_tensors()
    tensors["noncontig"] = torch.arange(20, dtype=torch.int64).reshape(4, 5).t()
    metadata = {"format": "pt", "who": "ckptvcs"}
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors, metadata)
    loaded = safetensors_torch.load_file(str(path))
    assert set(loaded) == set(tensors)
    for key, expected in tensors.items():
        assert_bit_equal(loaded[key], expected)
    with safetensors_torch.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata


def test_reference_byte_identical_layout(tmp_path: Path) -> None:
    # Same dtype per tensor leaves no room for ordering differences: files must match.
    tensors = {"b": torch.arange(4, dtype=torch.float32), "a": torch.ones(2, 2, dtype=torch.float32)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, {"k": "v"})
    safetensors_torch.save_file(tensors, str(theirs), metadata={"k": "v"})
    assert ours.read_bytes() == theirs.read_bytes()


# ---------------------------------------------------------------------------- bad files

_W = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def _expect_invalid(path: Path, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert path.name in message
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "case,header,data,fragment",
    [
        ("not_json", b"{not json", b"", "not valid JSON"),
        ("not_utf8", b'{"\xff": 1}', b"", "not valid UTF-8"),
        ("not_object", [1, 2], b"", "expected an object"),
        ("duplicate", b'{"w": {}, "w": {}}', b"", "duplicate key 'w'"),
        ("unknown_dtype", {"w": {**_W, "dtype": "F128"}}, bytes(16), "unknown dtype 'F128'"),
        ("dtype_not_str", {"w": {**_W, "dtype": 5}}, bytes(16), "unknown dtype 5"),
        ("missing_field", {"w": {"dtype": "F32", "shape": [4]}}, bytes(16), "lacks ['data_offsets']"),
        ("extra_field", {"w": {**_W, "x": 1}}, bytes(16), "unknown fields ['x']"),
        ("entry_not_object", {"w": [1]}, bytes(16), "entry is not an object"),
        ("negative_dim", {"w": {**_W, "shape": [-2, -2]}}, bytes(16), "not a list of non-negative integers"),
        ("float_dim", {"w": {**_W, "shape": [2.0, 2]}}, bytes(16), "not a list of non-negative integers"),
        ("bool_dim", {"w": {**_W, "shape": [True]}}, bytes(16), "not a list of non-negative integers"),
        ("shape_not_list", {"w": {**_W, "shape": 4}}, bytes(16), "not a list of non-negative integers"),
        ("huge_shape", {"w": {**_W, "shape": [2**40, 2**40]}}, bytes(16), "is too large"),
        ("offsets_three", {"w": {**_W, "data_offsets": [0, 8, 16]}}, bytes(16), "are not two integers"),
        ("offsets_past_end", {"w": _W}, bytes(12), "outside the 12-byte data buffer"),
        ("offsets_negative", {"w": {**_W, "data_offsets": [-4, 12]}}, bytes(16), "outside the 16-byte"),
        ("offsets_reversed", {"w": {**_W, "data_offsets": [16, 0]}}, bytes(16), "end before they begin"),
        (
            "offsets_mismatch",
            {"w": {**_W, "data_offsets": [0, 12]}},
            bytes(16),
            "tensor 'w' data_offsets [0, 12] do not match shape [2, 2] of F32 (16 bytes)",
        ),
        (
            "overlap",
            {"a": {**_W, "data_offsets": [0, 16]}, "b": {**_W, "data_offsets": [8, 24]}},
            bytes(24),
            "tensors 'a' [0, 16] and 'b' [8, 24] overlap",
        ),
        (
            "overlap_contained",
            {
                "a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
                "c": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]},
            },
            bytes(10),
            "tensors 'a' [0, 10] and 'b' [2, 4] overlap",
        ),
        ("metadata_not_dict", {"__metadata__": ["x"]}, b"", "__metadata__ must be an object"),
        ("metadata_int_value", {"__metadata__": {"step": 5}}, b"", "__metadata__ value for 'step' is int"),
        ("metadata_nested", {"__metadata__": {"a": {"b": "c"}}}, b"", "__metadata__ value for 'a' is dict"),
        ("bool_bytes", {"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02", "BOOL"),
    ],
)
def test_rejects_malformed_header(
    tmp_path: Path, case: str, header: object, data: bytes, fragment: str
) -> None:
    path = _raw_file(tmp_path / f"{case}.safetensors", header, data)
    _expect_invalid(path, fragment)


def test_rejects_short_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    _expect_invalid(path, "too short")
    path.write_bytes(b"")
    _expect_invalid(path, "is 0 bytes")


def test_rejects_huge_header_length(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "huge.safetensors", b"{}", header_len=2**63)
    _expect_invalid(path, "exceeds the 100000000-byte limit")


def test_rejects_header_past_end_of_file(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "trunc_header.safetensors", b'{"w": ', header_len=4096)
    _expect_invalid(path, "runs past the end")


def test_rejects_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "trunc.safetensors"
    write_safetensors(path, {"w": torch.ones(4, 4), "v": torch.ones(3)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    _expect_invalid(path, "data buffer (file truncated?)")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    _expect_invalid(missing, "No such file or directory")
    directory = tmp_path / "dir.safetensors"
    directory.mkdir()
    _expect_invalid(directory, "cannot read")


def test_error_message_example(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "model.safetensors", {"w": {**_W, "data_offsets": [0, 12]}}, bytes(16))
    with pytest.raises(InvalidInputError) as info:
        read_safetensors(path)
    assert str(info.value) == (
        f"{path}: tensor 'w' data_offsets [0, 12] do not match shape [2, 2] of F32 (16 bytes)"
    )
    assert info.value.exit_code == 9


# ---------------------------------------------------------------------------- bad writes


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, still constructible
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    "make_tensors,fragment",
    [
        (
            lambda: {"ok": torch.ones(2), "c": torch.ones(2, dtype=torch.complex128)},
            "tensor 'c' has dtype torch.complex128",
        ),
        (lambda: {"q": _quantized()}, "tensor 'q' has dtype torch.qint8"),
        (lambda: {"ok": torch.ones(2), "lst": [1.0, 2.0]}, "value for 'lst' is list, not a tensor"),
        (lambda: {"n": 3}, "value for 'n' is int, not a tensor"),
        (lambda: {1: torch.ones(2)}, "tensor key 1 is int, expected a string"),
        (lambda: {"__metadata__": torch.ones(2)}, "is reserved"),
        (lambda: {"s": torch.ones(2).to_sparse()}, "tensor 's' has layout torch.sparse_coo"),
        (lambda: {"m": torch.empty(2, device="meta")}, "tensor 'm' is on the meta device"),
    ],
    ids=["complex128", "qint8", "list", "int", "int_key", "reserved_key", "sparse", "meta"],
)
def test_write_rejects_bad_values(tmp_path: Path, make_tensors, fragment: str) -> None:
    path = tmp_path / "out.safetensors"
    with pytest.raises(InvalidInputError) as info:
        write_safetensors(path, make_tensors())
    assert fragment in str(info.value)
    assert path.name in str(info.value)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "metadata,fragment",
    [
        ({"step": 5}, "metadata entry 'step': 5"),
        ({1: "x"}, "metadata entry 1"),
        (["a"], "expected a mapping"),
    ],
)
def test_write_rejects_bad_metadata(tmp_path: Path, metadata: object, fragment: str) -> None:
    path = tmp_path / "out.safetensors"
    with pytest.raises(InvalidInputError) as info:
        write_safetensors(path, {"w": torch.ones(1)}, metadata)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptvcs.safetensors_file as module

    path = tmp_path / "keep.safetensors"
    write_safetensors(path, {"w": torch.arange(3)})
    before = path.read_bytes()
    real = module._tensor_bytes
    calls = []

    def failing(tensor: torch.Tensor) -> memoryview:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(module, "_tensor_bytes", failing)
    with pytest.raises(StorageError, match="No space left on device"):
        write_safetensors(path, {"a": torch.ones(3), "b": torch.ones(3)})
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == ["keep.safetensors"]


def test_write_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot create temporary file"):
        write_safetensors(tmp_path / "nope" / "x.safetensors", {"w": torch.ones(1)})


def test_written_file_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "perm.safetensors"
        write_safetensors(path, {"w": torch.ones(1)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644

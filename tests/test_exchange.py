"""Files that leave the store must work elsewhere (issue 10, points 4-6).

An exported ``.pt`` loads with a plain ``torch.load`` in a fresh process and commits
back; a Hugging Face ``rng_state.pth`` (numpy RNG state) commits; safetensors exports
keep the committed file's metadata (``format: pt`` by default), can hold one subtree,
write tied weights once and carry every fp8 dtype the store holds; an export into a
missing directory is one line; every export is fsynced and renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptvcs._fs as fs
from ckptvcs import Repo
from ckptvcs.cli import cli
from ckptvcs.exchange import export_state, read_state_file
from ckptvcs.rng import capture_rng
from ckptvcs.safetensors_file import read_safetensors, write_safetensors
from helpers import assert_array_identical, assert_tensor_identical


def ckptvcs(store: Path, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, ["--repo", str(store), *args], env={"CKPTVCS_AUTHOR": "T <t@x>", "NO_COLOR": "1"})
    return result.exit_code, result.stdout, result.stderr


def training_state() -> dict:
    """A CheckpointManager-like state: a model with tied weights, RNG streams, numpy values."""
    emb = torch.randn(10, 4)
    model = OrderedDict([("encoder.layer.0.weight", torch.randn(3, 3)), ("embed.weight", emb), ("lm_head.weight", emb)])
    model._metadata = OrderedDict({"": {"version": 1}})
    return {
        "model": model,
        "rng": capture_rng(),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "metrics": {"loss": np.float32(1.25), "count": np.int64(7), "ok": np.bool_(True)},
        "step": 3,
    }


@pytest.fixture
def committed(tmp_path: Path) -> tuple[Path, dict]:
    state = training_state()
    with Repo.init(tmp_path / "store") as repo:
        repo.commit(state, "train", code_version=None)
    return tmp_path / "store", state


def test_exported_pt_loads_with_plain_torch_load_in_a_fresh_process_and_commits_back(committed, tmp_path: Path) -> None:
    store, state = committed
    out = tmp_path / "out.pt"
    code, _, err = ckptvcs(store, "export", "HEAD", str(out))
    assert code == 0, err
    probe = ("import sys, torch; s = torch.load(sys.argv[1]); "  # the default: weights_only=True
             "print(type(s['big_endian']).__name__, type(s['metrics']['loss']).__name__)")
    done = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Tensor", "float"]

    code, _, err = ckptvcs(store, "commit", str(out), "-m", "back")
    assert code == 0, err
    with Repo.open(store) as repo:
        back = repo.load()
    # Documented conversions: arrays -> tensors (same dtype, shape, values), scalars -> Python.
    assert back["big_endian"].dtype == torch.int32 and back["big_endian"].tolist() == state["big_endian"].tolist()
    assert back["metrics"] == {"loss": 1.25, "count": 7, "ok": True}
    assert type(back["metrics"]["count"]) is int
    numpy_rng = back["rng"]["numpy"]
    assert numpy_rng[0] == "MT19937" and numpy_rng[1].dtype == torch.uint32
    assert np.array_equal(numpy_rng[1].numpy(), state["rng"]["numpy"][1])
    assert back["rng"]["python"] == state["rng"]["python"]
    for name, tensor in state["model"].items():
        assert_tensor_identical(back["model"][name], tensor)
    assert back["model"]._metadata == state["model"]._metadata
    assert back["model"]["lm_head.weight"].data_ptr() == back["model"]["embed.weight"].data_ptr()  # still tied


def test_hugging_face_rng_state_pth_commits_with_its_numpy_values(tmp_path: Path) -> None:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state(),
           "metric": np.float64(0.5)}
    torch.save(rng, tmp_path / "rng_state.pth")
    state, _ = read_state_file(tmp_path / "rng_state.pth")
    assert_array_identical(state["numpy"][1], rng["numpy"][1])
    with Repo.init(tmp_path / "store") as repo:
        repo.commit(state, "rng", code_version=None)
        back = repo.load()
    assert_array_identical(back["numpy"][1], rng["numpy"][1])
    assert back["numpy"][2:] == rng["numpy"][2:] and back["metric"] == np.float64(0.5)
    assert isinstance(back["metric"], np.float64)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_numpy_allow_list_lets_no_object_through(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    torch.save({"x": np.array([_Evil(marker)], dtype=object)}, tmp_path / "evil.pt")
    code, _, err = ckptvcs(tmp_path / "none", "commit", str(tmp_path / "evil.pt"))
    assert code != 0 and not marker.exists()
    with pytest.raises(Exception, match="never unpickles"):
        read_state_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pt_export_refuses_a_numpy_dtype_torch_cannot_hold(tmp_path: Path) -> None:
    from ckptvcs.errors import UnsupportedValueError

    with pytest.raises(UnsupportedValueError, match="a/b"):
        export_state({"a": {"b": np.zeros(2, dtype=np.longdouble)}}, tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def test_safetensors_export_keeps_the_committed_files_metadata(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "in.safetensors"), metadata={"format": "pt", "origin": "hub"})
    store = tmp_path / "store"
    Repo.init(store).close()
    assert ckptvcs(store, "commit", str(tmp_path / "in.safetensors"))[0] == 0
    assert ckptvcs(store, "export", "HEAD", str(tmp_path / "out.safetensors"))[0] == 0
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["origin"] == "hub" and len(metadata["ckptvcs.commit"]) == 64


def test_safetensors_export_writes_format_pt_by_default(committed, tmp_path: Path) -> None:
    store, _ = committed
    assert ckptvcs(store, "checkout", "HEAD", "-o", str(tmp_path / "o.safetensors"))[0] == 0
    assert read_safetensors(tmp_path / "o.safetensors")[1]["format"] == "pt"
    export_state({"w": torch.ones(1)}, tmp_path / "plain.safetensors")
    assert read_safetensors(tmp_path / "plain.safetensors")[1] == {"format": "pt"}


def test_export_of_a_subtree_names_tensors_as_the_model_does_and_writes_tied_weights_once(committed, tmp_path: Path) -> None:
    store, state = committed
    out = tmp_path / "model.safetensors"
    code, _, err = ckptvcs(store, "export", "HEAD", str(out), "--key", "model")
    assert code == 0, err
    assert "lm_head.weight (= embed.weight)" in err
    tensors = load_file(str(out))
    assert sorted(tensors) == ["embed.weight", "encoder.layer.0.weight"]
    assert_tensor_identical(tensors["embed.weight"], state["model"]["lm_head.weight"])
    code, _, err = ckptvcs(store, "checkout", "HEAD", "-o", str(tmp_path / "m.pt"), "--key", "model")
    assert code == 0, err
    assert list(torch.load(tmp_path / "m.pt")) == list(state["model"])
    code, _, err = ckptvcs(store, "export", "HEAD", str(out), "--key", "nosuch")
    assert code == 5 and err.startswith("error: ") and "nosuch" in err


def test_overlapping_views_are_not_mistaken_for_tied_weights(tmp_path: Path) -> None:
    fused = torch.arange(12.0).reshape(3, 4)
    result = export_state({"q": fused[0], "k": fused[1], "all": fused}, tmp_path / "v.safetensors")
    assert result.tied == {}
    assert sorted(read_safetensors(tmp_path / "v.safetensors")[0]) == ["all", "k", "q"]


FP8 = [("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0")]


@pytest.mark.parametrize(("dtype_name", "code"), FP8)
def test_every_stored_fp8_dtype_round_trips_through_safetensors(tmp_path: Path, dtype_name: str, code: str) -> None:
    t = torch.arange(16, dtype=torch.uint8).view(getattr(torch, dtype_name))
    path = tmp_path / "f8.safetensors"
    write_safetensors(path, {"t": t})
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["t"]["dtype"] == code
    assert_tensor_identical(read_safetensors(path)[0]["t"], t)


@pytest.mark.parametrize(("dtype_name", "code"), FP8[:2])
def test_fnuz_fp8_interoperates_with_the_reference_library(tmp_path: Path, dtype_name: str, code: str) -> None:
    t = torch.arange(16, dtype=torch.uint8).view(getattr(torch, dtype_name))
    write_safetensors(tmp_path / "ours.safetensors", {"t": t})
    assert_tensor_identical(load_file(str(tmp_path / "ours.safetensors"))["t"], t)
    save_file({"t": t}, str(tmp_path / "theirs.safetensors"))
    assert_tensor_identical(read_safetensors(tmp_path / "theirs.safetensors")[0]["t"], t)


@pytest.mark.parametrize("command", [["export", "HEAD"], ["checkout", "HEAD", "-o"]])
@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_export_into_a_missing_directory_is_one_line(committed, tmp_path: Path, command: list[str], name: str) -> None:
    store, _ = committed
    target = tmp_path / "missing" / name
    code, out, err = ckptvcs(store, *command, str(target))
    assert code == 9, (code, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert not target.parent.exists()


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_every_export_fsyncs_the_file_and_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    synced: list[str] = []
    real = fs._fsync

    def recording(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(fs, "_fsync", recording)
    export_state({"w": torch.ones(3), "n": np.ones(2)}, tmp_path / name)
    assert synced.index("file") < len(synced) - 1 - synced[::-1].index("dir"), synced  # file, then its directory
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_a_failed_fsync_fails_the_export_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    from ckptvcs.errors import StorageError

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs, "_fsync", failing)
    with pytest.raises(StorageError):
        export_state({"w": torch.ones(3)}, tmp_path / name)
    assert os.listdir(tmp_path) == []

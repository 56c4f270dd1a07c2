"""Bad input: hostile or broken checkpoint files, bad names and revisions, foreign
folders, and fuzzed objects, packs, refs and configs. Each gives one clear, typed
error line (a non-zero exit at the CLI) and writes nothing."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ckptvcs import CkptvcsError, CorruptObjectError, InvalidInputError, Repo
from ckptvcs.cli import cli
from ckptvcs.exchange import read_state_file
from ckptvcs.pack import iter_pack_entries
from ckptvcs.refs import Refs
from helpers import store_snapshot


class _Planted:
    """Unpickling this would create ``marker`` (a stand-in for running arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with Repo.init(root, chunk_size=4096) as repo:
        repo.commit({"w": torch.randn(2000)}, "base", code_version=None)
    return root


def _commit_cli(store: Path, file: Path, *extra: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--repo", str(store), "commit", str(file), *extra])


def _assert_one_line_error(result, code: int) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


# -- hostile and broken checkpoint files ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "bare pickle"])
def test_pickle_carrying_an_object_is_refused_and_never_executed(tmp_path: Path, store: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.ones(3), "hook": _Planted(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(InvalidInputError):
        read_state_file(path)
    before = store_snapshot(store)
    line = _assert_one_line_error(_commit_cli(store, path, "-m", "evil"), 9)
    assert "evil.pt" in line
    assert not marker.exists()  # the pickle's code never ran
    assert store_snapshot(store) == before


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["truncated-half", "truncated-tail", "random-bytes", "empty", "zip-without-data"])
def test_corrupt_pt_file(tmp_path: Path, store: Path, damage: str) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(5000)}, path)
    if damage == "truncated-half":
        _truncate(path, 0.5)
    elif damage == "truncated-tail":
        _truncate(path, 0.98)
    elif damage == "random-bytes":
        path.write_bytes(bytes(range(256)) * 40)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"not a pickle")
    before = store_snapshot(store)
    with pytest.raises(InvalidInputError, match="model.pt"):
        read_state_file(path)
    _assert_one_line_error(_commit_cli(store, path), 9)
    assert store_snapshot(store) == before


@pytest.mark.parametrize("damage", ["truncated", "bad-header-length", "header-not-json", "offsets-past-end"])
def test_corrupt_safetensors_file(tmp_path: Path, store: Path, damage: str) -> None:
    from ckptvcs.safetensors_file import write_safetensors

    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": torch.randn(1000)})
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "bad-header-length":
        data[:8] = (10**12).to_bytes(8, "little")
    elif damage == "header-not-json":
        data[8:12] = b"\xff\xfe\x00]"
    else:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        header["w"]["data_offsets"] = [0, 10**9]
        text = json.dumps(header).encode().ljust(header_len)
        data[8 : 8 + header_len] = text[:header_len]
    path.write_bytes(bytes(data))
    before = store_snapshot(store)
    _assert_one_line_error(_commit_cli(store, path), 9)
    assert store_snapshot(store) == before


# -- names, revisions, folders, versions at the command line ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["branch", "a..b"], 6, "invalid branch name"),
        (["branch", "--", "-bad"], 6, "invalid branch name"),
        (["tag", "v1.lock"], 6, "invalid tag name"),
        (["show", "no-such-rev"], 5, "unknown revision"),
        (["log", "HEAD~9"], 5, "not that deep"),
        (["checkout", "deadbeef"], 5, "unknown revision"),
        (["diff", "HEAD", "ffffffffffff"], 5, "unknown revision"),
    ],
)
def test_cli_bad_names_and_revisions(store: Path, args: list[str], code: int, fragment: str) -> None:
    before = store_snapshot(store)
    line = _assert_one_line_error(CliRunner().invoke(cli, ["--repo", str(store), *args]), code)
    assert fragment in line
    assert store_snapshot(store) == before


def test_cli_not_a_repository_and_newer_format(tmp_path: Path, store: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for command in (["log"], ["fsck"], ["repair", "index"]):
        line = _assert_one_line_error(CliRunner().invoke(cli, ["--repo", str(plain), *command]), 3)
        assert "not a ckptvcs repository" in line
    assert list(plain.iterdir()) == []
    config = json.loads((store / "config.json").read_text())
    config["version"] = 2
    (store / "config.json").write_text(json.dumps(config))
    before = store_snapshot(store)
    for command in (["log"], ["fsck"], ["repair", "index"]):
        line = _assert_one_line_error(CliRunner().invoke(cli, ["--repo", str(store), *command]), 4)
        assert "newer than this ckptvcs supports" in line
    assert store_snapshot(store) == before


# -- fuzzed parsers ------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
_node_keys = st.sampled_from(["tensor", "ndarray", "dict", "odict", "list", "tuple", "float", "bytes", "bytes_blob",
                              "npscalar", "dtype", "device", "size", "blob", "shape", "stride", "offset", "nbytes",
                              "chunks", "root", "blobs", "items", "meta"])
_manifest_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70_000) | st.text(max_size=6) | st.sampled_from(["float32", "<f4", "int8"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_node_keys, inner, max_size=3),
    max_leaves=30,
)


def _paths(value, path=()):  # type: ignore[no-untyped-def]
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _replace_at(value, path, new):  # type: ignore[no-untyped-def]
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace_at(value[path[0]], path[1:], new)
    return copy


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "store"
    with Repo.init(root, chunk_size=4096) as repo:
        repo.commit({"model": {"w": torch.randn(3000), "t": (torch.arange(6).view(2, 3).t(), 1.5, b"x")},
                     "np": __import__("numpy").arange(5)}, "base", code_version=None)
    return root


@given(data=st.data())
def test_fuzzed_manifests_and_commits_fail_cleanly(fuzz_store: Path, data: st.DataObject) -> None:
    with Repo.open(fuzz_store) as repo:
        head = repo.resolve("HEAD")
        commit_body = repo.objects.get(head, "commit")[1]
        manifest_body = repo.objects.get(commit_body["manifest"], "manifest")[1]
        target = data.draw(st.sampled_from(["manifest", "commit"]))
        body = manifest_body if target == "manifest" else commit_body
        path = data.draw(st.sampled_from(list(_paths(body))))
        mutated = _replace_at(body, path, data.draw(_manifest_like if target == "manifest" else _json))
        # Write the malformed object with a valid id (so only parsing can catch it) and a
        # commit naming it, then read it through every public path.
        if target == "manifest":
            oid = repo.objects.put("manifest", mutated)
            commit_id = repo.objects.put("commit", {**commit_body, "manifest": oid})
        else:
            commit_id = repo.objects.put("commit", mutated)
        before = store_snapshot(fuzz_store)
        for call in (lambda: repo.show(commit_id), lambda: repo.load(commit_id), lambda: repo.log(commit_id),
                     lambda: repo.diff(head, commit_id)):
            try:
                call()
            except CkptvcsError:
                pass  # a typed error is the only acceptable failure
        assert store_snapshot(fuzz_store) == before


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("tensor", "dtype"), []),  # was: TypeError (unhashable) in the decoder
        (("tensor", "shape"), None),  # was: TypeError in diff and show
        (("tensor", "blob"), [0]),  # was: TypeError in blob_kinds
        (("tensor",), None),  # was: AttributeError in load
        (("tensor", "blob"), 7),  # was: IndexError in diff
    ],
    ids=["dtype-list", "shape-none", "blob-list", "body-none", "blob-out-of-range"],
)
def test_malformed_tensor_nodes_found_by_fuzzing(tmp_path: Path, path: tuple, value: object) -> None:
    """Regressions the fuzzer above found: each used to escape as a raw Python error."""
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        good = repo.commit({"w": torch.randn(100)}, code_version=None)
        body = repo.objects.get(repo.show(good).manifest, "manifest")[1]
        node = body["root"]["dict"][0][1]
        body["root"]["dict"][0][1] = _replace_at(node, path, value)
        bad = repo.objects.put("commit", {**repo.objects.get(good, "commit")[1],
                                          "manifest": repo.objects.put("manifest", body)})
        with pytest.raises(CorruptObjectError):
            repo.load(bad)
        try:
            repo.diff(good, bad)  # may describe the change without decoding anything
        except CorruptObjectError:
            pass
        result = CliRunner().invoke(cli, ["--repo", str(repo.root), "show", bad, "--tensors"])
        assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


@given(blob=st.binary(max_size=600))
def test_fuzzed_object_files_fail_cleanly(fuzz_store: Path, blob: bytes) -> None:
    with Repo.open(fuzz_store) as repo:
        oid = "ab" * 32
        path = repo.objects.path(oid)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)
        try:
            with pytest.raises(CkptvcsError):
                repo.show(oid)
            with pytest.raises(CkptvcsError):
                repo.objects.get(oid)
        finally:
            path.unlink()


@given(tail=st.binary(max_size=400), cut=st.integers(0, 2000))
def test_fuzzed_pack_files_fail_cleanly(tmp_path_factory: pytest.TempPathFactory, fuzz_store: Path,
                                        tail: bytes, cut: int) -> None:
    real = next((fuzz_store / "packs").glob("*.pack")).read_bytes()
    path = tmp_path_factory.mktemp("pack") / ("0" * 32 + ".pack")
    path.write_bytes(real[:cut] + tail)
    for strict in (True, False):
        try:
            entries = list(iter_pack_entries(path, strict=strict))
        except CorruptObjectError:
            assert strict
            continue
        assert all(e.offset + e.stored_len <= len(real[:cut] + tail) for e in entries)


@given(text=st.text(max_size=120))
def test_fuzzed_ref_and_reflog_files(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    root = tmp_path_factory.mktemp("refs")
    (root / "refs" / "heads").mkdir(parents=True)
    (root / "logs" / "refs" / "heads").mkdir(parents=True)
    (root / "refs" / "heads" / "x").write_text(text)
    (root / "logs" / "refs" / "heads" / "x").write_text(text)
    refs = Refs(root)
    try:
        value = refs.read_raw("refs/heads/x")
        assert value is None or value.startswith("ref: ") or len(value) == 64
    except CorruptObjectError:
        pass
    for entry in refs.reflog("refs/heads/x"):
        assert len(entry.old) == len(entry.new) == 64


@given(config=_json)
def test_fuzzed_config_is_refused_cleanly(tmp_path_factory: pytest.TempPathFactory, config: object) -> None:
    root = tmp_path_factory.mktemp("cfg")
    Repo.init(root / "r").close()
    real = json.loads((root / "r" / "config.json").read_text())
    if isinstance(config, dict):
        config = {**real, **config}
    (root / "r" / "config.json").write_text(json.dumps(config))
    try:
        Repo.open(root / "r").close()
    except CkptvcsError:
        pass

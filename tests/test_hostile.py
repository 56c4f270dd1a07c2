"""A repository is untrusted input: symlinks, FIFOs, devices, bombs, deep nesting and
crafted sizes in one must give one typed error line, in bounded time and memory, and
never a write (or a delete) outside the repository; a read-only copy must be readable.

Commands that could hang or balloon run in a child process (``_CHILD``) with a
generous timeout that only catches hangs, an address-space limit as a safety net, and
their peak RSS measured against a clean run of the same commands. Every repository
sits in a sandbox next to sentinel files that are compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import blake3
import lmdb
import pytest
import torch
import zstandard
from click.testing import CliRunner

from ckptvcs import CorruptObjectError, Repo, StorageError, UnsupportedValueError
from ckptvcs.cli import cli
from ckptvcs.objects import canonical_json

_HANG_TIMEOUT = 120  # seconds: only a hang gets near it
_AS_LIMIT = 6 << 30  # address-space safety net for the child (torch alone maps ~0.7 GB)

# Runs CLI commands in one process and prints, as JSON, each one's exit code and output
# and the process's peak RSS. argv: a JSON list of argument lists.
_CHILD = r"""
import json, resource, sys
from click.testing import CliRunner
from ckptvcs.cli import cli
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(cli, args)
    results.append({"args": args, "code": result.exit_code, "output": result.output,
                    "exception": None if result.exception is None or isinstance(result.exception, SystemExit)
                    else repr(result.exception)[:300]})
print(json.dumps({"results": results, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_AS_LIMIT, _AS_LIMIT))


def run_child(commands: list[list[str]], *, prefix: list[str] | None = None) -> tuple[list[dict], int]:
    """Run CLI ``commands`` in a fresh process; ``(results, peak RSS in bytes)``."""
    argv = [*(prefix or []), sys.executable, "-c", _CHILD, json.dumps(commands)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=_HANG_TIMEOUT, preexec_fn=_limit_memory,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    return outcome["results"], outcome["maxrss"]


def assert_one_line_error(result: dict) -> str:
    """A non-zero exit ending in exactly one ``error: ...`` line, and no traceback (what
    the command printed before it met the damage, fsck's findings say, may precede it)."""
    assert result["exception"] is None, result
    assert result["code"] not in (0, None), result
    assert "Traceback" not in result["output"], result
    lines = result["output"].strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result
    assert sum(line.startswith("error: ") for line in lines) == 1, result
    return lines[-1]


# -- the sandbox ----------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, and size and content digest of files."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(info.st_mode):
                found[rel] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            else:
                found[rel] = ("dir" if stat.S_ISDIR(info.st_mode) else "special",)
    return found


class Sandbox:
    """``<tmp>/sandbox``: a project folder holding ``.ckptvcs``, next to sentinels."""

    def __init__(self, base: Path) -> None:
        self.base = base / "sandbox"
        self.project = self.base / "project"
        self.store = self.project / ".ckptvcs"
        self.outside = self.base / "outside"
        self.secret = self.base / "secret.txt"
        self.outside.mkdir(parents=True)
        (self.outside / "keep.txt").write_text("outside data\n")
        self.secret.write_text("TOPSECRET-password-1234\n")
        self.project.mkdir()
        (self.project / "train.py").write_text("print('the user's code')\n")
        (self.project / "notes.txt").write_text("the user's notes\n")

    def outside_tree(self) -> dict[str, tuple]:
        return {k: v for k, v in _tree(self.base).items() if not k.startswith("project/.ckptvcs")}


def _state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3000, generator=gen), "b": torch.randn(40, generator=gen), "step": seed}


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    sandbox = Sandbox(tmp_path)
    with Repo.init(sandbox.store, chunk_size=4096) as repo:
        repo.commit(_state(0), "first", code_version=None)
        repo.commit(_state(1), "second", code_version=None)
    return sandbox


def _cli(store: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["--repo", str(store), *args])
    return {"code": result.exit_code, "output": result.output,
            "exception": None if result.exception is None or isinstance(result.exception, SystemExit)
            else repr(result.exception)}


# -- 5. symbolic links and ref names never lead out of the repository ------------------------------------


def test_gc_with_tmp_linked_to_the_project_deletes_nothing_outside(box: Sandbox) -> None:
    tmp = box.store / "tmp"
    shutil.rmtree(tmp)
    tmp.symlink_to("..")  # .ckptvcs/tmp -> the user's project folder
    before = box.outside_tree()
    for args in (["gc"], ["gc", "--dry-run"]):
        line = assert_one_line_error(_cli(box.store, *args))
        assert "symbolic link" in line
    assert box.outside_tree() == before
    with pytest.raises(CorruptObjectError, match="symbolic link"):
        Repo.open(box.store)


def test_gc_never_follows_links_inside_tmp(box: Sandbox) -> None:
    """Leftovers are the regular files directly in tmp/: a link there is not followed."""
    (box.store / "tmp" / "leftover.tmp").write_bytes(b"x" * 100)
    (box.store / "tmp" / "link.tmp").symlink_to(box.outside / "keep.txt")
    before = box.outside_tree()
    with Repo.open(box.store) as repo:
        report = repo.gc()
    assert report.tmp_files_removed == 1
    assert box.outside_tree() == before
    assert not (box.store / "tmp" / "leftover.tmp").exists()


@pytest.mark.parametrize("target", ["../../x", "ABSOLUTE", "refs/heads/../../../x", "refs/heads/a b", "HEAD"])
def test_head_pointing_outside_refs_is_refused(box: Sandbox, target: str) -> None:
    if target == "ABSOLUTE":
        target = str(box.outside / "branch")
    (box.store / "HEAD").write_text(f"ref: {target}\n")
    before = box.outside_tree()
    with Repo.open(box.store) as repo, pytest.raises(CorruptObjectError, match="HEAD is damaged"):
        repo.commit(_state(5), "escape?", code_version=None)
    for args in (["log"], ["show"]):
        assert_one_line_error(_cli(box.store, *args))
    assert box.outside_tree() == before


@pytest.mark.parametrize("entry", ["refs", "logs", "lock", "refs/heads", "objects"])
def test_linked_folders_and_lock_never_make_a_commit_write_outside(box: Sandbox, entry: str) -> None:
    path = box.store / entry
    away = box.outside / "moved"
    shutil.move(str(path), str(away))
    path.symlink_to(away)
    pt = box.base / "state.pt"
    torch.save(_state(7), pt)
    before = box.outside_tree()
    line = assert_one_line_error(_cli(box.store, "commit", str(pt), "-m", "escape?"))
    assert "symbolic link" in line or "not a folder" in line
    assert box.outside_tree() == before


def test_branch_folder_linked_outside_is_not_written(box: Sandbox) -> None:
    """A link deeper down (refs/heads/team -> outside) stops a commit to team/x."""
    (box.store / "refs" / "heads" / "team").symlink_to(box.outside)
    (box.store / "logs" / "refs" / "heads" / "team").symlink_to(box.outside)
    before = box.outside_tree()
    with Repo.open(box.store) as repo:
        with pytest.raises(CorruptObjectError, match="not a folder"):
            repo.commit(_state(8), branch="team/x", code_version=None)
        with pytest.raises(CorruptObjectError, match="not a folder"):
            repo.branch("team/y")
    assert box.outside_tree() == before


def test_a_ref_linked_to_a_secret_never_prints_it(box: Sandbox) -> None:
    ref = box.store / "refs" / "heads" / "main"
    ref.unlink()
    ref.symlink_to(box.secret)
    for args in (["log"], ["show"], ["branch"], ["fsck"], ["log", "--all"]):
        result = _cli(box.store, *args)
        assert "TOPSECRET" not in result["output"], (args, result)
        assert result["exception"] is None, (args, result)
    assert_one_line_error(_cli(box.store, "log"))


def test_ref_names_from_the_command_line_stay_inside(box: Sandbox) -> None:
    before = box.outside_tree()
    for args in (["reflog", "refs/../../outside/keep.txt"], ["show", "refs/../../secret.txt"],
                 ["reflog", "refs/heads/../../../secret.txt"]):
        result = _cli(box.store, *args)
        assert result["code"] != 0 and "TOPSECRET" not in result["output"] and result["exception"] is None, result
    assert box.outside_tree() == before


# -- 6. FIFOs and devices never hang a reader -----------------------------------------------------------------


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _hostile_copies(box: Sandbox) -> dict[str, Path]:
    """One copy of the store per hostile special file."""
    with Repo.open(box.store) as repo:
        head = repo.resolve("HEAD")
        manifest = repo.show(head).manifest
    pack = next((box.store / "packs").glob("*.pack")).name
    copies: dict[str, Path] = {}
    damage = {
        "ref-fifo": lambda s: _replace_with_fifo(s / "refs" / "heads" / "main"),
        "head-fifo": lambda s: _replace_with_fifo(s / "HEAD"),
        "object-fifo": lambda s: _replace_with_fifo(s / "objects" / head[:2] / head[2:]),
        "manifest-zero": lambda s: _replace_with_link(s / "objects" / manifest[:2] / manifest[2:], "/dev/zero"),
        "pack-fifo": lambda s: _replace_with_fifo(s / "packs" / pack),
        "pack-zero": lambda s: _replace_with_link(s / "packs" / pack, "/dev/zero"),
        "reflog-fifo": lambda s: _replace_with_fifo(s / "logs" / "refs" / "heads" / "main"),
        "index-fifo": lambda s: _replace_with_fifo(s / "index" / "data.mdb"),
        "config-zero": lambda s: _replace_with_link(s / "config.json", "/dev/zero"),
    }
    for name, spoil in damage.items():
        copy = box.base / "copies" / name
        shutil.copytree(box.store, copy, symlinks=True)
        spoil(copy)
        copies[name] = copy
    # a pruned record that is a FIFO
    copy = box.base / "copies" / "pruned-fifo"
    shutil.copytree(box.store, copy, symlinks=True)
    (copy / "pruned").mkdir()
    os.mkfifo(copy / "pruned" / repo_first_commit(copy))
    copies["pruned-fifo"] = copy
    return copies


def repo_first_commit(store: Path) -> str:
    with Repo.open(store) as repo:
        return repo.log()[-1].id


_READERS = [["log"], ["show", "--tensors"], ["fsck"], ["fsck", "--read-data"], ["reflog", "main"], ["stats"],
            ["checkout", "HEAD", "-o", "OUT.pt"], ["gc", "--dry-run"], ["repair", "index"], ["gc"]]


def test_fifos_and_devices_never_hang_and_give_one_line(box: Sandbox) -> None:
    copies = _hostile_copies(box)
    before = box.outside_tree()
    commands = []
    for name, store in copies.items():
        for args in _READERS:
            out = str(box.base / f"out-{name}.pt")
            commands.append(["--repo", str(store), *[out if a == "OUT.pt" else a for a in args]])
    results, _ = run_child(commands)  # a hang fails here, by the timeout
    for result in results:
        assert result["exception"] is None, result
        if result["code"] != 0:
            assert_one_line_error(result)
    failed = {(r["args"][1], r["args"][2]) for r in results if r["code"] != 0}
    for name, store in copies.items():
        expected = {"reflog-fifo": "reflog"}.get(name, "fsck")
        assert (str(store), expected) in failed, name  # the damage is reported, not skipped
        if name == "pruned-fifo":  # log skips a damaged record with a warning; gc refuses to run
            assert (str(store), "gc") in failed, name
        if name in ("ref-fifo", "head-fifo", "object-fifo", "config-zero"):
            assert (str(store), "log") in failed, name
    after = {k: v for k, v in box.outside_tree().items() if not k.startswith(("copies/", "out-"))}
    assert after == {k: v for k, v in before.items() if not k.startswith(("copies/", "out-"))}


# -- 7. bombs: what a reader materialises is bounded by what the repository holds -------------------------------


def _stream_object(store: Path, kind: str, parts: Iterable[bytes], *, declare_size: int | None = None) -> str:
    """Write an object from streamed parts (never all in memory here); returns its id."""
    hasher = blake3.blake3()
    tmp = store / "objects" / "bomb.tmp"
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=declare_size if declare_size is not None else -1)
    with open(tmp, "wb") as f:
        for part in [kind.encode() + b"\n", *parts]:
            hasher.update(part)
            f.write(compressor.compress(part))
        f.write(compressor.flush())
    oid = hasher.hexdigest()
    (store / "objects" / oid[:2]).mkdir(exist_ok=True)
    os.replace(tmp, store / "objects" / oid[:2] / oid[2:])
    return oid


def _repeat(block: bytes, total: int) -> Iterator[bytes]:
    piece = block * ((1 << 20) // len(block))
    while total > 0:
        yield piece[:total]
        total -= len(piece)


def _split(template: dict, placeholder: str) -> tuple[bytes, bytes]:
    text = canonical_json(template)
    head, _, tail = text.partition(json.dumps(placeholder).encode())
    return head, tail


def _set_branch(store: Path, commit_id: str) -> None:
    (store / "refs" / "heads" / "main").write_text(commit_id + "\n")


def _plant_message_bomb(store: Path, size: int) -> None:
    """A commit whose message is ``size`` bytes of one letter (declares its size)."""
    with Repo.open(store) as repo:
        head = repo.resolve("HEAD")
        body = repo.objects.get(head, "commit")[1]
    head_part, tail = _split({**body, "message": "@@", "parents": [head]}, "@@")
    head_part, tail = head_part + b'"', b'"' + tail
    total = len(b"commit\n") + len(head_part) + size + len(tail)
    oid = _stream_object(store, "commit", [head_part, *_repeat(b"a", size), tail], declare_size=total)
    _set_branch(store, oid)


def _plant_list_bomb(store: Path, size: int) -> None:
    """A manifest whose root holds a list of ``size // 2`` zeros (no declared size)."""
    with Repo.open(store) as repo:
        head = repo.resolve("HEAD")
        commit = repo.objects.get(head, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
    root = {"dict": [["w", manifest["root"]["dict"][0][1]], ["bomb", {"list": "@@"}]]}
    head_part, tail = _split({**manifest, "root": root}, "@@")
    parts = [head_part, b"[0", *_repeat(b",0", size), b"]", tail]
    manifest_id = _stream_object(store, "manifest", parts)
    with Repo.open(store) as repo:
        _set_branch(store, repo.objects.put("commit", {**commit, "manifest": manifest_id, "parents": [head]}))


def _plant_stride0_view(store: Path, elements: int) -> None:
    """A tensor of ``elements`` float32 elements, all one stored element (stride 0)."""
    with Repo.open(store) as repo:
        head = repo.resolve("HEAD")
        commit = repo.objects.get(head, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
        node = manifest["root"]["dict"][0][1]["tensor"]
        node.update(shape=[elements], stride=[0], offset=0)
        manifest["root"]["dict"] = [manifest["root"]["dict"][0]]
        manifest_id = repo.objects.put("manifest", manifest)
        _set_branch(store, repo.objects.put("commit", {**commit, "manifest": manifest_id, "parents": [head]}))


_BOMB_READERS = [["log"], ["show"], ["show", "--tensors"], ["fsck"], ["log", "--all"],
                 ["checkout", "main", "-o", "OUT.safetensors"], ["diff", "HEAD~1", "HEAD"]]


def _bomb_commands(store: Path, out: Path) -> list[list[str]]:
    return [["--repo", str(store), *[str(out) if a == "OUT.safetensors" else a for a in args]]
            for args in _BOMB_READERS]


def _bombs(box: Sandbox, size: int) -> None:
    clean = box.base / "clean"
    shutil.copytree(box.store, clean)
    stores = {}
    for name, plant, amount in (("message", _plant_message_bomb, size), ("list", _plant_list_bomb, size),
                                ("stride0", _plant_stride0_view, size // 2)):
        store = box.base / name
        shutil.copytree(box.store, store)
        plant(store, amount)
        stores[name] = store
    assert sum(p.stat().st_size for p in stores["message"].rglob("*") if p.is_file()) < 4 << 20
    _, baseline = run_child(_bomb_commands(clean, box.base / "clean.safetensors"))

    def outside() -> dict[str, tuple]:
        return {k: v for k, v in box.outside_tree().items() if k.split("/")[0] not in (*stores, "clean")}

    before = outside()
    commands = [c for name, store in stores.items() for c in _bomb_commands(store, box.base / f"{name}.safetensors")]
    results, peak = run_child(commands)  # one child for all three: its peak is the largest
    for result in results:
        assert result["exception"] is None, result
        if result["code"] != 0:
            assert_one_line_error(result)
    for store in stores.values():  # each bomb is refused somewhere, not swallowed
        assert any(r["code"] != 0 for r in results if r["args"][1] == str(store)), store
    # Far below the bomb: what the child held beyond a clean run of the same commands.
    assert peak - baseline < size // 4, (peak - baseline, size)
    assert outside() == before


def test_metadata_bombs_are_refused_in_bounded_memory(box: Sandbox) -> None:
    _bombs(box, 256 << 20)


@pytest.mark.slow
def test_gigabyte_metadata_bombs_are_refused_in_bounded_memory(box: Sandbox) -> None:
    _bombs(box, 1 << 30)


def test_objects_a_reader_would_refuse_are_never_written(tmp_path: Path) -> None:
    """The writer applies the reader's bound, so everything committed stays readable."""
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        with pytest.raises(UnsupportedValueError, match="Reader limits"):
            repo.commit({"w": torch.ones(3)}, "x" * (64 << 20), code_version=None)
        cid = repo.commit({"w": torch.ones(3)}, "y" * (4 << 20), config=[0] * 100_000, code_version=None)
        assert repo.show(cid).message == "y" * (4 << 20)
        assert repo.fsck().ok


def _repeat_one_chunk(store: Path, count: int) -> str:
    """A commit whose tensor lists one 4 KiB chunk ``count`` times (written past the writer's bound)."""
    with Repo.open(store) as repo:
        head = repo.resolve("HEAD")
        commit = repo.objects.get(head, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
    blob = manifest["blobs"][0]
    blob.update(nbytes=count * 4096, chunks=[blob["chunks"][0]] * count)
    manifest["root"] = {"dict": [["w", {"tensor": {**manifest["root"]["dict"][0][1]["tensor"],
                                                  "shape": [count * 1024], "stride": [1], "offset": 0, "blob": 0}}]]}
    manifest_id = _stream_object(store, "manifest", [canonical_json(manifest)])
    return _stream_object(store, "commit", [canonical_json({**commit, "manifest": manifest_id, "parents": [head]})])


def test_many_references_to_one_chunk(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """512k references to one chunk (a 34 MB manifest that compresses to a few KB) are
    refused by the expansion bound; below it, a repeated chunk is decoded once, then copied."""
    from helpers import record_chunk_reads

    bomb = _repeat_one_chunk(box.store, 512 << 10)
    few = _repeat_one_chunk(box.store, 3000)
    with Repo.open(box.store) as repo:
        with pytest.raises(CorruptObjectError, match="limit"):
            repo.load(bomb)
        chunk = bytes(repo.load("HEAD")["w"].numpy().view("uint8")[:4096])
        reads = record_chunk_reads(monkeypatch, repo)
        state = repo.load(few)
    assert len(reads) == 1
    assert state["w"].numel() == 3000 * 1024
    assert bytes(state["w"].numpy().view("uint8")[-4096:]) == chunk
    assert bytes(state["w"].numpy().view("uint8")[4096 * 1500:4096 * 1501]) == chunk


def test_chunk_size_outside_the_init_bounds_is_refused(box: Sandbox) -> None:
    config = json.loads((box.store / "config.json").read_text())
    (box.store / "config.json").write_text(json.dumps({**config, "chunk_size": 16}))
    with pytest.raises(CorruptObjectError, match="chunk_size"):
        Repo.open(box.store)


# -- 8. deep nesting, damaged bytes and crafted shapes: typed errors ----------------------------------------------


def _nested(depth: int, leaf: object) -> object:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_deep_states_and_configs_are_refused_at_commit(tmp_path: Path) -> None:
    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        with pytest.raises(UnsupportedValueError, match="nest deeper"):
            repo.commit(_nested(400, torch.ones(2)), code_version=None)
        with pytest.raises(UnsupportedValueError, match="nests deeper"):
            repo.commit({"w": torch.ones(2)}, config=_nested(400, 1), code_version=None)
        with pytest.raises(UnsupportedValueError, match="nested tensors"):
            repo.commit({"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, code_version=None)
        deep = repo.commit(_nested(60, torch.ones(2)), config=_nested(200, 1), code_version=None)
        assert torch.equal(_dig(repo.load(deep), 60), torch.ones(2))
        assert repo.fsck().ok


def test_one_tensor_tied_under_many_keys_loads(tmp_path: Path) -> None:
    """Views count once per distinct layout: 40 keys tying one 16 MiB weight stay loadable."""
    weight = torch.randn(4 << 20)
    with Repo.init(tmp_path / "r") as repo:
        cid = repo.commit({f"layer{i}": weight for i in range(40)}, code_version=None)
        loaded = repo.load(cid)
    assert all(t.untyped_storage().data_ptr() == loaded["layer0"].untyped_storage().data_ptr()
               for t in loaded.values())
    assert torch.equal(loaded["layer39"], weight)


def _dig(value: object, depth: int) -> object:
    for _ in range(depth):
        value = value["a"]  # type: ignore[index]
    return value


def _deep(depth: int, inner: str = "0") -> bytes:
    return (b'{"list":[' * depth) + inner.encode() + (b"]}" * depth)


@pytest.mark.parametrize("depth", [400, 5000])
def test_deeply_nested_stored_objects_give_typed_errors(box: Sandbox, depth: int) -> None:
    with Repo.open(box.store) as repo:
        head = repo.resolve("HEAD")
        commit = repo.objects.get(head, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
    inner = json.dumps(manifest["root"], separators=(",", ":"))
    deep_manifest = json.dumps({**manifest, "root": "@"}).encode().replace(b'"@"', _deep(depth, inner))
    manifest_id = _stream_object(box.store, "manifest", [deep_manifest])
    bad_manifest = _stream_object(box.store, "commit", [json.dumps(
        {**commit, "manifest": manifest_id, "parents": [head]}).encode()])
    bad_config = _stream_object(box.store, "commit", [json.dumps(
        {**commit, "parents": [head], "config": "@"}).encode().replace(b'"@"', b"[" * depth + b"]" * depth)])
    with Repo.open(box.store) as repo:
        for call in (repo.load, lambda c: repo.diff(head, c)):
            for cid in (bad_manifest, bad_config):
                with pytest.raises(CorruptObjectError):
                    call(cid)
        for call in (repo.show, repo.log):
            with pytest.raises(CorruptObjectError):
                call(bad_config)
    for args in (["show", bad_config], ["show", "--tensors", bad_manifest], ["log", bad_config],
                 ["diff", head, bad_manifest], ["checkout", bad_manifest, "-o", str(box.base / "x.pt")]):
        assert_one_line_error(_cli(box.store, *args))
    for cid in (bad_manifest, bad_config):
        _set_branch(box.store, cid)
        result = _cli(box.store, "fsck")
        assert result["exception"] is None and result["code"] != 0 and "Traceback" not in result["output"], result


def test_deep_repository_config_is_a_typed_error(box: Sandbox) -> None:
    (box.store / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(_cli(box.store, "log"))


@pytest.mark.parametrize("ref", ["refs/heads/main", "HEAD"])
def test_a_flipped_high_bit_in_a_ref_is_one_line_everywhere(box: Sandbox, ref: str) -> None:
    path = box.store / ref
    data = bytearray(path.read_bytes())
    data[3] |= 0x80
    path.write_bytes(bytes(data))
    for args in (["log"], ["show"], ["branch"], ["stats"], ["gc", "--dry-run"],
                 ["tag", "v1"], ["reflog"]):
        result = _cli(box.store, *args)
        assert result["exception"] is None, (args, result)
        if result["code"] != 0:
            assert_one_line_error(result)
    assert "damaged" in assert_one_line_error(_cli(box.store, "log"))


def _crafted(box: Sandbox, **layout: object) -> tuple[str, str]:
    with Repo.open(box.store) as repo:
        head = repo.resolve("HEAD")
        commit = repo.objects.get(head, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
        manifest["root"]["dict"][0][1]["tensor"].update(layout)
        bad = repo.objects.put("commit", {**commit, "manifest": repo.objects.put("manifest", manifest)})
    return head, bad


@pytest.mark.parametrize("layout", [
    {"shape": [0, 1 << 62]},
    {"shape": [1 << 40, 1 << 40], "stride": [0, 0]},
    {"shape": [1] * 100, "stride": [1] * 100},
    {"shape": [3000], "stride": [1], "offset": 1 << 63},
    {"shape": [2, 1 << 62], "stride": [1, 0]},
    {"shape": [1 << 62] * 20, "stride": [0] * 20},
], ids=["zero-by-huge", "huge-stride0", "100-dims", "huge-offset", "overflowing-numel", "numel-past-float"])
def test_crafted_shapes_give_typed_errors(box: Sandbox, layout: dict) -> None:
    head, bad = _crafted(box, **layout)
    with Repo.open(box.store) as repo:
        with pytest.raises(CorruptObjectError):
            repo.load(bad)
        try:
            repo.diff(head, bad)
        except CorruptObjectError:
            pass
    for args in (["checkout", bad, "-o", str(box.base / "x.safetensors")], ["diff", head, bad],
                 ["show", "--tensors", bad], ["checkout", bad, "-o", str(box.base / "x.pt")]):
        result = _cli(box.store, *args)
        assert result["exception"] is None, (args, result)
        if result["code"] != 0:
            assert_one_line_error(result)


def test_crafted_ndarray_shapes_give_typed_errors(tmp_path: Path) -> None:
    import numpy as np

    with Repo.init(tmp_path / "r", chunk_size=4096) as repo:
        good = repo.commit({"a": np.zeros(0, dtype=np.float32)}, code_version=None)
        commit = repo.objects.get(good, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
        manifest["root"]["dict"][0][1]["ndarray"]["shape"] = [0, 1 << 62, 1 << 62]
        bad = repo.objects.put("commit", {**commit, "manifest": repo.objects.put("manifest", manifest)})
        with pytest.raises(CorruptObjectError):
            repo.load(bad)


def test_a_blob_size_its_chunks_cannot_fill_is_refused_before_allocating(box: Sandbox) -> None:
    with Repo.open(box.store) as repo:
        head = repo.resolve("HEAD")
        commit = repo.objects.get(head, "commit")[1]
        manifest = repo.objects.get(commit["manifest"], "manifest")[1]
        manifest["blobs"][0]["nbytes"] = 1 << 62
        bad = repo.objects.put("commit", {**commit, "manifest": repo.objects.put("manifest", manifest)})
        with pytest.raises(CorruptObjectError, match="chunks for"):
            repo.load(bad)


def test_lmdb_errors_while_iterating_the_index_are_typed(box: Sandbox) -> None:
    class Broken:
        def begin(self, *args: object, **kwargs: object) -> None:
            raise lmdb.CorruptedError("mdb_txn_begin: MDB_CORRUPTED")

        def info(self) -> dict:
            return {"map_size": 1 << 20}

    with Repo.open(box.store) as repo:
        index = repo.chunks.index
        real, index._env = index._env, Broken()
        try:
            with pytest.raises(StorageError, match="chunk index"):
                list(index)
            with pytest.raises(StorageError, match="repair index"):
                next(iter(index))
            with pytest.raises(StorageError):
                len(index)
            with pytest.raises(StorageError):
                repo.stats()
        finally:
            index._env = real


# -- 11. a read-only repository can be read ------------------------------------------------------------------


def _read_only_mount_available() -> str | None:
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount --bind "$d" "$d" && '
                            'mount -o remount,bind,ro "$d" && ! touch "$d/x" 2>/dev/null'],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a read-only bind mount in a user namespace: {probe.stderr.strip()[:200]}"
    return None


def test_a_read_only_repository_can_be_read(box: Sandbox) -> None:
    reason = _read_only_mount_available()
    if reason:
        pytest.skip(reason)
    mount = box.base / "ro"
    mount.mkdir()
    out = box.base / "out"
    out.mkdir()
    store = mount / "project" / ".ckptvcs"
    commands = [["--repo", str(store), *args] for args in (
        ["log"], ["show", "--tensors"], ["checkout", "HEAD", "-o", str(out / "s.pt")],
        ["checkout", "HEAD~1", "-o", str(out / "s.safetensors")], ["diff", "HEAD~1", "HEAD"], ["stats"],
        ["fsck"], ["fsck", "--read-data"], ["reflog"], ["commit", str(out / "s.pt")], ["gc"])]
    script = (f'mount --bind "{box.base}" "{mount}" && mount -o remount,bind,ro "{mount}" && '
              f'mount --bind "{out}" "{mount}/out" && exec "$0" "$@"')
    before = _tree(box.store)
    results, _ = run_child(commands, prefix=["unshare", "-rm", "sh", "-c", script])
    for result in results[:-2]:
        assert result["code"] == 0, result
        assert "repair" not in result["output"], result
    assert torch.equal(torch.load(out / "s.pt")["w"], _state(1)["w"])
    for result in results[-2:]:  # writes fail with one honest line
        line = assert_one_line_error(result)
        assert "read-only" in line.lower() or "permission" in line.lower(), line
    assert _tree(box.store) == before

"""Bit rot: readers follow the pack spec, repair salvages past damage without losing a
loadable commit, fsck catches at least what load rejects (issue 9, points 3 and 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptvcs import IntegrityError, Repo
from ckptvcs.pack import ENTRY_HEADER_SIZE, PackEntry, PackWriter, iter_pack_entries
from helpers import assert_tensor_identical, flip_byte


def _entry_start(entry: PackEntry) -> int:
    return entry.offset - ENTRY_HEADER_SIZE - (32 if entry.base is not None else 0)


def _one_pack_three_commits(repo: Repo) -> tuple[str, list[torch.Tensor], list[PackEntry], dict[str, int]]:
    """Commit X holds three one-chunk tensors in one pack; branch ``c<i>`` holds tensor i alone
    (deduplicated onto X's entries). Returns X, the tensors, their entries in pack order, and
    branch → tensor number."""
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(1024, generator=gen) for _ in range(3)]  # 4096 bytes: one chunk each
    x = repo.commit({f"t{i}": t for i, t in enumerate(tensors)}, "x", code_version=None)
    manifest = repo.manifest(x)
    entries = []
    for i in range(3):
        blob = manifest.root["dict"][i][1]["tensor"]["blob"]
        [chunk] = manifest.blobs[blob]["chunks"]
        entries.append((repo.chunks.index.get(bytes.fromhex(chunk)), i))
    entries.sort(key=lambda pair: pair[0].offset)
    assert len({e.pack for e, _ in entries}) == 1
    branches = {}
    for _entry, i in entries[1:]:
        repo.commit({"t": tensors[i]}, f"only t{i}", branch=f"c{i}", code_version=None)
        branches[f"c{i}"] = i
    return x, tensors, [e for e, _ in entries], branches


@pytest.mark.parametrize("mask", [0x40, 0x80, 0x02])
def test_unknown_flag_bits_are_refused_and_repair_keeps_later_entries(small_repo: Repo, mask: int) -> None:
    """Point 3: one bad flags byte. Reads refuse it (format.md: a reader MUST refuse unknown
    flag bits), fsck names that one chunk only, and repair keeps the commits that loaded."""
    repo = small_repo
    x, tensors, entries, branches = _one_pack_three_commits(repo)
    first = entries[0]
    flip_byte(repo.chunks.packs.path(first.pack), _entry_start(first) + 3, mask)  # the flags byte
    with pytest.raises(IntegrityError):
        repo.load(x)
    for branch, i in branches.items():
        assert_tensor_identical(repo.load(branch)["t"], tensors[i])
    report = repo.fsck()
    named = {o for f in report.errors for o in f.objects}
    assert first.chunk_id.hex() in named
    assert not named & {e.chunk_id.hex() for e in entries[1:]}, [str(f) for f in report.errors]
    repair = repo.repair_index()
    assert repair.damaged_packs == [first.pack]
    for branch, i in branches.items():
        assert_tensor_identical(repo.load(branch)["t"], tensors[i])
    with pytest.raises(IntegrityError):
        repo.load(x)


@pytest.mark.parametrize("where", ["magic", "stored_len", "pack header", "footer"])
def test_salvage_resynchronises_past_damage(small_repo: Repo, where: str) -> None:
    """The salvage walk finds every intact entry after a damaged header, pack header or footer."""
    repo = small_repo
    _, _, entries, _ = _one_pack_three_commits(repo)
    path = repo.chunks.packs.path(entries[0].pack)
    offset = {"magic": _entry_start(entries[0]), "stored_len": _entry_start(entries[0]) + 9,
              "pack header": 12, "footer": path.stat().st_size - 20}[where]
    flip_byte(path, offset, 0x01)
    with pytest.raises(IntegrityError):
        list(iter_pack_entries(path))
    salvaged = {(e.chunk_id, e.offset) for e in iter_pack_entries(path, strict=False)}
    intact = entries[1:] if where in ("magic", "stored_len") else entries
    assert {(e.chunk_id, e.offset) for e in intact} <= salvaged


def test_salvage_finds_no_entry_in_random_bytes(tmp_path: Path) -> None:
    """Resync accepts a header only where a well-formed one parses: noise yields nothing."""
    path = tmp_path / "packs" / ("0" * 32 + ".pack")
    path.parent.mkdir()
    gen = torch.Generator().manual_seed(5)
    noise = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=gen).numpy().tobytes()
    path.write_bytes(b"CKPTPACK" + bytes(8) + noise.replace(b"CE", b"CF"))
    assert list(iter_pack_entries(path, strict=False)) == []
    (tmp_path / "tmp").mkdir()
    writer = PackWriter(tmp_path / "tmp", tmp_path / "packs")
    writer.add(b"\x11" * 32, 0, 4, b"abcd")
    sealed = writer.seal()
    assert [e.chunk_id for e in iter_pack_entries(sealed, strict=False)] == [b"\x11" * 32]


# -- point 9: fsck catches at least what load rejects -----------------------------------------------


def _point_branch_at_manifest(repo: Repo, base_commit: str, body: dict) -> tuple[str, str]:
    """Store ``body`` as a manifest, a commit naming it, and branch ``bad`` at that commit."""
    manifest_id = repo.objects.put("manifest", body)
    commit_body = repo.objects.get(base_commit, "commit")[1]
    commit_id = repo.objects.put("commit", {**commit_body, "manifest": manifest_id, "parents": []})
    repo.refs.set_if_equals("refs/heads/bad", None, commit_id, who="test", message="test")
    return manifest_id, commit_id


TENSOR_DAMAGE = {
    "shape reaches outside the blob": lambda t: t.update(shape=[100000]),
    "unknown dtype": lambda t: t.update(dtype="float99"),
    "stride of the wrong length": lambda t: t.update(stride=[1, 1]),
    "misaligned offset": lambda t: t.update(offset=2),
    "blob index out of range": lambda t: t.update(blob=7),
    "negative dimension": lambda t: t.update(shape=[-1]),
}


@pytest.mark.parametrize("damage", sorted(TENSOR_DAMAGE) + ["unknown node kind", "ndarray of the wrong size"])
def test_fsck_refuses_the_manifests_load_refuses(small_repo: Repo, damage: str) -> None:
    repo = small_repo
    good = repo.commit({"w": torch.randn(64), "a": torch.arange(8).numpy()}, "good", code_version=None)
    body = json.loads(json.dumps(repo.objects.get(repo.show(good).manifest, "manifest")[1]))
    pairs = body["root"]["dict"]
    if damage == "unknown node kind":
        pairs.append(["extra", {"pickle": "x"}])
    elif damage == "ndarray of the wrong size":
        pairs[1][1]["ndarray"]["shape"] = [9]
    else:
        TENSOR_DAMAGE[damage](pairs[0][1]["tensor"])
    manifest_id, commit_id = _point_branch_at_manifest(repo, good, body)
    with pytest.raises(IntegrityError):
        repo.load("bad")
    corrupt = [f for f in repo.fsck().errors if f.kind == "corrupt"]
    assert [f.objects for f in corrupt] == [(manifest_id,)] and corrupt[0].commits == (commit_id,)
    assert "refs/heads/bad" in corrupt[0].refs


def test_fsck_checks_reflogs(repo: Repo) -> None:
    """Every structural byte of a reflog line (ids, time, separators) is checked."""
    for i in range(3):
        repo.commit({"w": torch.full((4,), float(i))}, f"c{i}", code_version=None)
    path = repo.root / "logs/refs/heads/main"
    lines = path.read_bytes().split(b"\n")
    second = len(lines[0]) + 1  # the start of the second line
    for offset in (second + 5, second + 64, second + 70, second + 129, second + 131,
                   second + lines[1].index(b"\t")):
        flip_byte(path, offset, 0x40)
        found = [f for f in repo.fsck().errors if f.objects == ("logs/refs/heads/main",)]
        assert len(found) == 1 and "line 2 of 3" in found[0].message, (offset, found)
        flip_byte(path, offset, 0x40)
    assert repo.fsck().ok


def test_plain_fsck_finds_a_delta_loop(small_repo: Repo) -> None:
    """A delta chain that loops (here: written by a buggy writer) makes load fail: fsck names it."""
    from ckptvcs.codec import XOR_PLANES

    repo = small_repo
    commit = repo.commit({"w": torch.randn(1024)}, "one chunk", code_version=None)
    [chunk_hex] = repo.manifest(commit).blobs[0]["chunks"]
    chunk, other = bytes.fromhex(chunk_hex), b"\x22" * 32
    writer = PackWriter(repo.root / "tmp", repo.root / "packs")
    looped = [writer.add(chunk, XOR_PLANES, 4096, b"\0" * 8, base=other),
              writer.add(other, XOR_PLANES, 4096, b"\0" * 8, base=chunk)]
    writer.seal()
    repo.chunks.index.update(put=looped, remove=[repo.chunks.index.get(chunk)])
    with pytest.raises(IntegrityError):
        repo.load(commit)
    errors = repo.fsck().errors
    assert any(f.kind == "corrupt" and chunk_hex in f.objects and f.commits == (commit,) and "loops" in f.message
               for f in errors), [str(f) for f in errors]

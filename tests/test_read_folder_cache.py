"""LocalBackend remembers data folders it checked (a catalog query's speed); data stays verified."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ckptvcs import CorruptObjectError, IntegrityError, Repo


def test_a_data_folder_swapped_for_a_link_later_cannot_pass_off_other_bytes(repo: Repo, tmp_path: Path) -> None:
    first = repo.commit({"w": np.arange(5)}, "first")
    assert repo.objects.read_commit(first).message == "first"  # objects/xx is checked and remembered
    folder = repo.root / "objects" / first[:2]
    away = repo.root.parent / "elsewhere"
    shutil.copytree(folder, away)
    forged = repo.objects.read_commit(first).to_json()
    forged["message"] = "forged"
    with Repo.init(tmp_path / "other") as other:  # a well-formed object, stored under the first one's name
        oid = other.objects.put("commit", forged)
        shutil.copyfile(other.root / "objects" / oid[:2] / oid[2:], away / "forged")
    (away / "forged").replace(away / first[2:])
    shutil.rmtree(folder)
    folder.symlink_to(away)
    with pytest.raises(IntegrityError, match="BLAKE3"):
        repo.objects.read_commit(first)


def test_a_data_folder_linked_before_the_first_read_is_refused(repo: Repo) -> None:
    first = repo.commit({"w": np.arange(5)}, "first")
    folder = repo.root / "objects" / first[:2]
    away = repo.root.parent / "elsewhere"
    shutil.move(str(folder), str(away))
    folder.symlink_to(away)
    with Repo.open(repo.root) as fresh, pytest.raises(CorruptObjectError, match="not a folder|symbolic link"):
        fresh.objects.read_commit(first)


def test_refs_are_checked_on_every_read(repo: Repo) -> None:
    repo.commit({"w": np.arange(5)}, "first")
    assert repo.branches()
    heads = repo.root / "refs" / "heads"
    away = repo.root.parent / "heads-elsewhere"
    shutil.move(str(heads), str(away))
    heads.symlink_to(away)
    with pytest.raises(CorruptObjectError, match="not a folder|symbolic link"):
        repo.refs.read_raw("refs/heads/main")

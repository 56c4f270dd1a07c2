"""Build the version-1 repository fixture in tests/data/v1-repo (and its expected values).

The checked-in fixture was made by the code of commit 288fd07 (before issue 11's
restructuring), so that tests/test_v1_fixture.py proves today's code still reads a
repository that older code wrote. It was run as:

    git worktree add /tmp/old288 288fd07
    cd /tmp && PYTHONPATH=/tmp/old288 /path/to/ckptvcs/.venv/bin/python \\
        /path/to/ckptvcs/tests/data/make_v1_repo.py /path/to/ckptvcs/tests/data

(from /tmp, outside any git checkout, so no commit records a code version), then
tests/data/v1-repo.fsck.json and v1-repo.log.txt were written by today's code
(`ckptvcs --repo COPY fsck --json`, `ckptvcs --repo COPY log --oneline --all`).

What it holds (small: a few hundred KB): chunk size 4 KiB and the default keyframe
interval 4, so a 64x64 fp32 weight spans 4 chunks and five small updates make delta
chains that end in a new keyframe; fp32, bf16 and int64 tensors, a numpy array and
a numpy scalar; branches `main` and `exp`, an annotated tag `v1.0`, and one pruned
commit whose data gc released. v1-repo.values.json maps every commit id to
``describe(state)`` of what was committed; the test compares it with what loads.
Do not re-run it to "refresh" the fixture: the point is that old code wrote it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def describe(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a state by key path: dtype, shape and SHA-256 of a tensor's bytes, or repr."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(describe(item, f"{path}/{key}" if path else str(key)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, item in enumerate(value):
            out.update(describe(item, f"{path}/{i}"))
        return out
    if isinstance(value, torch.Tensor):
        raw = value.detach().contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b""
        return {path: {"tensor": str(value.dtype), "shape": list(value.shape), "sha256": hashlib.sha256(raw).hexdigest()}}
    if isinstance(value, np.ndarray):
        return {path: {"ndarray": str(value.dtype), "shape": list(value.shape),
                       "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}}
    return {path: {"value": f"{type(value).__name__}:{value!r}"}}


def states() -> list[dict[str, Any]]:
    """Five successive training states: small updates of the same tensors, from fixed seeds."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(64, 64, generator=gen)
    emb = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    out = []
    for step in range(1, 6):
        weight = weight + 1e-3 * torch.randn(64, 64, generator=gen)
        emb[step] += torch.ones(64, dtype=torch.bfloat16)
        out.append({
            "model": {"weight": weight.clone(), "emb": emb.clone(), "bias": torch.zeros(64)},
            "counts": torch.arange(step * 10, dtype=torch.int64),
            "rng": np.random.default_rng(step).standard_normal(8),
            "lr": np.float32(0.1 / step),
            "step": step,
        })
    return out


def build(out_dir: Path) -> None:
    """Write v1-repo and v1-repo.values.json under ``out_dir`` with the ckptvcs on sys.path."""
    from ckptvcs import Repo

    target = out_dir / "v1-repo"
    if target.exists():
        shutil.rmtree(target)
    values: dict[str, Any] = {}
    s = states()
    with Repo.init(target, chunk_size=4096, keyframe_interval=4) as repo:
        ids = []
        for state in s[:4]:
            cid = repo.commit(state, message=f"step {state['step']}", step=state["step"],
                              metrics={"loss": 1.0 / state["step"]}, code_version=None)
            ids.append(cid)
            values[cid] = describe(state)
        repo.tag("v1.0", ids[2], message="fixture release")
        exp = repo.commit(s[4], message="experiment", branch="exp", step=5, code_version=None)
        values[exp] = describe(s[4])
        repo.prune(ids[0], rule="manual", reason="fixture: a pruned commit")
        repo.gc()
    (out_dir / "v1-repo.values.json").write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)

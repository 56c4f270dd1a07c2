"""Recovery readiness and release checks: what ``verify`` and ``verify_tag`` cost over a plain load.

What it measures, and why
-------------------------
``Repo.verify`` restores a commit in a fresh interpreter (so nothing in the caller's
memory can hide damage); the price is the new process's start-up (Python, ckptvcs and,
for a torch state, torch). ``Repo.verify_tag`` re-hashes every chunk a signed tag pins
without decoding the state. One run times, on one commit of a model + AdamW state:

* ``load``: ``Repo.load`` in this process (every chunk verified, as always);
* ``verify``: ``Repo.verify`` (fresh process; its record's ``restore_seconds`` is the load
  inside the child, ``seconds`` the whole, start-up included);
* ``verify_tag``: ``Repo.verify_tag`` on a signed tag of the same commit.

Ratios within one run are what to read; absolute times move with the machine's load.

Run
---
    .venv/bin/python benchmarks/bench_verify.py              # ~100 MB state
    .venv/bin/python benchmarks/bench_verify.py --mb 20      # quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ckptvcs import Repo
from ckptvcs.signing import generate_key


def _state(megabytes: int) -> dict:
    width = int((megabytes * (1 << 20) / 4 / 3) ** 0.5)  # weights + two AdamW moments
    model = torch.nn.Linear(width, width, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="state size in MiB (approx.)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repo.init(Path(tmp) / "store")
        key, pub, _ = generate_key(Path(tmp) / "release.pem")
        commit_id = repo.commit(_state(args.mb), "bench")
        repo.tag("v1", key=key)
        nbytes = sum(b["nbytes"] for b in repo.manifest().blobs)
        started = time.perf_counter()
        repo.load(commit_id)
        load = time.perf_counter() - started
        record = repo.verify(commit_id)
        started = time.perf_counter()
        repo.verify_tag("v1", trusted_keys=[pub])
        tag = time.perf_counter() - started
        repo.close()
    print(f"state: {nbytes / 2**20:.1f} MiB")
    print(f"load (this process):        {load:7.3f} s")
    print(f"verify, load in the child:  {record['restore_seconds']:7.3f} s")
    print(f"verify, torch import:       {record['import_seconds']:7.3f} s")
    print(f"verify, whole (fresh proc): {record['seconds']:7.3f} s  "
          f"(start-up and imports: {record['seconds'] - record['restore_seconds']:.3f} s)")
    print(f"verify_tag (re-hash all):   {tag:7.3f} s")


if __name__ == "__main__":
    main()

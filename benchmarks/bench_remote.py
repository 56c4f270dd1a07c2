"""Remotes against a real S3 server (SeaweedFS on 127.0.0.1): push, clone, lazy load.

What it measures, and why
-------------------------
A training run pushes a checkpoint after each save; only what changed should travel.
The script builds 6 checkpoints of an MLP with AdamW state (a few steps of training
between them, so every weight changes: the full fine-tune case), then in one run:

* ``bytes sent per push``: what ``push`` uploads for each new checkpoint, against the
  size of that checkpoint's ``torch.save`` file (what `aws s3 cp` / s3fs ``put`` of the
  files would send);
* ``push`` and ``s3fs put`` throughput: the 6 pushes against ``put`` of the 6 files;
* ``clone``: a full clone (download + verification of every chunk), bytes/s of packs;
* ``lazy``: ``clone --lazy`` then ``load(keys=["model"])``: time to the first loaded
  tensor, and the bytes fetched against the whole remote.

The server is started the way the tests start it (tests/s3server.py); numbers depend on
the machine and its load: compare ratios within one run.

Run
---
    .venv/bin/python benchmarks/bench_remote.py                 # ~4M parameters
    .venv/bin/python benchmarks/bench_remote.py --hidden 512    # quick
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckptvcs import Repo  # noqa: E402
from ckptvcs.backends.fsspec_backend import FsspecBackend  # noqa: E402
from ckptvcs.remotes import clone, push  # noqa: E402
from s3server import make_bucket, run_server  # noqa: E402


def checkpoints(hidden: int, n: int = 6) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden * 4), torch.nn.GELU(), torch.nn.Linear(hidden * 4, hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = []
    for step in range(n):
        for _ in range(2):
            loss = model(torch.randn(16, hidden)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append({"model": {k: v.clone() for k, v in model.state_dict().items()},
                    "optimizer": _clone(opt.state_dict()), "step": step})
    return out


def _clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    states = checkpoints(args.hidden)
    with tempfile.TemporaryDirectory() as tmp_name, run_server(Path(tmp_name) / "weed") as server:
        tmp = Path(tmp_name)
        make_bucket(server, "bench")
        os.environ.update({"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key})
        opts = server.storage_options()
        files = []
        for state in states:
            buf = io.BytesIO()
            torch.save(state, buf)
            files.append(buf.getvalue())
        plain = FsspecBackend("s3://bench/plain", **opts)
        t = time.perf_counter()
        for i, data in enumerate(files):
            plain.put(f"ckpt-{i}.pt", data)
        put_s = time.perf_counter() - t

        repo = Repo.init(tmp / "repo")
        remote = FsspecBackend("s3://bench/repo", **opts)
        sent, push_s = [], 0.0
        for i, state in enumerate(states):
            repo.commit(state, f"step {i}")
            t = time.perf_counter()
            sent.append(push(repo, remote).bytes_sent)
            push_s += time.perf_counter() - t
        print(f"{'ckpt':>4} {'torch.save':>12} {'push sent':>12} {'ratio':>6}")
        for i, (data, n) in enumerate(zip(files, sent)):
            print(f"{i:>4} {mb(len(data)):>12} {mb(n):>12} {n / len(data):>6.3f}")
        total_files, total_sent = sum(map(len, files)), sum(sent)
        print(f"all  {mb(total_files):>12} {mb(total_sent):>12} {total_sent / total_files:>6.3f}")
        print(f"s3fs put of the 6 files: {put_s:.2f} s ({total_files / put_s / 1e6:.0f} MB/s of files)")
        print(f"6 pushes:               {push_s:.2f} s ({total_sent / push_s / 1e6:.0f} MB/s sent, "
              f"{total_files / push_s / 1e6:.0f} MB/s of checkpoint)")
        t = time.perf_counter()
        with clone(remote, tmp / "clone") as full:
            clone_s = time.perf_counter() - t
            stored = sum(p.stat().st_size for p in (full.root / "packs").iterdir())
        print(f"clone (verified):       {clone_s:.2f} s ({stored / clone_s / 1e6:.0f} MB/s of packs, {mb(stored)})")
        t = time.perf_counter()
        with clone("s3://bench/repo", tmp / "lazy", endpoint_url=server.endpoint_url, lazy=True) as lazy:
            pass
        with Repo.open(tmp / "lazy") as lazy:
            model = lazy.load(keys=["model"])
            first_s = time.perf_counter() - t
            fetched = sum(p.stat().st_size for p in (lazy.root / "packs").iterdir())
        assert torch.equal(next(iter(model["model"].values())), next(iter(states[-1]["model"].values())))  # type: ignore[attr-defined]
        print(f"lazy clone + load(keys=['model']): {first_s:.2f} s to the first tensor; fetched {mb(fetched)} "
              f"of {mb(stored)}")


if __name__ == "__main__":
    main()

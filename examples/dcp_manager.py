"""DistributedCheckpointManager: a 2-rank FSDP2 job that saves every 2 steps, keeps the last 2
checkpoints, and resumes exactly where a killed run left off.

    python examples/dcp_manager.py [REPO]              # default ./dcp-manager-checkpoints
    python examples/dcp_manager.py s3://bucket/prefix  # ranks write to object storage
                                                       # (AWS_ENDPOINT_URL / AWS_* credentials)

Run it twice: the second run restores the last commit on both ranks and continues from
there (every rank its own shards, optimizer state and RNG streams). See docs/distributed.md.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptvcs
from ckptvcs.integrations.dcp_manager import DistributedCheckpointManager

STEPS = 6


def run(rank: int, world: int, repo: str, store_file: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # each rank its own data and dropout stream
    mgr = DistributedCheckpointManager(repo, model, opt, every_steps=2, keep_last=2)
    start = mgr.restore() or 0  # every rank; None on the first run
    for step in range(start + 1, start + STEPS + 1):
        x, y = torch.randn(16, 32), torch.randn(16, 4)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)  # the metric rank 0 decides and records with: the same on every rank
        commit = mgr.step(step, {"loss": reduced.item() / world})
        if rank == 0:
            print(f"step {step}: loss {reduced.item() / world:.4f}" + (f"  saved {commit[:12]}" if commit else ""))
    dist.destroy_process_group()


def main() -> None:
    repo = sys.argv[1] if len(sys.argv) > 1 else "dcp-manager-checkpoints"
    if "://" not in repo and not os.path.exists(repo):
        ckptvcs.Repo.init(repo).close()
    elif "://" in repo:
        from ckptvcs.backends.fsspec_backend import FsspecBackend

        try:
            ckptvcs.Repo.init(None, backend=FsspecBackend(repo)).close()
        except ckptvcs.RepositoryExistsError:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(2, repo, os.path.join(tmp, "store")), nprocs=2)


if __name__ == "__main__":
    main()

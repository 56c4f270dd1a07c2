"""FSDP2 training on CPU ranks saving through torch.distributed.checkpoint into ckptvcs.

    python examples/dcp_fsdp.py [REPO]        # default ./dcp-checkpoints

Four ranks (gloo, CPU) train a small FSDP2 model and save every 2 steps: each save is one
ckptvcs commit holding every rank's shards. Then two ranks resume from the last commit
(resharded 4 -> 2), and one process reads the consolidated weights. See docs/distributed.md.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptvcs
from ckptvcs.integrations.dcp import RepoLoadPlanner, RepoReader, RepoWriter, load_consolidated


def setup(rank: int, world: int, store_file: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    g = torch.Generator().manual_seed(step)  # the same batch on every rank and in every run
    x, y = torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def train(rank: int, world: int, repo: str, store_file: str) -> None:
    model, opt = setup(rank, world, store_file)
    for step in range(1, 7):
        loss = train_step(model, opt, step)
        if step % 2 == 0:  # the same decision on every rank
            msd, osd = get_state_dict(model, opt)
            md = dcp.save({"model": msd, "optim": osd, "step": step},
                          storage_writer=RepoWriter(repo, message=f"step {step}", step=step, metrics={"loss": loss}))
            if rank == 0:
                print(f"step {step}: loss {loss:.4f}, commit {md.storage_meta.save_id[:12]}")
    dist.destroy_process_group()


def resume(rank: int, world: int, repo: str, store_file: str) -> None:
    model, opt = setup(rank, world, store_file)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}
    dcp.load(state, storage_reader=RepoReader(repo, "HEAD"), planner=RepoLoadPlanner())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loss = train_step(model, opt, state["step"] + 1)
    if rank == 0:
        print(f"resumed at step {state['step']} on {world} ranks; next loss {loss:.4f}")
    dist.destroy_process_group()


def main() -> None:
    repo = sys.argv[1] if len(sys.argv) > 1 else "dcp-checkpoints"
    if not os.path.exists(repo):
        ckptvcs.Repo.init(repo).close()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(4, repo, os.path.join(tmp, "train")), nprocs=4)
        mp.spawn(resume, args=(2, repo, os.path.join(tmp, "resume")), nprocs=2)
    with ckptvcs.Repo.open(repo) as r:
        for c in r.log():
            print(c.id[:12], c.message, c.stats)
        full = load_consolidated(r)
        print({k: tuple(v.shape) for k, v in full["model"].items()})


if __name__ == "__main__":
    main()

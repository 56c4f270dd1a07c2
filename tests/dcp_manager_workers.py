"""One rank of a real gloo job for tests/test_dcp_manager.py (DistributedCheckpointManager, S3).

Run as ``python dcp_manager_workers.py SCENARIO RANK WORLD STORE_FILE REPO OUT_DIR [ARGS...]``;
the ranks meet through a FileStore and write ``OUT_DIR/rank<R>.json`` when done. REPO is a
path or an ``s3://`` URL (endpoint and credentials from the AWS_* environment variables).
Each rank runs in its own working and temporary directory when the test gives it one
(separate "hosts").
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ckptvcs.integrations.dcp import RepoWriter
from ckptvcs.integrations.dcp_manager import DistributedCheckpointManager

TIMEOUT = timedelta(seconds=120)


def build(mesh: Any, rank: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same initial model on every rank, then each rank's own data stream (global RNG)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(32, 8))
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1000 + rank)  # per-rank RNG streams: data and dropout differ between ranks
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    x, y = torch.randn(8, 16), torch.randn(8, 8)  # drawn from this rank's global RNG
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    return float(reduced.item()) / dist.get_world_size()


def digest(model: torch.nn.Module, opt: torch.optim.Optimizer, full: bool = False) -> dict[str, str]:
    """Hex bytes of every model and optimizer tensor (this rank's shard, or the full tensor)."""
    msd, osd = get_state_dict(model, opt)
    out: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            t = value.full_tensor() if full and isinstance(value, DTensor) else value
            t = t.to_local() if isinstance(t, DTensor) else t
            out[prefix] = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()

    visit("model", msd)
    visit("optim", osd)
    return out


def main() -> None:
    scenario, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store_file, repo, out, args = sys.argv[4], sys.argv[5], Path(sys.argv[6]), sys.argv[7:]
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world,
                            timeout=TIMEOUT)
    mesh = init_device_mesh("cpu", (world,))
    model, opt = build(mesh, rank)
    result: dict[str, Any] = {"tmp": os.environ.get("TMPDIR"), "cwd": os.getcwd()}
    if scenario == "train":  # ARGS: total steps, the step after which every rank is SIGKILLed (0: none), every
        total, kill_after, every = int(args[0]), int(args[1]), int(args[2])
        mgr = DistributedCheckpointManager(repo, model, opt, every_steps=every, keep_last=2)
        start = mgr.restore()  # None on a fresh run
        result["resumed_at"] = start
        losses: dict[int, float] = {}
        for step in range((start or 0) + 1, total + 1):
            losses[step] = train_step(model, opt)
            mgr.step(step, {"loss": losses[step]})
            if step == kill_after:
                (out / f"rank{rank}.json").write_text(json.dumps({**result, "losses": losses}))
                os.kill(os.getpid(), signal.SIGKILL)
        result["losses"] = losses
        # the reference: an uninterrupted run from scratch in this same process, no manager
        ref_model, ref_opt = build(mesh, rank)
        result["reference"] = {step: train_step(ref_model, ref_opt) for step in range(1, total + 1)}
    elif scenario == "s3":  # save at step 2 and 3 through the manager, then restore into a fresh model
        mgr = DistributedCheckpointManager(repo, model, opt, every_steps=1)
        for step in (1, 2):
            train_step(model, opt)
            result[f"commit{step}"] = mgr.step(step)
        result["saved"] = digest(model, opt)
        result["full"] = digest(model, opt, full=True)  # a collective: every rank
        result["next"] = train_step(model, opt)
        fresh, fresh_opt = build(mesh, rank)
        again = DistributedCheckpointManager(repo, fresh, fresh_opt)
        result["restored_step"] = again.restore()
        result["restored"] = digest(fresh, fresh_opt)
        result["restored_next"] = train_step(fresh, fresh_opt)
    elif scenario == "die":  # rank 1 stages its shards on the remote, then dies before the commit
        train_step(model, opt)

        class Dying(RepoWriter):
            def write_data(self, plan: Any, planner: Any) -> Any:
                super().write_data(plan, planner)
                os._exit(17)

        cls = Dying if rank == 1 else RepoWriter
        msd, osd = get_state_dict(model, opt)
        try:
            dcp.save({"model": msd, "optim": osd}, storage_writer=cls(repo, message="never"))
            result["saved"] = True
        except Exception as err:  # the survivor sees its lost peer
            result["error"] = type(err).__name__
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        os._exit(0)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

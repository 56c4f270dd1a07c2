"""One rank of a real torch.distributed (gloo, CPU) job for tests/test_dcp.py.

Run as ``python dcp_workers.py SCENARIO RANK WORLD STORE_FILE REPO OUT_DIR``: the ranks
meet through a FileStore, run SCENARIO and write ``OUT_DIR/rank<R>.json`` when done.
The model and its states are a pure function of the seed and step, so any process
(including the test) can rebuild the exact tensors a save held.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ckptvcs.integrations.dcp import RepoLoadPlanner, RepoReader, RepoWriter

TIMEOUT = timedelta(seconds=120)


def full_tensors(step: int) -> dict[str, torch.Tensor]:
    """The global (unsharded) extra tensors of the save at ``step``: only ``sharded`` row 0 changes."""
    g = torch.Generator().manual_seed(1234)
    sharded = torch.randn(256, 64, generator=g)
    sharded[0] += step
    return {
        "sharded": sharded,  # a DTensor sharded on dim 0
        "dt_replicated": torch.randn(128, 32, generator=g),  # a DTensor replicated on every rank
        "replicated": torch.randn(64, 64, generator=g),  # a plain tensor, the same bytes on every rank
    }


def build_model(mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def app_state(mesh: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    full = full_tensors(step)
    msd, osd = get_state_dict(model, opt)
    return {
        "model": msd,
        "optim": osd,
        "extra": {
            "sharded": distribute_tensor(full["sharded"], mesh, [Shard(0)]),
            "dt_replicated": distribute_tensor(full["dt_replicated"], mesh, [Replicate()]),
            "replicated": full["replicated"].clone(),
        },
        "step": step,
        "meta": {"name": "run-a", "lr": 0.01},
    }


def local_of(t: Any) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def digest(state: Any) -> Any:
    """JSON-able exact picture of a state: tensors as hex bytes of their local shard."""
    if isinstance(state, dict):
        return {str(k): digest(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [digest(v) for v in state]
    if isinstance(state, torch.Tensor):
        t = local_of(state).detach().contiguous().reshape(-1)
        return {"dtype": str(t.dtype), "shape": list(local_of(state).shape), "hex": t.view(torch.uint8).numpy().tobytes().hex()
                if t.numel() else ""}
    return state


class _DyingWriter(RepoWriter):
    """Stages this rank's shards durably, then the process dies before DCP gathers results."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        super().write_data(plan, planner)
        os._exit(17)


def _forbid_unpickling() -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something tried to unpickle while loading a ckptvcs commit")

    torch.load = refuse  # type: ignore[assignment]
    pickle.loads = refuse  # type: ignore[assignment]
    pickle.load = refuse  # type: ignore[assignment]


def load_into(mesh: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, repo: str, rev: str) -> dict[str, Any]:
    """Restore ``rev`` into a state shaped like a save's (and into the model and optimizer)."""
    state = app_state(mesh, model, opt, 0)
    state["step"], state["meta"] = -1, {"name": "", "lr": 0.0}
    dcp.load(state, storage_reader=RepoReader(repo, rev), planner=RepoLoadPlanner())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state


def main() -> None:
    scenario, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store_file, repo, out = sys.argv[4], sys.argv[5], Path(sys.argv[6])
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, Any] = {}
    model, opt = build_model(mesh)
    if scenario == "save":  # two saves, the second through async_save
        result["losses"] = train_steps(model, opt, 2)
        writer = RepoWriter(repo, message="first", step=1, metrics={"loss": result["losses"][-1]})
        metadata = dcp.save(app_state(mesh, model, opt, 1), storage_writer=writer)
        result["first"] = metadata.storage_meta.save_id  # every rank learns the commit id
        result["state1"] = digest(app_state(mesh, model, opt, 1))
        result["losses"] += train_steps(model, opt, 1, start=2)
        writer = RepoWriter(repo, message="second", step=2)
        metadata = dcp.async_save(app_state(mesh, model, opt, 2), storage_writer=writer).result()
        result["second"] = metadata.storage_meta.save_id
        result["state2"] = digest(app_state(mesh, model, opt, 2))
        result["losses_after"] = train_steps(model, opt, 2, start=3)
        # same world size: a fresh model restores the first save bit-exactly and trains on identically
        _forbid_unpickling()
        fresh, fresh_opt = build_model(mesh)
        result["reloaded1"] = digest(load_into(mesh, fresh, fresh_opt, repo, result["first"]))
        result["resumed_losses"] = train_steps(fresh, fresh_opt, 1, start=2)
    elif scenario == "load":  # load a commit at this world size, never unpickling
        _forbid_unpickling()
        result["state"] = digest(load_into(mesh, model, opt, repo, sys.argv[7]))
        result["losses_after"] = train_steps(model, opt, 2, start=3)
    elif scenario == "die":  # rank 1 dies after staging its shards, before the commit
        train_steps(model, opt, 1)
        cls = _DyingWriter if rank == 1 else RepoWriter
        try:
            dcp.save(app_state(mesh, model, opt, 9), storage_writer=cls(repo, message="never", step=9))
            result["saved"] = True
        except Exception as err:  # the survivor sees the lost peer
            result["error"] = type(err).__name__
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if scenario != "die":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

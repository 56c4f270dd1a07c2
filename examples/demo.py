"""ckptvcs demo: a small PyTorch training run versioned in a local store.

It trains a little regressor, commits its whole training state every 50 steps
(weights, AdamW, LR scheduler, RNG streams, step, metrics, config), tags the best
checkpoint as a release, branches a learning-rate experiment off an earlier
checkpoint after resuming from it, and finally prints the history, a diff and the
storage statistics through the `ckptvcs` command. The last part runs the same loop
under `ckptvcs.CheckpointManager` (triggers, retention, exact resume after a simulated
interruption) and reclaims the space of pruned checkpoints with `ckptvcs gc`.

    python examples/demo.py [STORE]     # default STORE: ./demo-store (recreated)
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ckptvcs

CONFIG = {"hidden": 512, "lr": 3e-3, "batch": 64, "seed": 0}


def make_run() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A frozen "pretrained" encoder with a trainable head: the usual fine-tuning shape.

    The encoder's bytes never change, so every commit stores them once (dedup).
    """
    encoder = nn.Sequential(nn.Linear(32, CONFIG["hidden"]), nn.GELU(), nn.Linear(CONFIG["hidden"], CONFIG["hidden"]))
    encoder.requires_grad_(False)
    head = nn.Sequential(nn.GELU(), nn.Linear(CONFIG["hidden"], 64), nn.GELU(), nn.Linear(64, 1))
    model = nn.Sequential(encoder, head)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CONFIG["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
    return model, opt, sched


def training_state(model, opt, sched, step: int) -> dict:
    """Everything needed to resume exactly: objects' state_dicts plus every RNG stream."""
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "step": step,
    }


def restore(state: dict, model, opt, sched) -> int:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(CONFIG["batch"], 32)
    return x, (x[:, :4].sum(dim=1, keepdim=True) ** 2) / 4 + 0.1 * torch.randn(CONFIG["batch"], 1)


def train_step(model, opt, sched) -> float:
    """One optimisation step on a fresh batch; returns its loss."""
    x, y = batch()
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def train(repo: ckptvcs.Repo, model, opt, sched, start: int, stop: int, branch: str | None = None) -> dict[int, str]:
    """Train from ``start`` to ``stop``, committing every 50 steps; returns step → commit id."""
    commits = {}
    for step in range(start + 1, stop + 1):
        loss = train_step(model, opt, sched)
        if step % 50 == 0:
            commits[step] = repo.commit(
                training_state(model, opt, sched, step),
                message=f"step {step}",
                branch=branch,
                step=step,
                metrics={"loss": loss, "lr": sched.get_last_lr()[0]},
                config=CONFIG,
                data_version="synthetic-v1",
            )
            print(f"  step {step:>3}  loss {loss:.4f}  -> {commits[step][:12]}")
    return commits


def managed_run(store: Path) -> None:
    """The loop under CheckpointManager: interrupted at step 130, resumed exactly."""
    def run(stop: int) -> list[float]:
        model, opt, sched = make_run()
        with ckptvcs.CheckpointManager(
            store, {"model": model, "optimizer": opt, "scheduler": sched}, branch="managed",
            every_steps=25, best_metric="loss", keep_last=2, keep_best=1, keep_every_steps=100,
            config=CONFIG, data_version="synthetic-v1",
        ) as mgr:
            start = mgr.restore() or 0  # weights, AdamW, scheduler, every RNG stream, step
            losses = []
            for step in range(start + 1, stop + 1):
                losses.append(train_step(model, opt, sched))
                mgr.step(step, {"loss": losses[-1]})
            print(f"  run from step {start} to {stop}: last loss {losses[-1]:.6f}")
            return losses

    def seed() -> None:
        torch.manual_seed(1)
        random.seed(1)
        np.random.seed(1)

    seed()
    model, opt, sched = make_run()  # the reference: 200 uninterrupted steps, no checkpoints
    reference = [train_step(model, opt, sched) for _ in range(200)]
    seed()
    run(130)  # "interrupted": the process state is gone, only the store remains
    torch.manual_seed(12345)  # a fresh process would start from other RNG states
    resumed = run(200)  # resumes from step 125, the last checkpoint
    print(f"  losses of steps 126..200 identical to an uninterrupted run: {resumed == reference[125:]}")


def ckptvcs_cli(store: Path, *args: str) -> None:
    print(f"\n$ ckptvcs {' '.join(args)}")
    subprocess.run([sys.executable, "-m", "ckptvcs", "--repo", str(store), *args], check=True)


def main() -> None:
    store = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-store")
    if store.exists():
        if not (store / "config.json").is_file():
            sys.exit(f"{store} exists and is not a ckptvcs store; pick another path")
        shutil.rmtree(store)
    torch.manual_seed(CONFIG["seed"])
    random.seed(CONFIG["seed"])
    np.random.seed(CONFIG["seed"])

    with ckptvcs.Repo.init(store) as repo:
        print(f"Training on main, committing every 50 steps into {store}/")
        model, opt, sched = make_run()
        commits = train(repo, model, opt, sched, 0, 300)

        best = min(repo.log(), key=lambda c: c.metrics["loss"])
        repo.tag("v1.0", best.id, message=f"release candidate: best loss {best.metrics['loss']:.4f} at step {best.step}")
        print(f"Tagged step {best.step} (loss {best.metrics['loss']:.4f}) as v1.0")

        print("\nResuming from step 150 on a new branch 'lr-sweep' with a 3x learning rate")
        model, opt, sched = make_run()
        step = restore(repo.load(commits[150]), model, opt, sched)
        for group in opt.param_groups:
            group["lr"] *= 3
        repo.branch("lr-sweep", commits[150])
        train(repo, model, opt, sched, step, 250, branch="lr-sweep")

        released = repo.load("v1.0", keys=["model"])["model"]
        check, _, _ = make_run()
        check.load_state_dict(released)
        print("\nLoaded v1.0's weights alone (keys=['model']): bit-exact =",
              all(torch.equal(a, b) for a, b in zip(check.state_dict().values(), released.values())))

    ckptvcs_cli(store, "log", "--oneline", "--graph", "--all")
    ckptvcs_cli(store, "show", "v1.0")
    ckptvcs_cli(store, "diff", "main~1", "main")  # the frozen encoder is not listed: unchanged
    ckptvcs_cli(store, "stats")

    print("\nThe same loop under CheckpointManager (branch 'managed'): every 25 steps and on a new best")
    print("loss, keeping the last 2, the best 1 and every 100th step; interrupted at step 130 and")
    print("resumed from its last checkpoint in a new run:")
    managed_run(store)
    ckptvcs_cli(store, "log", "--oneline", "managed")
    print("\nThe manager already ran gc after each prune (gc_every=1), so pruned checkpoints' data is gone;")
    print("what gc still finds dead sits in packs that are mostly live, which it rewrites once half dead:")
    ckptvcs_cli(store, "gc", "--dry-run")


if __name__ == "__main__":
    main()

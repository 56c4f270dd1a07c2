"""A plain PyTorch training loop with checkpointing, retention and exact resume.

Run it, interrupt it (Ctrl-C, or `kill` it: with save_on_preemption the state is saved
at the next step boundary first), run it again: it resumes where it stopped, with the
same losses an uninterrupted run would have printed. `--slow` sleeps 20 ms a step, to
leave time for the interruption.

    python examples/train_with_manager.py [STORE]      # default STORE: ./manager-demo-store
    python examples/train_with_manager.py --fresh      # start over
    python examples/train_with_manager.py --slow       # 20 ms a step: time to press Ctrl-C
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

import ckptvcs

STEPS = 320


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--fresh", "--slow")]
    delay = 0.02 if "--slow" in sys.argv else 0.0
    store = Path(args[0] if args else "manager-demo-store")
    if "--fresh" in sys.argv and store.exists():
        shutil.rmtree(store)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)

    with ckptvcs.CheckpointManager(
        store,                                   # a Repo, or a path (created if absent)
        state={"model": model, "optimizer": opt, "scheduler": sched},
        every_steps=50,                          # a checkpoint every 50 steps
        best_metric="val_loss",                  # ... and whenever validation improves
        keep_last=2, keep_best=1, keep_every_steps=100,  # retention
        async_save=True,                         # the loop waits only for a copy to memory
        save_on_preemption=True,                 # SIGTERM / Ctrl-C: save, then exit
        config={"lr": 3e-3, "steps": STEPS},
    ) as mgr:
        start = mgr.restore() or 0               # model, optimizer, scheduler, RNG streams, step
        print(f"{'resuming at' if start else 'starting at'} step {start} (store: {store}/)")
        for step in range(start + 1, STEPS + 1):
            x = torch.randn(64, 32)
            y = (x[:, :4].sum(dim=1, keepdim=True) ** 2) / 4
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            metrics = {"loss": loss.item()}
            if step % 25 == 0:
                model.eval()
                with torch.no_grad():
                    xv = torch.randn(256, 32)
                    metrics["val_loss"] = nn.functional.mse_loss(model(xv), (xv[:, :4].sum(1, keepdim=True) ** 2) / 4).item()
                model.train()
                print(f"  step {step:>3}  loss {metrics['loss']:.4f}  val_loss {metrics['val_loss']:.4f}")
            mgr.step(step, metrics)
            time.sleep(delay)
        if start < STEPS:
            mgr.save(STEPS, metrics, message="end of training", tag="final")
        else:
            print("already trained; run with --fresh to start over")

    with ckptvcs.Repo.open(store) as repo:
        print("\nHistory (pruned checkpoints keep their metadata; their tensors are released by gc):")
        for commit in repo.log():
            mark = f"  [pruned: {commit.pruned['rule']}]" if commit.pruned else ""
            print(f"  {commit.id[:12]} step {commit.step:>3}  {commit.message}{mark}")
        report = repo.gc()
        print(f"\ngc reclaimed {report.bytes_reclaimed / 1e6:.1f} MB "
              f"({len(report.packs_deleted)} packs deleted, {len(report.packs_rewritten)} rewritten)")


if __name__ == "__main__":
    main()

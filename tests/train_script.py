"""A small deterministic training run under CheckpointManager, run as a child process by tests.

Every step draws from all three RNG streams (torch: data and dropout, numpy: noise,
python: a scale), so a resume that restores any stream wrongly diverges. Each step's
loss is appended to ``--out`` as ``<step> <float.hex()>`` before the manager sees it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time

import numpy as np
import torch
from torch import nn

import ckptvcs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL this process after that step")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--preemption", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    mgr = ckptvcs.CheckpointManager(
        args.store,
        {"model": model, "optimizer": opt, "scheduler": sched},
        every_steps=args.every,
        keep_last=2,
        async_save=args.async_save,
        save_on_preemption=args.preemption,
        code_version=None,
    )
    start = mgr.restore() or 0
    with open(args.out, "a") as out:
        out.write(f"start {start}\n")
        out.flush()
        for step in range(start + 1, args.steps + 1):
            x = torch.randn(32, 16)
            y = x[:, :3].sum(dim=1, keepdim=True) + torch.from_numpy(np.random.randn(32, 1).astype(np.float32))
            loss = nn.functional.mse_loss(model(x) * (1.0 + random.random() * 1e-3), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            out.write(f"{step} {loss.item().hex()}\n")
            out.flush()
            mgr.step(step, {"loss": loss.item()})
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(args.step_delay)
    mgr.save(args.steps, message="final", tag="final")
    mgr.close()


if __name__ == "__main__":
    main()

"""A small deterministic training run under CheckpointManager, run as a child process by tests.

Every step draws from all three RNG streams (torch: data and dropout, numpy: noise,
python: a scale), so a resume that restores any stream wrongly diverges. Each step's
loss is appended to ``--out`` as ``<step> <float.hex()>`` before the manager sees it.

With ``--loader`` the batches come from a shuffled torchdata ``StatefulDataLoader``
registered in the manager's state (its position in the epoch is saved and restored).
``--wait-at N`` stops after step N (its line written) until a signal arrives: the parent
sends it once it has seen that line, so where the run stops never depends on speed.
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
    parser.add_argument("--loader", action="store_true", help="batches from a shuffled StatefulDataLoader")
    parser.add_argument("--wait-at", type=int, default=None, help="after that step, wait for a signal")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    state = {"model": model, "optimizer": opt, "scheduler": sched}
    loader = make_loader() if args.loader else None
    if loader is not None:
        state["loader"] = loader

    mgr = ckptvcs.CheckpointManager(
        args.store,
        state,
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
        batches = endless(loader) if loader is not None else None
        for step in range(start + 1, args.steps + 1):
            if batches is None:
                x = torch.randn(32, 16)
                y = x[:, :3].sum(dim=1, keepdim=True) + torch.from_numpy(np.random.randn(32, 1).astype(np.float32))
            else:
                x, y = next(batches)
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
            while step == args.wait_at and not mgr.preempted:
                time.sleep(0.01)  # until SIGKILL, or SIGTERM (then the next step saves and exits)
    mgr.save(args.steps, message="final", tag="final")
    mgr.close()


def make_loader():  # type: ignore[no-untyped-def]
    """64 fixed samples in shuffled batches of 8: an epoch is 8 steps."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    y = x[:, :3].sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=gen)
    return StatefulDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)


def endless(loader):  # type: ignore[no-untyped-def]
    """Batches epoch after epoch; a restored StatefulDataLoader resumes mid-epoch."""
    while True:
        yield from loader


if __name__ == "__main__":
    main()

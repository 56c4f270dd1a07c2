"""Lightning's own checkpoints against the same run through ckptvcs.

What it measures, and why
-------------------------
One Lightning run (a frozen backbone and a trained head, as in fine-tuning; AdamW), saving
every epoch with ``ModelCheckpoint(save_top_k=-1)`` so every save is kept, is repeated with:

* ``torch``: Lightning's default ``TorchCheckpointIO`` (torch.save files);
* ``ckptvcs``: ``CkptvcsCheckpointIO`` (one commit per save);
* ``ckptvcs+async``: ``AsyncCheckpointIO(CkptvcsCheckpointIO(...))``.

For each: the disk bytes after N saves, the training loop's stall in saving (time spent
inside the strategy's ``save_checkpoint`` on the training thread, summed over the saves:
for the async run, the tensor clone Lightning makes before handing off), the wall time of
the saves themselves, and the time to load the last checkpoint back (resume). Ratios are
from one run on one machine: compare rows, not machines.

Run
---
    .venv/bin/python benchmarks/bench_lightning.py                 # 8 saves of a ~50 MB checkpoint
    .venv/bin/python benchmarks/bench_lightning.py --saves 4 --width 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from ckptvcs.integrations.lightning import CkptvcsCheckpointIO


class FineTune(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).requires_grad_(False)
        self.head = torch.nn.Linear(width, width)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.head(self.backbone(batch[0])), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=1e-3)


class TimedStrategy(SingleDeviceStrategy):
    """Records how long each save keeps the training thread."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(device=torch.device("cpu"), **kwargs)
        self.stall: list[float] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        start = time.perf_counter()
        super().save_checkpoint(checkpoint, filepath, storage_options)
        self.stall.append(time.perf_counter() - start)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(kind: str, work: Path, width: int, saves: int) -> dict[str, float]:
    if kind == "torch":
        io: Any = TorchCheckpointIO()
    elif kind == "ckptvcs":
        io = CkptvcsCheckpointIO(work / "repo", code_version=None)
    else:
        io = AsyncCheckpointIO(CkptvcsCheckpointIO(work / "repo", code_version=None))
    strategy = TimedStrategy(checkpoint_io=io)
    x = torch.randn(64, width, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        max_epochs=saves, strategy=strategy, default_root_dir=work, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=work / "ckpts", save_top_k=-1)],
    )
    pl.seed_everything(0, verbose=False)
    start = time.perf_counter()
    trainer.fit(FineTune(width), DataLoader(TensorDataset(x, x), batch_size=16))
    fit = time.perf_counter() - start
    last = sorted((work / "ckpts").iterdir(), key=os.path.getmtime)[-1]
    reader = TorchCheckpointIO() if kind == "torch" else CkptvcsCheckpointIO(work / "repo", create=False)
    start = time.perf_counter()
    reader.load_checkpoint(last)
    resume = time.perf_counter() - start
    return {"bytes": tree_bytes(work), "stall": sum(strategy.stall), "fit": fit, "resume": resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-lightning-"))
    try:
        rows = {kind: run(kind, root / kind, args.width, args.saves) for kind in ("torch", "ckptvcs", "ckptvcs+async")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows["torch"]
    print(f"{args.saves} saves, width {args.width} ({5 * args.width * args.width * 4 / 2**20:.0f} MiB of weights)")
    print(f"{'run':<14} {'disk MiB':>9} {'x torch':>8} {'stall s':>8} {'fit s':>7} {'resume s':>9}")
    for kind, r in rows.items():
        print(f"{kind:<14} {r['bytes'] / 2**20:>9.1f} {r['bytes'] / base['bytes']:>8.3f} {r['stall']:>8.3f} "
              f"{r['fit']:>7.2f} {r['resume']:>9.3f}")


if __name__ == "__main__":
    main()

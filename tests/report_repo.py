"""A small repository with everything the report shows: two branches (runs side by side),
a tag, commits pruned by a retention rule and collected by gc, a manual prune, a restore
and an fsck. Shared by tests/test_report.py and tests/test_report_browser.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ckptvcs import CheckpointManager, Repo


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 32)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def build(path: Path) -> Repo:
    """Build the repository at ``path`` (chunk size 4 KiB so that dedup and deltas show)."""
    repo = Repo.init(path, chunk_size=4096)
    model, optimizer = _model(0)
    with CheckpointManager(repo, {"model": model, "optimizer": optimizer}, branch="main", keep_last=3,
                           best_metric="val_loss", keep_best=1, code_version=None) as manager:
        for step in range(1, 9):
            _train(model, optimizer)
            manager.save(step, metrics={"val_loss": 1.0 / step + 0.05 * math.sin(step), "accuracy": 0.5 + step / 20},
                         tag="v1.0" if step == 6 else None)
    repo.branch("lr-sweep", "v1.0")
    model, optimizer = _model(0)
    with CheckpointManager(repo, {"model": model, "optimizer": optimizer}, branch="lr-sweep",
                           code_version=None) as manager:
        manager.restore("latest")
        for group in optimizer.param_groups:
            group["lr"] = 3e-2  # the sweep: a higher learning rate from the tagged release on
        for step in range(7, 12):
            _train(model, optimizer)
            manager.save(step, metrics={"val_loss": 0.9 / step, "accuracy": 0.55 + step / 22})
    repo.prune("lr-sweep~2", "manual", "a sweep point not worth keeping")
    repo.gc()
    repo.fsck()
    return repo

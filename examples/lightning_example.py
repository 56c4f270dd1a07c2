"""PyTorch Lightning with ckptvcs: one plugin, the stock ModelCheckpoint, exact resume.

    python examples/lightning_example.py [WORKDIR]     # a few seconds on a CPU

Trains a tiny regression model for 2 epochs (every save a commit; top-k removals prune),
then a fresh Trainer resumes from "last" up to 4 epochs, and the best model is loaded back
without torch.load. Prints the history the repository kept.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptvcs import Repo
from ckptvcs.integrations.lightning import CkptvcsCheckpointIO, load_from_checkpoint


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05, out_dir: Path = Path("runs")) -> None:
        super().__init__()
        self.save_hyperparameters()  # a pathlib.Path in hparams is fine: no pickle involved
        self.net = torch.nn.Linear(8, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 8, generator=g), torch.randn(8, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(256, 1, generator=g)
    return DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32), DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)


def fit(work: Path, max_epochs: int, ckpt_path: str | None = None) -> ModelCheckpoint:
    checkpoints = ModelCheckpoint(dirpath=work / "ckpts", monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        plugins=[CkptvcsCheckpointIO(work / "repo", code_version=None)],  # the one line
        callbacks=[checkpoints],
        default_root_dir=work,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), *data(), ckpt_path=ckpt_path)
    return checkpoints


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ckptvcs-lightning-"))
    pl.seed_everything(0, verbose=False)
    fit(work, max_epochs=2)  # pretend the job stopped here
    checkpoints = fit(work, max_epochs=4, ckpt_path="last")  # a fresh Trainer picks up exactly where it was

    with Repo.open(work / "repo") as repo:
        print(f"repository {repo.root}: one commit per save, newest first")
        for commit in repo.log():
            state = f"pruned ({commit.pruned['reason']})" if commit.pruned else "kept"
            print(f"  {commit.id[:10]}  step {commit.step:>3}  val_loss {commit.metrics.get('val_loss', float('nan')):.4f}"
                  f"  {commit.config['lightning']['file']:<22} {state}")
    best = load_from_checkpoint(Regressor, work / "repo", checkpoints.best_model_path)  # no torch.load
    print(f"best: {Path(checkpoints.best_model_path).name} (val_loss {float(checkpoints.best_model_score):.4f}), "
          f"hparams {dict(best.hparams)}")


if __name__ == "__main__":
    main()

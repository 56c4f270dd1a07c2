"""A tiny Lightning run in a child process, for the kill-and-resume test of test_lightning.py.

Each training step appends ``<global step> <loss.hex()>`` to ``--losses`` (flushed before the
step's optimizer update). ``--kill-at-epoch E`` SIGKILLs the process at the start of epoch E,
after epoch E-1's checkpoint was committed: where it dies never depends on speed. The final
weights go to ``--weights`` as safetensors (no pickle either way).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from ckptvcs.integrations.lightning import CkptvcsCheckpointIO
from test_lightning import TinyModule, _loaders  # the tests' own model and data (this script's folder is on the path)


class LossLog(Callback):
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int) -> None:
        self.file.write(f"{trainer.global_step} {float(outputs['loss']).hex()}\n")
        self.file.flush()


class KillAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--kill-at-epoch", type=int, default=-1)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--no-ckptvcs", action="store_true")
    parser.add_argument("--losses", required=True)
    parser.add_argument("--weights", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    callbacks: list[Callback] = [LossLog(args.losses), KillAt(args.kill_at_epoch)]
    plugins = []
    if not args.no_ckptvcs:
        plugins.append(CkptvcsCheckpointIO(work / "repo", code_version=None))
        callbacks.append(ModelCheckpoint(dirpath=work / "ckpts", save_last=True, save_top_k=-1))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.max_epochs, plugins=plugins, callbacks=callbacks,
        default_root_dir=work, enable_progress_bar=False, enable_model_summary=False, logger=False,
        num_sanity_val_steps=0, enable_checkpointing=not args.no_ckptvcs,
    )
    model = TinyModule()
    trainer.fit(model, *_loaders(), ckpt_path=args.ckpt_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)


if __name__ == "__main__":
    main()

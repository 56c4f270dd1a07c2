"""The Hugging Face Trainer's own checkpoints against the same run through CkptvcsCallback.

What it measures, in one run of each (same model, data, seed, saves):

* disk bytes after N saves: the ``checkpoint-N`` folders the Trainer keeps (no
  ``save_total_limit``) against the repository (packs + objects + index);
* time spent saving: the Trainer's ``_save_checkpoint`` (both runs; the callback's run deletes
  each folder after committing it) and the callback's commit in ``on_save``;
* resume time: ``resume_path`` (writes the pickle-free folder) for the newest commit.

The model is a small BERT built from a config (4 layers, hidden 256; ~5.5 M parameters, AdamW),
trained on random tokens on the CPU: a full fine-tune, so no tensor is identical between saves
and what the repository saves comes from byte planes and XOR deltas, not from dedup.

    .venv/bin/python benchmarks/bench_hf.py [--saves 6] [--every 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from ckptvcs.integrations.hf import CkptvcsCallback, resume_path


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 8192, (n, 32), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class TimedTrainer(Trainer):
    """Adds up the seconds the Trainer spends in its own checkpoint save."""

    save_seconds = 0.0

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.save_seconds += time.perf_counter() - start


class TimedCallback(CkptvcsCallback):
    commit_seconds = 0.0

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_save(args, state, control, **kwargs)
        self.commit_seconds += time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(work: Path, saves: int, every: int, callback: CkptvcsCallback | None) -> TimedTrainer:
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=512, max_position_embeddings=64))
    args = TrainingArguments(output_dir=str(work / "out"), max_steps=saves * every, save_steps=every,
                             per_device_train_batch_size=8, logging_steps=every, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=7)
    trainer = TimedTrainer(model=model, args=args, train_dataset=RandomTokens(saves * every * 8),
                           callbacks=[callback] if callback else [])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--every", type=int, default=5)
    opts = parser.parse_args()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plain = run(work / "hf", opts.saves, opts.every, None)
        hf_bytes = folder_bytes(work / "hf" / "out")
        callback = TimedCallback(work / "ckpts")
        ours = run(work / "ck", opts.saves, opts.every, callback)
        repo_bytes = folder_bytes(work / "ckpts")
        start = time.perf_counter()
        resume_path(work / "ckpts", directory=work / "resume")
        resume_seconds = time.perf_counter() - start
    print(f"{opts.saves} saves, one every {opts.every} steps")
    print(f"disk after the run: Trainer folders {hf_bytes / 1e6:.1f} MB, repository {repo_bytes / 1e6:.1f} MB "
          f"({repo_bytes / hf_bytes:.3f} of it)")
    print(f"Trainer's own save: {plain.save_seconds / opts.saves * 1e3:.0f} ms per save; "
          f"commit in on_save: {callback.commit_seconds / opts.saves * 1e3:.0f} ms per save "
          f"(+ the Trainer's save, {ours.save_seconds / opts.saves * 1e3:.0f} ms, still runs)")
    print(f"resume_path (newest commit -> folder): {resume_seconds * 1e3:.0f} ms")


if __name__ == "__main__":
    main()

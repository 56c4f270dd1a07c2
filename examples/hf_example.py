"""A Hugging Face Trainer run checkpointed into ckptvcs, resumed from a commit, and deployed.

Trains a tiny BERT (built from a config: nothing is downloaded) for 12 steps on random tokens,
saving every 3 steps with ``save_total_limit=2``; every save is one commit. Then it resumes a
second Trainer from the step-9 commit (steps 3 and 6 were pruned) and checks that the losses of steps 10..12 and the final
weights are those of the first run, bit for bit; and loads the final model with
``load_pretrained``. Runs in seconds on a CPU (after the transformers import).

    python examples/hf_example.py [STORE]      # default STORE: a temporary folder
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

import ckptvcs
from ckptvcs.integrations.hf import CkptvcsCallback, load_pretrained, resume_path


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 128, (24, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.by_step[state.global_step] = logs["loss"]


def run(work: Path, store: Path, resume: str | None = None) -> tuple[BertForMaskedLM, dict[int, float]]:
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32))
    args = TrainingArguments(output_dir=str(work / "out"), max_steps=12, per_device_train_batch_size=4,
                             save_steps=3, save_total_limit=2, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=7)
    losses = Losses()
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                      callbacks=[CkptvcsCallback(store), losses])   # <- the one line ckptvcs needs
    trainer.remove_callback(PrinterCallback)  # the losses are printed below, not every log line
    trainer.train(resume_from_checkpoint=resume)
    return model, losses.by_step


def main() -> None:
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="ckptvcs-hf-example-"))
    store = Path(sys.argv[1]) if len(sys.argv) > 1 else work / "ckpts"

    model, losses = run(work, store)
    repo = ckptvcs.Repo.open(store)
    print("\ncommits (newest first):")
    for commit in repo.log():
        pruned = f"  [pruned: {commit.pruned['rule']}]" if commit.pruned else ""
        print(f"  {commit.id[:12]}  step {commit.step:>2}  loss {commit.metrics['loss']:.4f}"
              f"  new bytes {commit.stats['new_stored_bytes']:>7}{pruned}")
    print(f"checkpoint folders left by the Trainer: {sorted(p.name for p in (work / 'out').glob('checkpoint-*'))}")

    # save_total_limit=2 pruned the data of steps 3 and 6, not their history: resume from step 9.
    step9 = next(c.id for c in repo.log() if c.step == 9)
    folder = resume_path(repo, step9, work / "resume")
    print(f"\nresuming from {step9[:12]} through {folder} ({sorted(os.listdir(folder))})")
    resumed, resumed_losses = run(work / "second", work / "second-ckpts", resume=folder)
    same_losses = resumed_losses == {s: v for s, v in losses.items() if s > 9}
    same_weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    print(f"resumed run: same losses at steps 10-12: {same_losses}; same final weights: {same_weights}")

    deployed = load_pretrained(AutoModelForMaskedLM, repo, "HEAD")
    print(f"load_pretrained -> {type(deployed).__name__}, "
          f"same weights: {all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), deployed.state_dict().values()))}")
    print(f"fsck: {'ok' if repo.fsck(read_data=True).ok else 'DAMAGED'}")
    if not (same_losses and same_weights):
        raise SystemExit("resume was not exact")


if __name__ == "__main__":
    main()

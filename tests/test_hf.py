"""The Hugging Face Trainer integration against the real transformers Trainer (tiny BERT, CPU).

Every save is a commit (weights, optimizer, scheduler, RNG, trainer state, TrainingArguments as
JSON, metrics); a resumed run matches an uninterrupted one bit for bit without unpickling
anything; ``save_total_limit`` prunes what the Trainer's own rotation deletes, history kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckptvcs import CommitPrunedError, InvalidInputError, Repo
from ckptvcs.integrations.hf import CkptvcsCallback, load_pretrained, resume_path

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=32)


class Tokens(torch.utils.data.Dataset):
    """16 fixed random sequences: 4 steps per epoch at batch size 4 (shuffled by the Trainer)."""

    def __init__(self, n: int = 16) -> None:
        self.ids = torch.randint(0, CONFIG["vocab_size"], (n, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    """The training loss logged at every step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.by_step[state.global_step] = logs["loss"]


def tiny_bert(freeze_embeddings: bool = False) -> BertForMaskedLM:
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG))  # dropout on: resume must restore the RNG streams
    if freeze_embeddings:
        model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    return model


def train(tmp_path: Path, repo: Any, *, name: str = "out", model: BertForMaskedLM | None = None,
          resume: str | None = None, callback: CkptvcsCallback | None = None, **overrides: Any) -> dict[str, Any]:
    """One real Trainer run; returns its model, losses and callback."""
    model = model if model is not None else tiny_bert()
    compute_metrics = overrides.pop("compute_metrics", None)
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path / name), max_steps=10, per_device_train_batch_size=4, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=7,
    )
    settings.update(overrides)
    callback = callback if callback is not None else CkptvcsCallback(repo)
    losses = Losses()
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=Tokens(), eval_dataset=Tokens(8),
                      callbacks=[callback, losses], compute_metrics=compute_metrics)
    trainer.train(resume_from_checkpoint=resume)
    return {"model": model, "losses": losses.by_step, "callback": callback, "trainer": trainer}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@contextlib.contextmanager
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any unpickling (pickle.load/loads/Unpickler, torch.load in any mode) raises."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something was unpickled")

    with monkeypatch.context() as patch:
        patch.setattr(pickle, "loads", refuse)
        patch.setattr(pickle, "load", refuse)
        patch.setattr(pickle, "Unpickler", refuse)
        patch.setattr(torch, "load", refuse)
        yield


def assert_fsck_clean(path: Path) -> None:
    with contextlib.closing(Repo.open(path)) as repo:
        report = repo.fsck(read_data=True)
        assert report.ok, report.findings


def test_every_save_is_a_commit_with_metrics_config_and_dedup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "ckpts"
    run = train(tmp_path, store, model=tiny_bert(freeze_embeddings=True), max_steps=4,
                eval_strategy="steps", eval_steps=2)
    repo = Repo.open(store)
    log = repo.log()
    assert [c.step for c in log] == [4, 2]
    newest, first = log
    assert run["callback"].commits == {4: newest.id, 2: first.id}
    assert newest.epoch == 1 and newest.metrics["epoch"] == 1.0 and first.metrics["epoch"] == 0.5
    assert {"loss", "eval_loss", "learning_rate"} <= newest.metrics.keys()
    assert newest.metrics["eval_loss"] == run["trainer"].state.log_history[-2]["eval_loss"]
    training_args = newest.config["training_args"]
    assert training_args["save_steps"] == 2 and training_args["output_dir"] == str(tmp_path / "out")
    state = repo.load(newest.id, map_location="cpu")
    assert set(state) == {"model", "optimizer", "scheduler", "rng", "trainer_state", "model_config"}
    assert '"global_step": 4' in state["trainer_state"]
    assert_same_weights(state["model"], weights(run["model"]))
    # The Trainer's checkpoint-N folders are gone once committed: the repository is the store.
    assert list((tmp_path / "out").glob("checkpoint-*")) == []
    # Dedup: the frozen tensor is not stored again, and the second commit stores less than the first.
    changed = {d.path for d in repo.diff_stat(first.id, newest.id)}  # what differs between the two commits
    assert "model/bert.embeddings.word_embeddings.weight" in changed
    assert "model/bert.embeddings.position_embeddings.weight" not in changed
    assert newest.stats["new_stored_bytes"] < first.stats["new_stored_bytes"]
    # Deployment: a transformers model straight from a commit, nothing unpickled.
    with no_unpickling(monkeypatch):
        model = load_pretrained(AutoModelForMaskedLM, repo, newest.id)
    assert isinstance(model, BertForMaskedLM)
    assert_same_weights(weights(model), weights(run["model"]))
    repo.close()
    assert_fsck_clean(store)


def test_resume_from_a_commit_is_bit_exact_and_unpickles_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "ckpts"
    full = train(tmp_path, store)
    assert sorted(full["losses"]) == list(range(1, 11))
    commits = full["callback"].commits
    # Step 6 is mid-epoch (the Trainer skips 2 batches), step 4 ends an epoch (4 steps per epoch).
    for step in (6, 4):
        with no_unpickling(monkeypatch):
            folder = resume_path(store, commits[step], tmp_path / f"resume{step}")
            assert sorted(p.name for p in Path(folder).iterdir()) == ["config.json", "model.safetensors",
                                                                      "trainer_state.json"]
            resumed = train(tmp_path, tmp_path / f"other{step}", name=f"out{step}", resume=folder)
        assert resumed["callback"].resumed_from == commits[step]
        assert resumed["losses"] == {s: loss for s, loss in full["losses"].items() if s > step}
        assert_same_weights(weights(resumed["model"]), weights(full["model"]))
        assert_fsck_clean(tmp_path / f"other{step}")
    # "latest" is the branch head; the resumed run's commits go to the repository its callback names.
    assert Path(resume_path(store, directory=tmp_path / "latest")).name == "checkpoint-10"
    assert_fsck_clean(store)


def test_save_total_limit_prunes_what_the_trainer_rotates_and_keeps_the_best(tmp_path: Path) -> None:
    store = tmp_path / "ckpts"
    scores = iter([5.0, 1.0, 2.0, 3.0, 4.0])  # the first evaluation (step 2) stays the best

    def compute_metrics(prediction: Any) -> dict[str, float]:
        return {"score": next(scores)}

    run = train(
        tmp_path, store, callback=CkptvcsCallback(store, keep_checkpoint_dirs=True),
        eval_strategy="steps", eval_steps=2, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="score", greater_is_better=True, compute_metrics=compute_metrics,
    )
    repo = Repo.open(store)
    log = repo.log()
    assert [c.step for c in log] == [10, 8, 6, 4, 2]  # history kept
    live = sorted(c.step for c in log if c.pruned is None)
    # The Trainer's own rotation left exactly these folders: the newest and the best.
    hf_kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert live == hf_kept == [2, 10]
    for commit in log:
        if commit.step in (4, 6, 8):
            assert commit.pruned is not None and commit.pruned["rule"] == "save_total_limit=2"
            with pytest.raises(CommitPrunedError):
                repo.load(commit.id, keys=["model"])
    best = run["callback"].commits[2]
    assert repo.tags()["main-best"].object == best
    assert log[-1].metrics["eval_score"] == 5.0
    # load_best_model_at_end loaded the best checkpoint: the weights the best commit holds.
    assert_same_weights(weights(run["model"]), repo.load(best, keys=["model"], map_location="cpu")["model"])
    repo.close()
    assert_fsck_clean(store)


def test_default_removes_folders_but_the_best_one_load_best_model_at_end_reads(tmp_path: Path) -> None:
    store = tmp_path / "ckpts"
    scores = iter([1.0, 3.0, 2.0])  # step 4 is the best

    def compute_metrics(prediction: Any) -> dict[str, float]:
        return {"score": next(scores)}

    run = train(tmp_path, store, max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                metric_for_best_model="score", greater_is_better=True, compute_metrics=compute_metrics)
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-4"]
    with contextlib.closing(Repo.open(store)) as repo:
        best = repo.load("main-best", keys=["model"], map_location="cpu")["model"]
    assert_same_weights(weights(run["model"]), best)
    # On a machine without that folder, resume_path writes the best weights beside the resume
    # folder, so that load_best_model_at_end still finds them after the resume.
    shutil.rmtree(tmp_path / "out")
    folder = Path(resume_path(store, directory=tmp_path / "resume"))
    state = json.loads((folder / "trainer_state.json").read_text())
    assert folder.name == "checkpoint-6" and state["best_model_checkpoint"] == str(tmp_path / "resume" / "checkpoint-4")
    assert_same_weights(load_file(str(tmp_path / "resume" / "checkpoint-4" / "model.safetensors")), best)


def test_resume_path_refuses_a_commit_the_callback_did_not_make(tmp_path: Path) -> None:
    with contextlib.closing(Repo.init(tmp_path / "r")) as repo:
        repo.commit({"w": torch.zeros(2)}, code_version=None)
        with pytest.raises(InvalidInputError, match="not made by CkptvcsCallback"):
            resume_path(repo)


def test_import_ckptvcs_does_not_import_transformers() -> None:
    code = "import sys, ckptvcs, ckptvcs.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.slow
def test_run_killed_mid_training_resumes_in_a_fresh_process_bit_exact(tmp_path: Path) -> None:
    """SIGKILL after the step-6 commit; a fresh process resumes from "latest" and ends as an
    uninterrupted run (itself in a fresh process) does: same losses, same weights."""
    worker = [sys.executable, str(Path(__file__).with_name("hf_worker.py"))]
    subprocess.run([*worker, str(tmp_path / "full"), str(tmp_path / "full-out")], check=True, timeout=900,
                   stdout=subprocess.DEVNULL)
    killed = subprocess.Popen([*worker, str(tmp_path / "ckpts"), str(tmp_path / "killed"), "--hang-after", "6"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout is not None
        deadline = time.monotonic() + 900
        while True:  # the child says when its commit is durable; a generous deadline, no race
            ready, _, _ = select.select([killed.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = killed.stdout.readline() if ready else ""
            assert line, "the worker ended or never reported its commit"
            if line.strip() == "committed 6":
                break
    finally:
        killed.kill()  # SIGKILL
        killed.wait(timeout=60)
    subprocess.run([*worker, str(tmp_path / "ckpts"), str(tmp_path / "resumed"), "--resume", "latest"],
                   check=True, timeout=900, stdout=subprocess.DEVNULL)
    full = {int(k): v for k, v in json.loads((tmp_path / "full-out" / "losses.json").read_text()).items()}
    resumed = {int(k): v for k, v in json.loads((tmp_path / "resumed" / "losses.json").read_text()).items()}
    assert sorted(full) == list(range(1, 11))
    assert resumed == {step: loss for step, loss in full.items() if step > 6}
    assert_same_weights(load_file(str(tmp_path / "resumed" / "model.safetensors")),
                        load_file(str(tmp_path / "full-out" / "model.safetensors")))
    with contextlib.closing(Repo.open(tmp_path / "ckpts")) as repo:
        assert [c.step for c in repo.log()] == [10, 8, 6, 4, 2]
    assert_fsck_clean(tmp_path / "ckpts")

"""ckptvcs.integrations.lightning against the real Lightning: a tiny model on the CPU, a few steps.

Every test drives the stock Trainer and ModelCheckpoint (or Fabric) through the one-line
plugin, and checks what the repository holds afterwards: one commit per save, pruned data
for what Lightning deleted (history kept), bit-exact resume, and no unpickling anywhere.
"""

from __future__ import annotations

import argparse
import copy
import enum
import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from ckptvcs import CommitPrunedError, Repo, UnsupportedValueError, UsageError
from ckptvcs.integrations.lightning import CkptvcsCheckpointIO, load_from_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Opaque:
    """A value the pickle-free format has no representation for."""


class TinyModule(pl.LightningModule):
    def __init__(
        self,
        lr: float = 0.05,
        mode: Mode = Mode.FAST,
        level: Level = Level.HIGH,
        out_dir: Path = Path("runs/tiny"),
        args: argparse.Namespace | None = None,
        extra: Any = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


def _loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 4, generator=g), torch.randn(4, 1, generator=g)
    train = TensorDataset(x, x @ w + 0.1 * torch.randn(32, 1, generator=g))
    val = TensorDataset(x[:16] + 0.05, (x[:16] + 0.05) @ w)
    return DataLoader(train, batch_size=8), DataLoader(val, batch_size=8)  # 4 steps an epoch, no shuffling


def _trainer(root: Path, max_epochs: int, plugins: list | None = None, callbacks: list | None = None, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        plugins=plugins,
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _io(path: Path, **kw: Any) -> CkptvcsCheckpointIO:
    return CkptvcsCheckpointIO(path, code_version=None, **kw)  # no `git` call per save in tests


def _assert_fsck_clean(path: Path) -> None:
    with Repo.open(path) as repo:
        report = repo.fsck()
        assert report.ok, report


def _assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Equal values of the same types, tensors bit for bit."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            _assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{path}/{i}")
    elif isinstance(expected, argparse.Namespace):
        _assert_same(vars(actual), vars(expected), path)
    else:
        assert actual == expected, path


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling (pickle, torch.load) during the test fails it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_top_k_keeps_the_best_k_commits_and_prunes_the_rest_with_history(tmp_path: Path) -> None:
    train, val = _loaders()
    topk = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, 4, [_io(tmp_path / "repo")], [topk])
    trainer.fit(TinyModule(), train, val)

    with Repo.open(tmp_path / "repo") as repo:
        history = repo.log()
        assert len(history) == 8  # 4 top-k saves and 4 saves of last.ckpt, each its own commit
        files = {Path(p).name for p in topk.best_k_models} | {"last.ckpt"}
        assert set(os.listdir(tmp_path / "ckpts")) == files  # exactly what Lightning keeps
        kept = {c.config["lightning"]["file"]: c for c in history if c.pruned is None}
        assert set(kept) == files
        for path, score in topk.best_k_models.items():
            commit = kept[Path(path).name]
            assert commit.metrics["val_loss"] == pytest.approx(float(score))  # logged at save time
            assert commit.step == int(Path(path).stem.split("step=")[1]) and commit.epoch is not None
            assert repo.load(commit.id, keys=["global_step"])["global_step"] == commit.step
        for commit in history:
            if commit.pruned is not None:
                assert commit.pruned["rule"] == "lightning"
                with pytest.raises(CommitPrunedError):
                    repo.load(commit.id)
        # save_top_k's removals are prunes, the overwritten last.ckpt too: 2 + 3.
        assert sum(c.pruned is not None for c in history) == 5
    _assert_fsck_clean(tmp_path / "repo")


def test_resume_from_last_and_from_a_label_is_bit_exact(tmp_path: Path, no_unpickling: None) -> None:
    train, val = _loaders()
    pl.seed_everything(0)
    reference = _trainer(tmp_path / "ref", 4, enable_checkpointing=False)
    ref_model = TinyModule()
    reference.fit(ref_model, train, val)

    def run(max_epochs: int, ckpt_path: str | None) -> tuple[pl.Trainer, TinyModule]:
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=4, save_top_k=-1, save_last=True)
        trainer = _trainer(tmp_path, max_epochs, [_io(tmp_path / "repo")], [callback])
        pl.seed_everything(0)
        model = TinyModule()
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return trainer, model

    run(2, None)  # interrupted after two epochs
    for ckpt_path in ("last", "epoch=1-step=8"):  # Lightning's "last" (pointer files), a label
        trainer, model = run(4, ckpt_path)
        assert trainer.global_step == reference.global_step == 16
        _assert_same(model.state_dict(), ref_model.state_dict())
        _assert_same(trainer.optimizers[0].state_dict(), reference.optimizers[0].state_dict())
        _assert_same(trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                     reference.lr_scheduler_configs[0].scheduler.state_dict())
    with Repo.open(tmp_path / "repo") as repo:
        (labelled,) = repo.find("config.lightning.file == 'epoch=1-step=8.ckpt'")  # the label names one save
        assert labelled.step == 8 and labelled.epoch == 1
    _assert_fsck_clean(tmp_path / "repo")


class _Recording(CkptvcsCheckpointIO):
    """Keeps a deep copy of every checkpoint dict Lightning hands to the plugin."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.given: list[dict[str, Any]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.given.append(copy.deepcopy(checkpoint))
        super().save_checkpoint(checkpoint, path, storage_options)


def test_everything_lightning_writes_round_trips_and_load_from_checkpoint_needs_no_pickle(
    tmp_path: Path, no_unpickling: None
) -> None:
    train, val = _loaders()
    hparams = {
        "lr": 0.02,
        "mode": Mode.SLOW,
        "level": Level.LOW,
        "out_dir": tmp_path / "out",
        "args": argparse.Namespace(layers=2, names=("a", "b"), where=Path("data"), opts=AttributeDict(k=1)),
    }
    io = _Recording(tmp_path / "repo", code_version=None)
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val_loss", save_top_k=1, save_last=True)
    trainer = _trainer(tmp_path, 2, [io], [callback])
    model = TinyModule(**hparams)
    trainer.fit(model, train, val)

    assert io.given
    loaded = io.load_checkpoint(tmp_path / "ckpts" / "last.ckpt")
    _assert_same(loaded, io.given[-1])  # loops, callbacks' states, optimizer, schedulers, hparams...
    assert loaded["hyper_parameters"] == dict(model.hparams)
    assert type(loaded["hyper_parameters"]["args"].opts) is AttributeDict

    again = load_from_checkpoint(TinyModule, tmp_path / "repo", "last")  # LightningModule.load_from_checkpoint's stand-in
    assert dict(again.hparams) == dict(model.hparams) and again.hparams.mode is Mode.SLOW
    _assert_same(again.state_dict(), model.state_dict())
    best = load_from_checkpoint(TinyModule, tmp_path / "repo", callback.best_model_path, lr=0.5)
    assert best.hparams.lr == 0.5  # kwargs override the saved hyper-parameters, as in Lightning


def test_an_arbitrary_object_is_refused_with_its_key_path(tmp_path: Path) -> None:
    train, val = _loaders()
    trainer = _trainer(tmp_path, 1, [_io(tmp_path / "repo")], [ModelCheckpoint(dirpath=tmp_path / "ckpts")])
    with pytest.raises(UnsupportedValueError, match="hyper_parameters/extra") as caught:
        trainer.fit(TinyModule(extra=Opaque()), train, val)
    assert "Opaque" in str(caught.value)
    with Repo.open(tmp_path / "repo") as repo:
        assert repo.head()[1] is None  # nothing committed
    assert not (tmp_path / "ckpts").exists() or not os.listdir(tmp_path / "ckpts")


class _HeldBack(CkptvcsCheckpointIO):
    """Each background save waits until training has ended: every removal arrives before
    the save it follows has even started (the worst case AsyncCheckpointIO allows)."""

    def __init__(self, *args: Any, gate: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        assert self.gate.wait(300), "training never ended"
        super().save_checkpoint(*args, **kwargs)


class _OpenGate(Callback):
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gate.set()


def test_async_checkpoint_io_removals_apply_after_the_save_they_follow(tmp_path: Path) -> None:
    train, val = _loaders()
    gate = threading.Event()
    plugin = AsyncCheckpointIO(_HeldBack(tmp_path / "repo", gate=gate, code_version=None))
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val_loss", mode="min", save_top_k=1)
    trainer = _trainer(tmp_path, 3, [plugin], [callback, _OpenGate(gate)])
    trainer.fit(TinyModule(), train, val)  # the loss falls: every epoch saves, then removes the one before

    assert os.listdir(tmp_path / "ckpts") == [Path(callback.best_model_path).name]  # no stale checkpoint left
    with Repo.open(tmp_path / "repo") as repo:
        history = repo.log()
        assert len(history) == 3
        kept = [c for c in history if c.pruned is None]
        assert [c.config["lightning"]["file"] for c in kept] == [Path(callback.best_model_path).name]
        assert kept[0].metrics["val_loss"] == pytest.approx(float(callback.best_model_score))
    _assert_fsck_clean(tmp_path / "repo")


def test_async_removal_during_a_running_save_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other interleaving: the save is running (not queued) when its removal arrives."""
    started, release = threading.Event(), threading.Event()
    io = _io(tmp_path / "repo")
    commit = io.repo.commit

    def held_commit(*args: Any, **kwargs: Any) -> str:
        if kwargs["config"]["lightning"]["file"] == "a.ckpt":
            started.set()
            assert release.wait(120)
        return commit(*args, **kwargs)

    monkeypatch.setattr(io.repo, "commit", held_commit)
    a, b = tmp_path / "ckpts" / "a.ckpt", tmp_path / "ckpts" / "b.ckpt"
    with ThreadPoolExecutor(max_workers=1) as background:  # as AsyncCheckpointIO runs saves
        saves = [background.submit(io.save_checkpoint, {"w": torch.ones(3), "global_step": 1}, a),
                 background.submit(io.save_checkpoint, {"w": torch.zeros(3), "global_step": 2}, b)]
        assert started.wait(120)
        io.remove_checkpoint(a)  # a.ckpt's save is running
        release.set()
        for save in saves:
            save.result(120)
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["b.ckpt"]
    with Repo.open(tmp_path / "repo") as repo:
        assert {c.config["lightning"]["file"]: c.pruned is not None for c in repo.log()} == {"a.ckpt": True, "b.ckpt": False}
    io.teardown()


def test_fabric_save_and_load_go_through_the_repository(tmp_path: Path, no_unpickling: None) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[_io(tmp_path / "repo")])
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    fabric.save(tmp_path / "ckpts" / "step-1.ckpt", {"model": model, "optimizer": optimizer, "step": 1, "tag": Mode.FAST})
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(tmp_path / "ckpts" / "step-1.ckpt", state)
    assert state["step"] == 1 and remainder == {"tag": Mode.FAST}
    _assert_same(model.state_dict(), saved[0])
    _assert_same(optimizer.state_dict(), saved[1])
    assert fabric.load("step-1")["tag"] is Mode.FAST  # a label, as for Trainer.fit(ckpt_path=...)
    with Repo.open(tmp_path / "repo") as repo:
        assert [(c.step, c.config["lightning"]["file"]) for c in repo.log()] == [(1, "step-1.ckpt")]


def test_names_a_checkpoint_can_be_loaded_by(tmp_path: Path) -> None:
    io = _io(tmp_path / "repo", branch="runs")
    io.save_checkpoint({"w": torch.arange(3), "global_step": 5}, tmp_path / "c" / "epoch=0-step=5.ckpt")
    io.save_checkpoint({"w": torch.arange(4), "global_step": 9}, tmp_path / "c" / "epoch=1-step=9.ckpt")
    first = io.resolve("epoch=0-step=5")
    for name in ("epoch=0-step=5.ckpt", "ckptvcs://epoch=0-step=5", Path("ckptvcs://epoch=0-step=5"),
                 tmp_path / "c" / "epoch=0-step=5.ckpt", first[:10], f"ckptvcs://{first}"):
        assert torch.equal(io.load_checkpoint(name)["w"], torch.arange(3)), name
    for name in ("last", "ckptvcs://last", "runs"):
        assert io.load_checkpoint(name)["global_step"] == 9, name
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.ckpt")
    with pytest.raises(UsageError, match="never unpickles"):
        io.load_checkpoint(tmp_path / "plain.ckpt")
    io.teardown()


def test_import_ckptvcs_does_not_import_lightning() -> None:
    code = "import ckptvcs, ckptvcs.integrations, sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def _child(tmp_path: Path, name: str, *args: str) -> tuple[int, Path, Path]:
    losses, weights = tmp_path / f"{name}.losses", tmp_path / f"{name}.safetensors"
    script = Path(__file__).with_name("lightning_train.py")
    cmd = [sys.executable, str(script), "--losses", str(losses), "--weights", str(weights), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    return done.returncode, losses, weights


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_in_a_fresh_process_bit_exact(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    rc, ref_losses, ref_weights = _child(tmp_path, "ref", "--work", str(tmp_path / "ref"), "--no-ckptvcs")
    assert rc == 0
    run = str(tmp_path / "run")
    rc, losses, _ = _child(tmp_path, "run", "--work", run, "--kill-at-epoch", "2")
    assert rc == -9  # SIGKILL, at the start of epoch 2: epochs 0 and 1 are committed
    rc, losses, weights = _child(tmp_path, "run", "--work", run, "--ckpt-path", "last")
    assert rc == 0
    assert losses.read_text().splitlines() == ref_losses.read_text().splitlines()  # every step's loss, bit for bit
    _assert_same(load_file(weights), load_file(ref_weights))
    _assert_fsck_clean(tmp_path / "run" / "repo")


def test_save_last_link_removing_the_link_prunes_nothing(tmp_path: Path) -> None:
    train, val = _loaders()
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val_loss", save_top_k=2, save_last="link")
    trainer = _trainer(tmp_path, 3, [_io(tmp_path / "repo")], [callback])
    trainer.fit(TinyModule(), train, val)
    io = _io(tmp_path / "repo")
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink()
    target = io.resolve(last)
    io.save_checkpoint({"w": torch.ones(1)}, tmp_path / "other" / "later.ckpt")  # the target is no tip now
    io.remove_checkpoint(last)  # as Lightning does when the last name changes
    io.teardown()
    assert not last.exists() and not io.repo.is_pruned(target)
    with Repo.open(tmp_path / "repo") as repo:
        kept = {c.config["lightning"]["file"] for c in repo.log() if c.pruned is None}
    assert kept == {Path(p).name for p in callback.best_k_models} | {"later.ckpt"}

"""Hugging Face ``transformers.Trainer`` integration: every Trainer save is one ckptvcs commit.

One line turns it on::

    trainer = Trainer(model=model, args=args, ..., callbacks=[CkptvcsCallback("ckpts")])
    trainer.train(resume_from_checkpoint=resume_path("ckpts"))      # "latest", or any revision

Design (docs/integrations.md says the same for users):

- **A callback, not a Trainer subclass.** The Trainer has no pluggable checkpoint I/O, but
  ``on_save`` fires right after each complete ``checkpoint-N`` save, with the live model,
  optimizer and scheduler in hand; nothing consumed a random number since the Trainer saved
  its RNG streams. So the callback commits the live objects (never HF's files:
  ``training_args.bin`` is a pickle and ``rng_state.pth`` holds numpy objects) and works with
  any Trainer subclass (SFTTrainer...), which a subclass of ``Trainer`` would not.
- **Resume through a pickle-free folder.** ``train(resume_from_checkpoint=...)`` only takes a
  folder. :func:`resume_path` writes one from a commit with just ``config.json``,
  ``model.safetensors`` and ``trainer_state.json``: the Trainer loads the weights and its state
  from those, and finds no ``optimizer.pt``/``scheduler.pt``/``scaler.pt``/``rng_state.pth`` to
  load (it skips missing ones by design). ``trainer_state.json`` carries a pointer to the commit;
  the callback then restores optimizer, scheduler and scaler at ``on_train_begin`` (right after
  the point where the Trainer would have) and the RNG streams exactly where the Trainer's
  ``_load_rng_state`` would have run: at ``on_epoch_begin`` when the run resumes on an epoch
  boundary (or with ``ignore_data_skip``), else at the first ``on_step_begin``, after the
  skipped batches were drawn. Losses and weights then match an uninterrupted run bit for bit.
- **Retention.** ``save_total_limit`` maps to pruning: after each commit the callback applies
  the Trainer's own rotation rule (keep the newest ``save_total_limit`` commits of its runs on
  the branch, always the newest and the best) with :meth:`Repo.prune`; pruned commits stay in
  the history (step, metrics, config) and their data is released by gc. The best commit
  (``metric_for_best_model``) is tagged ``<branch>-best``.
- **Folders.** The repository is the checkpoint store: each ``checkpoint-N`` folder the Trainer
  wrote is deleted once committed (``keep_checkpoint_dirs=True`` keeps them), except the one
  ``load_best_model_at_end`` will read at the end of training.

Only the main process (``state.is_world_process_zero``) commits; multi-process training is not
covered yet (each rank's RNG streams would need a commit of their own).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import (
    CkptvcsError,
    Commit,
    InvalidInputError,
    NotARepositoryError,
    ProtectedCommitError,
    Repo,
    RepositoryExistsError,
)
from ..training.rng import capture_rng, restore_rng

__all__ = ["CkptvcsCallback", "resume_path", "export_pretrained", "load_pretrained", "INTEGRATION"]

INTEGRATION = "ckptvcs.integrations.hf"  # commit config["integration"]: commits this module made
POINTER_KEY = "ckptvcs"  # trainer_state.json stateful_callbacks entry naming the commit to resume from

# Top-level keys of a commit (repo.load(rev, keys=["model"]) reads the weights alone).
MODEL, OPTIMIZER, SCHEDULER, SCALER, RNG = "model", "optimizer", "scheduler", "scaler", "rng"
TRAINER_STATE, MODEL_CONFIG = "trainer_state", "model_config"  # JSON text, as HF writes those files


def open_repo(repo_or_path: Repo | str | Path) -> Repo:
    """The repository itself, or the one at a path (created when there is none)."""
    if isinstance(repo_or_path, Repo):
        return repo_or_path
    try:
        return Repo.open(repo_or_path)
    except NotARepositoryError:
        try:
            return Repo.init(repo_or_path)
        except RepositoryExistsError:  # another process created it meanwhile
            return Repo.open(repo_or_path)


def _plain_json(value: Any) -> Any:
    """``value`` as plain JSON: unknown objects become their ``str``, NaN and infinities strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _numeric(logs: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a Trainer log (strings, lists and flags left out)."""
    out = {}
    for name, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[str(name)] = float(value)
    return out


def _model_config_json(model: Any) -> str | None:
    """The model's ``config.json`` text, as ``save_pretrained`` writes it (None: not a transformers model)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    body = json.loads(config.to_json_string(use_diff=False))
    body["architectures"] = [type(model).__name__]
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def _is_ours(commit: Commit) -> bool:
    return isinstance(commit.config, dict) and commit.config.get("integration") == INTEGRATION


def _keys(commit: Commit) -> list[str]:
    """The top-level entries a commit of this module holds (recorded in its config)."""
    keys = commit.config.get("keys") if isinstance(commit.config, dict) else None
    return [str(k) for k in keys] if isinstance(keys, list) else []


class CkptvcsCallback(TrainerCallback):
    """Commit the whole training state to a ckptvcs repository at every save of the Trainer.

    ``repo_or_path``: a :class:`ckptvcs.Repo` or a path (opened, or created). ``branch``: where
    the commits go (default: HEAD's branch). ``keep_checkpoint_dirs``: leave the Trainer's
    ``checkpoint-N`` folders on disk (default: delete each once committed, but the folder
    ``load_best_model_at_end`` needs). ``best_tag``: the tag that follows the best checkpoint
    (default ``<branch>-best``; None: no tag). ``gc``: release pruned commits' data right away.
    ``data_version`` and ``code_version`` are recorded on each commit as :meth:`Repo.commit` does.

    After training: ``last_commit`` (the newest commit's id), ``commits`` (step -> id of this
    run's commits), ``resumed_from`` (the commit this run resumed from, or None).
    """

    def __init__(
        self,
        repo_or_path: Repo | str | Path,
        branch: str | None = None,
        *,
        keep_checkpoint_dirs: bool = False,
        best_tag: str | None = "",
        gc: bool = True,
        data_version: str | None = None,
        code_version: Mapping[str, Any] | None | bool = True,
    ) -> None:
        self._target = repo_or_path
        self._repo: Repo | None = repo_or_path if isinstance(repo_or_path, Repo) else None
        self.branch = branch
        self.keep_checkpoint_dirs = keep_checkpoint_dirs
        self._best_tag = best_tag
        self.gc = gc
        self.data_version = data_version
        self.code_version = code_version
        self.last_commit: str | None = None
        self.commits: dict[int, str] = {}
        self.resumed_from: str | None = None
        self._metrics: dict[str, float] = {}
        self._pending_rng: Any = None
        self._rng_at_epoch_begin = False
        self._left_dirs: set[Path] = set()

    # -- where the commits go ------------------------------------------------------

    @property
    def repo(self) -> Repo:
        """The repository, opened (or created) on first use, so that only the saving process opens it."""
        if self._repo is None:
            self._repo = open_repo(self._target)
            if self.branch is None:
                self.branch = self._repo.head()[0]
        return self._repo

    @property
    def best_tag(self) -> str | None:
        if self._best_tag is None:
            return None
        return self._best_tag or f"{self.branch or 'HEAD'}-best"

    def _rev(self) -> str:
        _ = self.repo  # sets the branch
        return self.branch or "HEAD"

    # -- metrics ---------------------------------------------------------------------

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        """Keep the latest value of every logged number (training loss, eval metrics)."""
        self._metrics.update(_numeric(logs or {}))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        metrics: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        self._metrics.update(_numeric(metrics or {}))

    # -- saving ------------------------------------------------------------------------

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Commit the state the Trainer just saved, then apply retention and tidy the folders."""
        if not state.is_world_process_zero:
            return
        snapshot = self._snapshot(args, state, kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        epoch = float(state.epoch or 0.0)
        cid = self.repo.commit(
            snapshot,
            message=f"checkpoint-{state.global_step}",
            branch=self.branch,
            step=state.global_step,
            epoch=math.floor(epoch),
            metrics={**self._metrics, "epoch": epoch},
            config=self._config(args, kwargs.get("model"), snapshot),
            data_version=self.data_version,
            code_version=self.code_version,
        )
        self.last_commit = cid
        self.commits[state.global_step] = cid
        best = self._tag_best(state)
        self._retain(args, state, best)
        if not self.keep_checkpoint_dirs:
            self._remove_dirs(args, state)

    def _snapshot(self, args: TrainingArguments, state: TrainerState, model: Any, optimizer: Any, scheduler: Any) -> dict:
        """The training state as plain values ckptvcs commits (tensors, numbers, strings)."""
        if model is None:
            raise InvalidInputError("CkptvcsCallback.on_save was called without the model (not from a Trainer?)")
        trainer_state = dataclasses.asdict(state)
        callbacks = trainer_state.get("stateful_callbacks")
        if isinstance(callbacks, dict):
            callbacks.pop(POINTER_KEY, None)
        snapshot: dict[str, Any] = {
            MODEL: model.state_dict(),
            TRAINER_STATE: json.dumps(_plain_json(trainer_state), indent=2, sort_keys=True) + "\n",
        }
        config = _model_config_json(model)
        if config is not None:
            snapshot[MODEL_CONFIG] = config
        if not args.save_only_model:
            if optimizer is not None:
                snapshot[OPTIMIZER] = optimizer.state_dict()
                scaler = getattr(optimizer, "scaler", None)  # accelerate keeps the AMP GradScaler there
                if scaler is not None:
                    snapshot[SCALER] = scaler.state_dict()
            if scheduler is not None:
                snapshot[SCHEDULER] = scheduler.state_dict()
            snapshot[RNG] = capture_rng()
        return snapshot

    def _config(self, args: TrainingArguments, model: Any, snapshot: Mapping[str, Any]) -> dict[str, Any]:
        """The commit's config: the TrainingArguments as JSON (``to_dict()``), what made the commit
        and which top-level entries it holds."""
        return {
            "integration": INTEGRATION,
            "keys": sorted(snapshot),
            "transformers_version": transformers.__version__,
            "model_class": type(model).__name__,
            "training_args": _plain_json(args.to_dict()),
        }

    def _tag_best(self, state: TrainerState) -> str | None:
        """The commit of the best checkpoint so far (``best_global_step``), tagged with ``best_tag``."""
        step = getattr(state, "best_global_step", None)
        if not step:
            return None
        best = self._find_step(step)
        if best is not None and self.best_tag is not None:
            tags = self.repo.tags()
            current = tags.get(self.best_tag)
            if current is None or current.object != best:
                self.repo.tag(self.best_tag, best, message=f"best checkpoint: step {step}", force=True)
        return best

    def _find_step(self, step: int) -> str | None:
        """This run's commit of ``step``, else the newest commit of the branch at that step."""
        if step in self.commits:
            return self.commits[step]
        for commit in self.repo.log(self._rev()):
            if _is_ours(commit) and commit.step == step and commit.pruned is None:
                return commit.id
        return None

    def _retain(self, args: TrainingArguments, state: TrainerState, best: str | None) -> None:
        """The Trainer's rotation rule (``trainer_utils.rotate_checkpoints``), applied as prunes."""
        limit = args.save_total_limit
        if limit is None or limit <= 0:
            return
        live = [c for c in reversed(self.repo.log(self._rev())) if _is_ours(c) and c.pruned is None]  # oldest first
        if len(live) <= limit:
            return
        protected = {live[-1].id} | ({best} if best else set())
        keep = max(limit, len(protected))
        remaining = len(live)
        pruned = []
        for commit in live:
            if remaining <= keep:
                break
            if commit.id in protected:
                continue
            try:
                self.repo.prune(commit.id, f"save_total_limit={limit}", f"older than the newest {limit} checkpoints")
            except ProtectedCommitError:  # a tag or branch points at it: kept, as the user asked
                continue
            pruned.append(commit.id)
            remaining -= 1
        if pruned and self.gc:
            try:
                self.repo.gc(only=pruned, lock_timeout=10.0)
            except CkptvcsError as err:  # never fail training over space reclamation; the next gc frees it
                warnings.warn(f"ckptvcs: gc after pruning was skipped: {err}", RuntimeWarning, stacklevel=2)

    def _remove_dirs(self, args: TrainingArguments, state: TrainerState) -> None:
        """Delete the ``checkpoint-N`` folders this callback committed, but the one the Trainer's
        ``load_best_model_at_end`` will read."""
        self._left_dirs.add(Path(str(args.output_dir)) / f"checkpoint-{state.global_step}")
        needed = Path(state.best_model_checkpoint).resolve() if (
            args.load_best_model_at_end and state.best_model_checkpoint
        ) else None
        for folder in list(self._left_dirs):
            if needed is not None and folder.resolve() == needed:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            self._left_dirs.discard(folder)

    # -- resuming ------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """When the Trainer resumed from a :func:`resume_path` folder, restore what it did not load."""
        callbacks: dict[str, Any] = state.stateful_callbacks if isinstance(state.stateful_callbacks, dict) else {}
        pointer = callbacks.pop(POINTER_KEY, None)
        if not isinstance(pointer, dict):
            return
        repo_path, commit_id = pointer.get("repo"), pointer.get("commit")
        if not isinstance(repo_path, str) or not isinstance(commit_id, str):
            raise InvalidInputError(f"trainer_state.json: stateful_callbacks[{POINTER_KEY!r}] names no commit: {pointer!r}")
        saved = self._load_resume_state(repo_path, commit_id)
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if OPTIMIZER in saved and optimizer is not None:
            optimizer.load_state_dict(saved[OPTIMIZER])
        if SCHEDULER in saved and scheduler is not None:
            scheduler.load_state_dict(saved[SCHEDULER])
        scaler = getattr(optimizer, "scaler", None)
        if SCALER in saved and scaler is not None:
            scaler.load_state_dict(saved[SCALER])
        self._pending_rng = saved.get(RNG)
        # The Trainer restores RNG at the start of the resumed epoch when it skips no batch, else after
        # drawing the skipped batches (Trainer._run_epoch): the first step of the resumed run.
        self._rng_at_epoch_begin = bool(args.ignore_data_skip) or float(state.epoch or 0.0).is_integer()
        self.resumed_from = commit_id

    def _load_resume_state(self, repo_path: str, commit_id: str) -> dict[str, Any]:
        """Optimizer, scheduler, scaler and RNG entries of the commit a resume folder names."""
        own = Path(repo_path).resolve() == self.repo.root.resolve()
        source = self.repo if own else open_repo(repo_path)
        try:
            wanted = [k for k in (OPTIMIZER, SCHEDULER, SCALER, RNG) if k in _keys(_resolve_ours(source, commit_id))]
            return dict(source.load(commit_id, keys=wanted, map_location="cpu")) if wanted else {}
        finally:
            if not own:
                source.close()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._pending_rng is not None and self._rng_at_epoch_begin:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None


# -- folders the Trainer and from_pretrained read ------------------------------------------


def _resolve_ours(repo: Repo, rev: str) -> Commit:
    commit = repo.show(repo.resolve(rev))
    if not _is_ours(commit):
        raise InvalidInputError(f"commit {commit.id[:12]} was not made by CkptvcsCallback (no Trainer state in it)")
    return commit


def _write_weights(folder: Path, weights: Mapping[str, Any], config_json: str | None) -> None:
    """``model.safetensors`` (+ ``config.json``) as ``save_pretrained`` lays them out; no pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        # safetensors refuses tensors sharing memory (tied embeddings): the second gets its own copy.
        tensors[name] = tensor.clone() if where in seen else tensor.contiguous()
        seen.add(where)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config_json is not None:
        (folder / "config.json").write_text(config_json, encoding="utf-8")


def _fresh_folder(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def export_pretrained(repo_or_path: Repo | str | Path, rev: str = "HEAD", directory: str | Path | None = None) -> str:
    """Write a commit's model as a ``from_pretrained`` folder (``config.json``, ``model.safetensors``).

    ``directory`` defaults to a new temporary folder; returns its path.
    """
    repo = open_repo(repo_or_path)
    commit = _resolve_ours(repo, rev)
    keys = [MODEL, MODEL_CONFIG] if MODEL_CONFIG in _keys(commit) else [MODEL]
    saved = repo.load(commit.id, keys=keys, map_location="cpu")
    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="ckptvcs-hf-"))
    folder.mkdir(parents=True, exist_ok=True)
    _write_weights(folder, saved[MODEL], saved.get(MODEL_CONFIG))
    return str(folder)


def load_pretrained(model_class: Any, repo_or_path: Repo | str | Path, rev: str = "HEAD", **kwargs: Any) -> Any:
    """A model from a commit, for deployment: ``load_pretrained(AutoModelForMaskedLM, "ckpts", "main-best")``.

    ``model_class`` is any transformers model class or Auto class; ``kwargs`` go to its
    ``from_pretrained``. The weights travel as safetensors through a temporary folder: nothing is
    unpickled, every chunk read from the repository is verified.
    """
    with tempfile.TemporaryDirectory(prefix="ckptvcs-hf-") as folder:
        export_pretrained(repo_or_path, rev, folder)
        return model_class.from_pretrained(folder, **kwargs)


def resume_path(
    repo_or_path: Repo | str | Path, rev: str = "latest", directory: str | Path | None = None
) -> str:
    """A ``checkpoint-N`` folder for ``trainer.train(resume_from_checkpoint=...)`` from a commit.

    ``rev``: ``"latest"`` (HEAD), a branch, tag or commit id. The folder (under ``directory``,
    default a new temporary folder) holds no pickle: ``config.json``, ``model.safetensors`` and
    ``trainer_state.json``, which names the commit; the :class:`CkptvcsCallback` of the resumed
    Trainer restores optimizer, scheduler, scaler and RNG streams from it. When the best
    checkpoint's folder (``load_best_model_at_end``) is gone, its weights are written beside it
    from the best commit, so the resumed run still knows its best model.
    """
    repo = open_repo(repo_or_path)
    commit = _resolve_ours(repo, "HEAD" if rev == "latest" else rev)
    saved = repo.load(commit.id, keys=[k for k in (MODEL, TRAINER_STATE, MODEL_CONFIG) if k in _keys(commit)],
                      map_location="cpu")
    base = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="ckptvcs-resume-"))
    folder = base / f"checkpoint-{commit.step}"
    _fresh_folder(folder)
    _write_weights(folder, saved[MODEL], saved.get(MODEL_CONFIG))
    trainer_state = json.loads(saved[TRAINER_STATE])
    trainer_state.setdefault("stateful_callbacks", {})[POINTER_KEY] = {
        "repo": str(repo.root.resolve()), "commit": commit.id,
    }
    _materialize_best(repo, commit, trainer_state, base)
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n", "utf-8")
    return str(folder)


def _materialize_best(repo: Repo, commit: Commit, trainer_state: dict[str, Any], base: Path) -> None:
    """Point ``best_model_checkpoint`` at a folder that exists, written from the best commit."""
    best_dir, best_step = trainer_state.get("best_model_checkpoint"), trainer_state.get("best_global_step")
    if not best_dir or Path(best_dir).is_dir() or not best_step:
        return
    for candidate in repo.log(commit.id):
        if _is_ours(candidate) and candidate.step == best_step and candidate.pruned is None:
            folder = base / f"checkpoint-{best_step}"
            if candidate.id != commit.id:
                _fresh_folder(folder)
                keys = [k for k in (MODEL, MODEL_CONFIG) if k in _keys(candidate)]
                saved = repo.load(candidate.id, keys=keys, map_location="cpu")
                _write_weights(folder, saved[MODEL], saved.get(MODEL_CONFIG))
            trainer_state["best_model_checkpoint"] = str(folder)
            return

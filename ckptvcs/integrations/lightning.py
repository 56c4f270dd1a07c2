"""PyTorch Lightning: store every checkpoint of a Trainer (or Fabric) in a ckptvcs repository.

One line: ``Trainer(plugins=[CkptvcsCheckpointIO("ckpts")])``. The stock ``ModelCheckpoint``
keeps deciding when to save and what to delete; each save becomes one commit (step, epoch,
the metrics logged at save time, the file name Lightning chose), each removal prunes that
commit's data while its history stays, and ``trainer.fit(model, ckpt_path=...)`` resumes
from a checkpoint path, a label (the file name), a revision, or ``"last"``.

Design (docs/integrations.md, "Lightning"):

- **Pointer files.** Lightning probes checkpoint paths itself through fsspec (``"last"``
  picks the newest ``last*.ckpt`` by mtime, the version counter asks ``exists``, removal
  checks the folder). So every save also writes, atomically, a small JSON pointer at the
  path Lightning gave, naming the repository and the commit: all of Lightning's file logic
  keeps working unchanged, and the pointer is what ``load_checkpoint`` reads. A pointer is
  never trusted for data: the commit's chunks are verified on load.
- **Names without files.** ``load_checkpoint`` also accepts ``ckptvcs://<label or revision>``
  or a bare label/revision, looked up in the repository (the pointers are a convenience,
  the repository is the record).
- **Metrics at save time.** CheckpointIO is never given the metrics; the plugin reads
  ``trainer.callback_metrics`` of the Trainer that is saving (found on the calling thread's
  stack) when the save is made. Called off that thread (``AsyncCheckpointIO``), it records
  the monitored scores the checkpoint's own ``ModelCheckpoint`` states hold, which are
  those of the save.
- **Removals in order.** Under ``AsyncCheckpointIO`` a removal can arrive while the save it
  follows is still queued or running; the plugin holds it back and applies it right after
  that save, so no stale checkpoint is left.
- **No pickle.** The checkpoint dict goes through ckptvcs's pickle-free state format
  (docs/format.md), which represents what Lightning writes (loops, callbacks' states,
  hyper-parameters with Namespaces, AttributeDicts, enums, paths); anything else is
  refused with its key path. ``LightningModule.load_from_checkpoint`` calls ``torch.load``
  directly: use :func:`load_from_checkpoint` here instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ckptvcs import NotARepositoryError, ProtectedCommitError, Repo, RevisionNotFoundError, UsageError

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["CkptvcsCheckpointIO", "load_from_checkpoint", "SCHEME", "POINTER_FORMAT", "PRUNE_RULE"]

SCHEME = "ckptvcs://"
POINTER_FORMAT = "ckptvcs-lightning-pointer"
PRUNE_RULE = "lightning"
_POINTER_MAX = 64 << 10  # a pointer is a few hundred bytes; anything larger is not one
_LAST = "last"


class CkptvcsCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that commits each checkpoint to a ckptvcs repository.

    ``repo_or_path``: an open :class:`ckptvcs.Repo`, or the path of one (created when it does
    not exist, unless ``create=False``). ``branch``: the branch the commits go on (default:
    where HEAD points). ``code_version``: as for :meth:`Repo.commit` (``True`` records the
    git commit of the working directory at every save; ``None`` skips that ``git`` call).

    ``storage_options`` of ``Trainer.save_checkpoint`` may be a dict with ``message`` and
    ``metrics`` (merged over the logged ones).
    """

    def __init__(
        self,
        repo_or_path: Repo | str | os.PathLike[str],
        branch: str | None = None,
        *,
        message: str = "lightning checkpoint",
        code_version: Mapping[str, Any] | bool | None = True,
        create: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(repo_or_path, (Repo, str, os.PathLike)):
            raise UsageError(f"CkptvcsCheckpointIO: repo_or_path must be a Repo or a path, not {type(repo_or_path).__name__}")
        self._given = repo_or_path
        self._repo: Repo | None = repo_or_path if isinstance(repo_or_path, Repo) else None
        self.branch = branch
        self.message = message
        self.code_version = code_version
        self.create = create
        self._lock = threading.RLock()
        self._saving: set[str] = set()  # pointer paths whose save is under way
        self._pending: list[str] = []  # removals that wait for the save they follow
        self._deferred: list[tuple[str, str]] = []  # (commit, reason): prunes refused while the commit was a tip

    # -- the repository ------------------------------------------------------------

    @property
    def repo(self) -> Repo:
        """The repository, opened (or created) on first use in this process."""
        with self._lock:
            if self._repo is None:
                assert not isinstance(self._given, Repo)  # a Repo given is self._repo from the start
                path = Path(os.fspath(self._given))
                try:
                    self._repo = Repo.open(path)
                except NotARepositoryError:
                    if not self.create or (path.exists() and any(path.iterdir())):
                        raise
                    self._repo = Repo.init(path)
            return self._repo

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers (ddp_spawn) get a copy: they reopen the repository by path.
        state = dict(self.__dict__)
        state["_lock"] = None
        if not isinstance(self._given, Repo):
            state["_repo"] = None
        elif state["_repo"] is not None:
            state["_given"] = str(state["_repo"].root)
            state["_repo"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- CheckpointIO ----------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit ``checkpoint``, then point ``path`` at the commit (atomically)."""
        options = _options(storage_options)
        key = _local(path)
        name = os.path.basename(key)
        metrics = _metrics_at_save(self, checkpoint)
        metrics.update(options.get("metrics", {}))
        with self._lock:
            self._saving.add(key)
        try:
            repo = self.repo
            commit_id = repo.commit(
                checkpoint,
                message=options.get("message", f"{self.message}: {name}"),
                branch=self.branch,
                step=_int_or_none(checkpoint.get("global_step", checkpoint.get("step"))),
                epoch=_int_or_none(checkpoint.get("epoch")),
                metrics=metrics,
                config={"lightning": {"file": name, "path": key, "hparams": _jsonable(checkpoint.get("hyper_parameters"))}},
                code_version=self.code_version,
            )
            replaced = self._pointed_commit(key)
            _write_pointer(key, {"format": POINTER_FORMAT, "repo": str(repo.root), "repo_id": _repo_id(repo),
                                 "commit": commit_id, "label": name})
        finally:
            with self._lock:
                self._saving.discard(key)
        with self._lock:
            if replaced is not None and replaced != commit_id:
                # Lightning overwrote the file: its old content is what Lightning deleted.
                self._prune(replaced, f"{name} was overwritten by a newer save")
            self._retry_deferred()
            self._apply_pending()

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint ``path`` names: a pointer file, ``ckptvcs://<label or revision>``,
        a label (the file name Lightning gave, with or without ``.ckpt``), a revision, or
        ``"last"`` (the newest unpruned commit of the branch). Every chunk is verified;
        nothing is unpickled, so ``weights_only`` changes nothing."""
        commit_id = self.resolve(path)
        loaded = self.repo.load(commit_id, map_location=_map_location(map_location))
        if not isinstance(loaded, dict):
            raise UsageError(f"commit {commit_id[:12]} does not hold a Lightning checkpoint (its state is not a dict)")
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        """Prune the commit ``path`` points at (history stays) and delete the pointer.

        A removal that arrives while a save is under way, or before the save of ``path``
        itself ran (AsyncCheckpointIO), is applied right after that save."""
        key = _local(path)
        with self._lock:
            if self._saving or not os.path.lexists(key):
                self._pending.append(key)
                return
            self._remove_now(key)

    def teardown(self) -> None:
        """Apply the removals still waiting, then release the repository (reopened on next use)."""
        with self._lock:
            self._retry_deferred()
            self._apply_pending(final=True)
            if self._repo is not None and not isinstance(self._given, Repo):
                self._repo.close()
                self._repo = None

    # -- names ------------------------------------------------------------------------

    def resolve(self, path: Any) -> str:
        """The commit id a checkpoint path, ``ckptvcs://`` name, label or revision names."""
        text = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(text, str) or not text:
            raise UsageError(f"not a checkpoint name: {path!r}")
        if text.startswith("ckptvcs:/"):  # also as pathlib leaves it: ckptvcs:/name
            return self._resolve_name(text.removeprefix("ckptvcs:").lstrip("/"))
        if os.path.isfile(text):
            pointer = _read_pointer(text)
            if pointer["repo_id"] != _repo_id(self.repo):
                raise UsageError(f"{text} points into another repository ({pointer['repo']}), not {self.repo.root}")
            return str(pointer["commit"])
        return self._resolve_name(text)

    def _resolve_name(self, name: str) -> str:
        repo = self.repo
        rev = "HEAD" if self.branch is None else f"refs/heads/{self.branch}"
        try:
            history = repo.log(rev)
        except RevisionNotFoundError:
            history = []
        if name == _LAST:
            for commit in history:
                if commit.pruned is None:
                    return commit.id
            raise RevisionNotFoundError(f"no checkpoint to resume from in {repo.root} ({rev} has no unpruned commit)")
        wanted = {name, os.path.basename(name)}
        wanted |= {w + ".ckpt" for w in wanted if not w.endswith(".ckpt")}
        for commit in history:
            if _label(commit.config) in wanted:
                return commit.id  # the newest save of that name; a pruned one fails loudly on load
        return repo.resolve(name)

    def _pointed_commit(self, key: str) -> str | None:
        """The commit of this repository that the pointer at ``key`` names, if it is one.

        A symbolic link (``save_last="link"``) names another pointer's commit: removing or
        replacing the link must not prune what the file it points to still holds."""
        if os.path.islink(key):
            return None
        try:
            pointer = _read_pointer(key)
        except (OSError, UsageError):
            return None
        return str(pointer["commit"]) if pointer["repo_id"] == _repo_id(self.repo) else None

    # -- removal ------------------------------------------------------------------------

    def _apply_pending(self, final: bool = False) -> None:
        if self._saving:
            return
        waiting, self._pending = self._pending, []
        for key in waiting:
            if os.path.lexists(key):
                self._remove_now(key)
            elif not final:
                self._pending.append(key)  # its save has not run yet

    def _remove_now(self, key: str) -> None:
        commit_id = self._pointed_commit(key)
        if commit_id is not None:
            self._prune(commit_id, f"Lightning removed {os.path.basename(key)}")
        try:
            os.remove(key)
        except FileNotFoundError:
            pass

    def _prune(self, commit_id: str, reason: str) -> None:
        try:
            self.repo.prune(commit_id, PRUNE_RULE, reason)
        except ProtectedCommitError:
            self._deferred.append((commit_id, reason))  # a tip now; pruned once a newer save moved past it

    def _retry_deferred(self) -> None:
        waiting, self._deferred = self._deferred, []
        for commit_id, reason in waiting:
            self._prune(commit_id, reason)


# -- load_from_checkpoint ------------------------------------------------------------


def load_from_checkpoint(
    cls: type[pl.LightningModule] | type[pl.LightningDataModule],
    repo_or_path: Repo | str | os.PathLike[str],
    rev: str = _LAST,
    *,
    branch: str | None = None,
    map_location: Any | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint`` for a checkpoint stored in ckptvcs, without ``torch.load``.

    ``rev``: anything :meth:`CkptvcsCheckpointIO.load_checkpoint` accepts (a pointer file, a
    label, a revision, ``"last"``). ``kwargs`` override the saved hyper-parameters, as in
    Lightning. Tensors return to the device they were saved on when it is available, else
    to the CPU (Lightning's default), unless ``map_location`` says otherwise.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration import pl_legacy_patch
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

    io = CkptvcsCheckpointIO(repo_or_path, branch, create=False)
    try:
        checkpoint = io.load_checkpoint(rev, map_location=map_location if map_location is not None else _available_device)
    finally:
        io.teardown()
    with pl_legacy_patch():
        checkpoint = _pl_migrate_checkpoint(checkpoint)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    assert isinstance(model, pl.LightningModule)
    device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
    return model if device is None else model.to(device)


def _available_device(saved: str) -> str:
    """Lightning's default map location: the saved device when this machine has it, else the CPU."""
    kind = saved.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        return "cpu"
    if kind == "mps" and not torch.backends.mps.is_available():
        return "cpu"
    return saved if kind in ("cpu", "cuda", "mps") else "cpu"


# -- helpers ----------------------------------------------------------------------------


def _options(storage_options: Any) -> dict[str, Any]:
    if storage_options is None:
        return {}
    if not isinstance(storage_options, Mapping) or not set(storage_options) <= {"message", "metrics"}:
        raise TypeError(
            f"CkptvcsCheckpointIO: storage_options may be a dict with 'message' and 'metrics', got {storage_options!r}"
        )
    return dict(storage_options)


def _local(path: Any) -> str:
    text = os.fspath(path)
    if not isinstance(text, str) or ("://" in text and not text.startswith("file://")):
        raise UsageError(f"CkptvcsCheckpointIO writes its pointer files on a local filesystem; got {path!r}")
    return os.path.abspath(text.removeprefix("file://"))


def _repo_id(repo: Repo) -> str:
    return str(repo.config.get("id") or repo.root)


def _write_pointer(key: str, pointer: dict[str, Any]) -> None:
    """Write the pointer atomically: temp file, fsync, rename, fsync of the folder."""
    folder = os.path.dirname(key)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{os.path.basename(key)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(json.dumps(pointer, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, key)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_pointer(key: str) -> dict[str, Any]:
    with open(key, "rb") as f:
        raw = f.read(_POINTER_MAX + 1)
    try:
        pointer = json.loads(raw) if len(raw) <= _POINTER_MAX else None
    except (ValueError, UnicodeDecodeError):
        pointer = None
    if (
        not isinstance(pointer, dict)
        or pointer.get("format") != POINTER_FORMAT
        or not all(isinstance(pointer.get(k), str) for k in ("repo", "repo_id", "commit"))
    ):
        raise UsageError(
            f"{key} is not a ckptvcs checkpoint pointer (a torch.save file, perhaps); ckptvcs never unpickles files"
        )
    return pointer


def _label(config: Any) -> str | None:
    section = config.get("lightning") if isinstance(config, dict) else None
    label = section.get("file") if isinstance(section, dict) else None
    return label if isinstance(label, str) else None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _metrics_at_save(io: CkptvcsCheckpointIO, checkpoint: dict[str, Any]) -> dict[str, float]:
    """The metrics to record with a save: the saving Trainer's ``callback_metrics`` now, or
    (off the Trainer's thread) the scores the checkpoint's ModelCheckpoint states hold."""
    trainer = _saving_trainer(io)
    metrics: dict[str, float] = {}
    if trainer is not None:
        for name, value in trainer.callback_metrics.items():
            number = _scalar(value)
            if number is not None:
                metrics[str(name)] = number
        return metrics
    callbacks = checkpoint.get("callbacks")
    for state in callbacks.values() if isinstance(callbacks, dict) else ():
        if isinstance(state, dict) and isinstance(state.get("monitor"), str):
            number = _scalar(state.get("current_score"))
            if number is not None:
                metrics[state["monitor"]] = number
    return metrics


def _saving_trainer(io: CkptvcsCheckpointIO) -> pl.Trainer | None:
    """The Trainer whose ``save_checkpoint`` is on this thread's stack and uses ``io``.

    CheckpointIO has no reference to the Trainer it serves; this is the one place that
    knows the Trainer's metrics at the moment of the save.
    """
    trainer_module = sys.modules.get("lightning.pytorch.trainer.trainer")
    if trainer_module is None:
        return None  # Fabric: there is no Trainer
    trainer_cls = trainer_module.Trainer
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_cls):
            checkpoint_io = candidate.strategy._checkpoint_io
            while checkpoint_io is not None and checkpoint_io is not io:
                checkpoint_io = getattr(checkpoint_io, "checkpoint_io", None)
            return candidate if checkpoint_io is io else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON rendering of the hyper-parameters for the commit record (queries, ``show``);
    the exact values are in the state itself."""
    if depth > 8:
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, int) or abs(value) < 1 << 53 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return _jsonable(vars(value), depth + 1)
    return str(value)


def _map_location(map_location: Any) -> Any:
    """torch.load's map_location in ckptvcs's terms; a ``(storage, location)`` callable
    (torch.load's form, Lightning's default) cannot apply here: tensors keep their device."""
    if map_location is None or isinstance(map_location, (str, torch.device, Mapping)):
        return map_location
    if map_location is _available_device:
        return map_location
    return None

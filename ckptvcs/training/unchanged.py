"""Which tensors the training loop did not touch since the last save (reuse hints for commits).

Across the saves of one run the manager sees the live tensors of every ``state_dict()``.
A tensor whose version counter (``tensor._version``, bumped by every in-place torch
operation on it or on a view of it), storage (the same storage object, still alive, at
the same address and size), dtype, shape, stride and storage offset are all as they were
at the last successful commit holds the bytes it held then, unless something wrote its
memory behind torch's back: through ``.data``, a numpy view, ``torch.from_numpy``
or DLPack aliases, ``set_()`` on another tensor, or a custom kernel. Optimizer steps are
watched separately (a step hook marks every parameter that had a gradient, and its state
tensors, as touched: torch's optimizers skip parameters whose ``grad`` is None), because
fused optimizer kernels (``AdamW(fused=True)`` on CPU in torch 2.13) update tensors
without bumping their version counters. The commit then reuses the chunk ids of the
untouched tensors instead of hashing them, and its rotating check (ckptvcs.reuse)
catches the writes behind torch's back within ``check_every`` saves; the first mismatch
turns hints off for the rest of the run, with a warning.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from ..reuse import ReuseHint, ReuseOutcome

__all__ = ["UnchangedTracker"]

Fingerprint = tuple[tuple[Any, ...], Any]
Capture = tuple[dict[str, Fingerprint], int]  # fingerprints by key path, optimizer steps seen

# Tensors smaller than this are always hashed: reusing their ids would save nothing measurable.
MIN_HINTED_BYTES = 64 << 10


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)  # the encoder's key paths (ckptvcs.state)


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(key path, tensor)`` for the tensors of plain dicts, lists and tuples; other containers are
    not entered (their tensors are simply not hinted, so they are hashed)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif type(value) in (dict, OrderedDict):
        for key, child in value.items():
            yield from _tensors(child, _join(path, key))
    elif type(value) in (list, tuple):
        for index, child in enumerate(value):
            yield from _tensors(child, _join(path, index))


def _fingerprint(t: torch.Tensor) -> Fingerprint | None:
    """What must stay equal for ``t``'s bytes to be presumed unchanged: its layout and version
    counter, and a weak reference to its storage (a storage freed and another allocated at
    the same address is not the same storage). None: never hinted."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized \
            or t.is_nested or t.device.type == "meta" or t.is_conj() or t.is_neg():
        return None
    storage = t.untyped_storage()
    if storage.nbytes() < MIN_HINTED_BYTES:
        return None
    key = (t._version, str(t.device), storage.data_ptr(), storage.nbytes(), t.dtype, tuple(t.shape),
           tuple(t.stride()), t.storage_offset())
    return key, weakref.ref(storage)


class UnchangedTracker:
    """Remembers the fingerprints of the last committed state and hints what did not change."""

    def __init__(self, check_every: int) -> None:
        self.check_every = check_every
        self.enabled = True
        self.last_outcome: ReuseOutcome | None = None  # what the last commit did with its hint
        self.commit: str | None = None
        self._prints: dict[str, Fingerprint] = {}
        self._round = 0
        # (device, storage address) of what optimizer steps updated → the number of the last
        # step that did; steps up to self._committed_step happened before self.commit's capture.
        self._touched: dict[tuple[str, int], int] = {}
        self._step = 0
        self._committed_step = 0
        self._lock = threading.Lock()  # the hook writes on the loop's thread, an async commit prunes on its own
        self._hooks: list[Any] = []

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Whenever ``optimizer`` steps, treat the parameters it stepped (those with a gradient:
        every torch optimizer skips the others) and their state tensors as touched."""
        def stepped(opt: torch.optim.Optimizer, *_: Any) -> None:
            self._step += 1
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    tensors = [p, *(v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))]
                    with self._lock:
                        for t in tensors:
                            self._touched[(str(t.device), t.untyped_storage().data_ptr())] = self._step

        self._hooks.append(optimizer.register_step_post_hook(stepped))

    def capture(self, captured: Any) -> tuple[ReuseHint | None, Capture]:
        """The hint for committing ``captured`` (None: hash everything), and what to hand back to
        :meth:`committed` once that commit succeeded. Call before any copy is taken."""
        steps = self._step
        if not self.enabled:
            return None, ({}, steps)
        with self._lock:
            touched = {where for where, step in self._touched.items() if step > self._committed_step}
        prints: dict[str, Fingerprint] = {}
        repeated: set[str] = set()
        for path, tensor in _tensors(captured):
            fp = _fingerprint(tensor)
            if path in prints:
                repeated.add(path)
            if fp is not None:
                prints[path] = fp
        for path in repeated:
            prints.pop(path, None)
        if self.commit is None:
            return None, (prints, steps)
        unchanged = {path for path, fp in prints.items() if (fp[0][1], fp[0][2]) not in touched and self._same(path, fp)}
        return ReuseHint(self.commit, frozenset(unchanged), self.check_every, self._round), (prints, steps)

    def _same(self, path: str, fp: Fingerprint) -> bool:
        old = self._prints.get(path)
        if old is None or old[0] != fp[0]:
            return False
        storage = old[1]()
        return storage is not None and storage is fp[1]()

    def committed(self, commit_id: str, capture: Capture, hint: ReuseHint | None) -> None:
        """Record a successful commit; a mismatch the commit found turns hints off for this run."""
        outcome = hint.outcome if hint is not None else None
        self.last_outcome = outcome
        self.commit = commit_id
        self._prints, self._committed_step = capture
        with self._lock:
            self._touched = {where: step for where, step in self._touched.items() if step > self._committed_step}
        self._round += 1
        if outcome is not None and outcome.mismatch is not None and self.enabled:
            self.enabled = False
            warnings.warn(
                f"tensor {outcome.mismatch!r} changed without a torch version bump (a write through .data, a numpy "
                f"view or another alias): the commit hashed every byte; unchanged-tensor hints are off for the rest "
                f"of this run. Commits since the last check of that tensor (at most {self.check_every - 1}) may hold "
                "its earlier value",
                RuntimeWarning,
                stacklevel=4,
            )

    def forget(self) -> None:
        """After a failed save or a restore: the next commit hashes everything."""
        self.commit = None
        self._prints = {}

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.forget()

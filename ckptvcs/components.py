"""Which part of a training state a tensor belongs to: weights, optimizer or other.

A heuristic on the tensor's key path (the names a state dict gives it), for the sizes
a commit records (``stats.components``) and the report's storage split. It never
decides anything about data: a wrong guess only moves bytes between two bars of a chart.

- ``optimizer``: a path with a part naming an optimizer (``optimizer``, ``optim``,
  ``opt``, ``optimizer_states``, ...) or an optimizer buffer (``exp_avg``,
  ``exp_avg_sq``, ``momentum_buffer``, ...);
- ``other``: the manager's own record (``ckptvcs.manager``: RNG streams), and parts
  naming RNG, schedulers, AMP scalers, samplers and loaders; bytes values;
- ``weights``: every other tensor or array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .state import iter_tensors

__all__ = ["COMPONENTS", "component_of", "blob_components", "split"]

COMPONENTS = ("weights", "optimizer", "other")

_OPTIMIZER_PARTS = {"opt", "optim", "optimizer", "optimizers", "optimizer_states", "optimizer_state", "optim_state"}
_OPTIMIZER_BUFFERS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                      "exp_inf"}
_OTHER_HINTS = ("rng", "random", "sched", "scaler", "sampler", "dataloader", "loader", "ckptvcs.manager")


def component_of(path: str) -> str:
    """``"weights"``, ``"optimizer"`` or ``"other"`` for a tensor at ``path`` (parts joined by ``/``)."""
    low = path.lower()
    parts = low.split("/")
    if parts[0] == "ckptvcs.manager":
        return "other"
    # Every optimizer part contains "opt", and no hint contains "/": the substring tests on
    # the whole path skip the per-part loops for most paths and decide the same.
    if ("opt" in low and any(p in _OPTIMIZER_PARTS or p.startswith("optim") for p in parts)) or (
        parts[-1] in _OPTIMIZER_BUFFERS
    ):
        return "optimizer"
    if any(hint in low for hint in _OTHER_HINTS):
        return "other"
    return "weights"


def blob_components(root: Any, blob_count: int, paths: Mapping[int, str] | None = None) -> list[str]:
    """The component of each blob of a manifest tree: that of the first tensor using it
    (``other`` for blobs no tensor uses: large bytes values). ``paths``: the tree's blob
    index → first tensor path (ckptvcs.delta.first_paths), when already computed."""
    found: list[str | None] = [None] * blob_count
    if paths is not None:
        for blob, path in paths.items():
            if 0 <= blob < blob_count:
                found[blob] = component_of(path)
        return [c or "other" for c in found]
    for path, _, body in iter_tensors(root):
        index = body.get("blob")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < blob_count and found[index] is None:
            found[index] = component_of(path)
    return [c or "other" for c in found]


def split(
    root: Any, logical: Sequence[int], stored: Sequence[int] | None = None, paths: Mapping[int, str] | None = None
) -> dict[str, dict[str, int]]:
    """``{component: {"logical_bytes", "new_stored_bytes"}}`` from per-blob byte counts
    (``stored`` left out: logical bytes only). Components with no blob are left out.
    ``paths``: as for :func:`blob_components`."""
    kinds = blob_components(root, len(logical), paths)
    out: dict[str, dict[str, int]] = {}
    for i, kind in enumerate(kinds):
        entry = out.setdefault(kind, {"logical_bytes": 0} if stored is None else {"logical_bytes": 0,
                                                                                    "new_stored_bytes": 0})
        entry["logical_bytes"] += int(logical[i])
        if stored is not None:
            entry["new_stored_bytes"] += int(stored[i])
    return {k: out[k] for k in COMPONENTS if k in out}

"""Training-loop checkpointing: the CheckpointManager, its save and keep policies, retention,
preemption handling and background (async) saves.

The policies and retention rules are torch-free and load with this package; the manager
imports torch and loads on first use (PEP 562), so ``import ckptvcs.training`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .policies import (
    AllKeep,
    AnyKeep,
    AnySave,
    AtSteps,
    EverySeconds,
    EverySteps,
    KeepBest,
    KeepEverySteps,
    KeepLast,
    KeepMaxAge,
    KeepPolicy,
    OnImprovement,
    SaveContext,
    SavePolicy,
    prune_decisions,
)
from .retention import CheckpointRecord, PruneDecision, RetentionPolicy, select_prunable

if TYPE_CHECKING:
    from .manager import CheckpointManager

_LAZY = {"CheckpointManager": "manager", "MANAGER_KEY": "manager"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointManager",
    "MANAGER_KEY",
    "CheckpointRecord",
    "PruneDecision",
    "RetentionPolicy",
    "select_prunable",
    "prune_decisions",
    "SaveContext",
    "SavePolicy",
    "KeepPolicy",
    "EverySteps",
    "EverySeconds",
    "OnImprovement",
    "AtSteps",
    "AnySave",
    "KeepLast",
    "KeepBest",
    "KeepEverySteps",
    "KeepMaxAge",
    "AnyKeep",
    "AllKeep",
]

"""Training-loop checkpointing: the CheckpointManager, its save and keep policies, retention,
preemption handling and background (async) saves.

The policies and retention rules are torch-free and load with this package; the manager
imports torch and loads on first use (PEP 562), so ``import ckptvcs.training`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
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

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


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

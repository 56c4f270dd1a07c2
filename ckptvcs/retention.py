"""Old import path: retention rules now live in :mod:`ckptvcs.training.retention`.

Kept so that ``ckptvcs.retention.select_prunable`` and ``RetentionPolicy`` (documented in
the README) go on working. The composable keep policies are in :mod:`ckptvcs.training.policies`.
"""

from .training.retention import (
    CheckpointRecord,
    PruneDecision,
    RetentionPolicy,
    best_value,
    parse_time,
    select_prunable,
)

__all__ = ["CheckpointRecord", "RetentionPolicy", "PruneDecision", "select_prunable", "parse_time", "best_value"]

"""Old import path: the CheckpointManager now lives in :mod:`ckptvcs.training.manager`.

Kept so that ``from ckptvcs.manager import CheckpointManager, MANAGER_KEY`` goes on working.
"""

from .training.manager import MANAGER_KEY, CheckpointManager

__all__ = ["CheckpointManager", "MANAGER_KEY"]

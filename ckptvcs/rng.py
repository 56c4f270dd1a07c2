"""Old import path: RNG capture and restore now live in :mod:`ckptvcs.training.rng`."""

from .training.rng import capture_rng, restore_rng

__all__ = ["capture_rng", "restore_rng"]

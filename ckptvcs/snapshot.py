"""Old import path: the host-memory snapshot now lives in :mod:`ckptvcs.training.snapshot`."""

from .training.snapshot import HostBuffers, host_copy

__all__ = ["host_copy", "HostBuffers"]

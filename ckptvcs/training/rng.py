"""The process's random number streams, captured as plain values and restored exactly.

Captured: Python's ``random`` module, numpy's global generator, torch's CPU generator,
and the generator of every CUDA device when CUDA is initialised. Every value is a tensor,
an array or plain data, so a checkpoint holding them needs no pickle.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The current state of every RNG stream (copies: later draws do not change it)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: Any) -> None:
    """Set every RNG stream to a state from :func:`capture_rng`.

    CUDA states are restored device by device; when the machine has a different number
    of CUDA devices than the one that saved, the common ones are restored and a warning
    says the run will not replay exactly.
    """
    if not isinstance(state, dict):
        raise TypeError("RNG state must be a dict from capture_rng()")
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    saved_cuda = state.get("cuda") or []
    if saved_cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count != len(saved_cuda):
            warnings.warn(
                f"checkpoint holds RNG states of {len(saved_cuda)} CUDA device(s), this machine has {count}; "
                "restored the common ones only, so random draws on the others will differ",
                RuntimeWarning,
                stacklevel=3,
            )
        for device, rng_state in enumerate(saved_cuda[:count]):
            torch.cuda.set_rng_state(rng_state.cpu(), device)

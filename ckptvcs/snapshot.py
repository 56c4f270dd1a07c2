"""A host-memory copy of a training state, for saving in the background.

The copy is what the training loop waits for in an async save: afterwards the live
tensors may change while the copy is hashed, compressed and written. Tensors that
share storage (tied weights, views) share one copied storage, so the checkpoint keeps
their sharing; device tensors are copied to the host. Containers are copied (an
optimizer's ``param_groups`` may change after the save); immutable values are reused.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

__all__ = ["host_copy"]


class _Copier:
    def __init__(self) -> None:
        # (device, storage address, storage bytes) → copied storage on the host
        self._storages: dict[tuple[str, int, int], torch.UntypedStorage] = {}

    def value(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, np.ndarray):
            return value.copy()
        if isinstance(value, bytearray):
            return bytes(value)
        if isinstance(value, OrderedDict):
            copied: Any = OrderedDict((k, self.value(v)) for k, v in value.items())
            meta = getattr(value, "_metadata", None)
            if meta is not None:
                copied._metadata = self.value(meta)
            return copied
        if type(value) is dict:
            return {k: self.value(v) for k, v in value.items()}
        if type(value) is list:
            return [self.value(v) for v in value]
        if type(value) is tuple:
            return tuple(self.value(v) for v in value)
        return value  # scalars, strings, bytes, dtypes...; anything unsupported is refused at encoding

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized \
                or t.device.type == "meta":
            return t  # the encoder refuses these with their key path
        data = t.detach()
        if data.is_conj() or data.is_neg():
            data = data.resolve_conj().resolve_neg()
        source = data.untyped_storage()
        key = (str(data.device), source.data_ptr(), source.nbytes())
        storage = self._storages.get(key)
        if storage is None:
            raw = torch.empty(0, dtype=torch.uint8, device=data.device).set_(source)
            storage = raw.to("cpu", copy=True).untyped_storage()
            self._storages[key] = storage
        copy = torch.empty(0, dtype=data.dtype).set_(storage, data.storage_offset(), data.shape, data.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=t.requires_grad)
        if t.requires_grad and t.is_leaf:
            copy.requires_grad_(True)
        return copy


def host_copy(state: Any) -> Any:
    """A deep copy of ``state`` whose tensors live in fresh host memory."""
    return _Copier().value(state)

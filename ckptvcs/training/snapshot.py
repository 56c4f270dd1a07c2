"""A host-memory copy of a training state, for saving in the background.

The copy is what the training loop waits for in an async save: afterwards the live
tensors may change while the copy is hashed, compressed and written. Tensors that
share storage (tied weights, views) share one copied storage, so the checkpoint keeps
their sharing; device tensors are copied to the host. Containers are copied (an
optimizer's ``param_groups`` may change after the save); immutable values are reused.

CUDA tensors copied into reused buffers land in page-locked (pinned) host memory: the
copies are queued without waiting (``non_blocking``), so they run back to back at the
link's speed instead of through a staging buffer, and the copy waits once, at the end,
for every device's current stream. Pinning costs time once, at the first save; the
buffers are reused after it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

__all__ = ["host_copy", "HostBuffers"]


class HostBuffers:
    """Host storages kept from one snapshot to the next, reused by size.

    A training state has the same tensor sizes at every save, so after the first save
    each copy lands in memory that is already mapped: no fresh allocation, no page
    faults (on VMs a first touch of memory is several times slower than a copy).
    Call :meth:`release` once the previous snapshot is no longer used.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}  # (bytes, pinned) → storages
        self._in_use: list[tuple[torch.UntypedStorage, bool]] = []

    def take(self, nbytes: int, *, pinned: bool = False) -> torch.UntypedStorage:
        """A host storage of ``nbytes``; ``pinned``: page-locked (for copies from a GPU)."""
        free = self._free.get((nbytes, pinned))
        if free:
            storage = free.pop()
        elif pinned:
            storage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
        else:
            storage = torch.UntypedStorage(nbytes)
        self._in_use.append((storage, pinned))
        return storage

    def release(self) -> None:
        """Make every storage handed out since the last release reusable."""
        for storage, pinned in self._in_use:
            self._free.setdefault((storage.nbytes(), pinned), []).append(storage)
        self._in_use = []

    def clear(self) -> None:
        self._free.clear()
        self._in_use = []


class _Copier:
    def __init__(self, buffers: HostBuffers | None) -> None:
        # (device, storage address, storage bytes) → copied storage on the host
        self._storages: dict[tuple[str, int, int], torch.UntypedStorage] = {}
        self._buffers = buffers
        self.queued_on: set[torch.device] = set()  # CUDA devices with copies queued, not yet waited for

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
            if self._buffers is None:
                storage = raw.to("cpu", copy=True).untyped_storage()
            else:
                on_gpu = data.device.type == "cuda"
                storage = self._buffers.take(source.nbytes(), pinned=on_gpu)
                torch.empty(0, dtype=torch.uint8).set_(storage).copy_(raw, non_blocking=on_gpu)
                if on_gpu:
                    self.queued_on.add(data.device)
            self._storages[key] = storage
        copy = torch.empty(0, dtype=data.dtype).set_(storage, data.storage_offset(), data.shape, data.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=t.requires_grad)
        if t.requires_grad and t.is_leaf:
            copy.requires_grad_(True)
        return copy


def host_copy(state: Any, buffers: HostBuffers | None = None) -> Any:
    """A deep copy of ``state`` whose tensors live in host memory (from ``buffers`` when given).

    Every copy has finished when this returns.
    """
    copier = _Copier(buffers)
    copied = copier.value(state)
    for device in copier.queued_on:
        torch.cuda.current_stream(device).synchronize()  # the queued copies, in order on that stream
    return copied

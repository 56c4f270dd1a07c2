"""Background saves: one worker thread, at most one save in flight, failures raised later.

The loop waits only while :meth:`BackgroundSaver.snapshot` copies the state to host memory
(into buffers reused from the previous save); the commit runs on the worker. A failed
background save is raised as :class:`AsyncSaveError` at the next check (the manager checks at
its next call, ``wait()`` and ``close()``), with the original error as its ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import AsyncSaveError
from .snapshot import HostBuffers, host_copy

__all__ = ["BackgroundSaver"]


class BackgroundSaver:
    """Runs one save at a time on a background thread."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._buffers = HostBuffers()
        self._inflight: Future[str] | None = None
        self._inflight_step: int | None = None

    @property
    def in_flight(self) -> bool:
        """True while a save was handed over and its outcome not checked yet."""
        return self._inflight is not None

    def snapshot(self, state: Any) -> Any:
        """A host-memory copy of ``state``; the previous snapshot's memory is reused, so call
        this only once the previous save is finished (:meth:`check` with ``wait=True``)."""
        self._buffers.release()
        return host_copy(state, self._buffers)

    def submit(self, step: int, commit: Callable[..., str], *args: Any) -> Future[str]:
        """Run ``commit(*args)`` on the worker; returns its Future."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptvcs-save")
        self._inflight_step = step
        self._inflight = self._executor.submit(commit, *args)
        return self._inflight

    def check(self, *, wait: bool) -> None:
        """Raise AsyncSaveError if the save in flight failed; with ``wait``, wait for it first."""
        fut = self._inflight
        if fut is None or (not wait and not fut.done()):
            return
        self._inflight = None
        err = fut.exception()  # blocks until done
        if err is not None:
            raise AsyncSaveError(f"background save of step {self._inflight_step} failed: {err}") from err

    def close(self) -> None:
        """Stop the worker (after the save in flight) and free the buffers."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._buffers.clear()

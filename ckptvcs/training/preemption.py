"""Preemption: turn SIGTERM/SIGINT into a flag the training loop acts on at a step boundary.

A signal arrives while the state may be mid-update, so the handler only records it; the
manager saves at the next ``step()`` (a consistent state), then restores the previous
handlers and raises the signal again, so the process ends as it would have. A second
signal acts at once, and so does the first when no step boundary comes within ``grace``
seconds (a long evaluation, or a loop that ended without ``close()``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from ..errors import InvalidInputError

__all__ = ["PREEMPTION_SIGNALS", "PreemptionWatcher"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """Signal handlers that set :attr:`pending`; install from the main thread only."""

    def __init__(self, grace: float = 60.0) -> None:
        self.grace = grace
        self.pending: int | None = None  # the signal waiting for a step boundary
        self._previous_handlers: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise InvalidInputError("save_on_preemption installs signal handlers: create the manager in the main thread")
        for sig in PREEMPTION_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self.on_signal)

    def uninstall(self) -> None:
        """Put the previous handlers back (from the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def take(self) -> int | None:
        """The pending signal, now no longer pending."""
        signum, self.pending = self.pending, None
        return signum

    def let_act(self, signum: int | None) -> None:
        """Uninstall, then raise ``signum`` (if any) so that it takes its course."""
        self.uninstall()
        if signum is not None:
            signal.raise_signal(signum)

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.pending == signum:
            # Asked twice: stop waiting for a step boundary and let the signal act now.
            self.pending = None
            self.let_act(signum)
            return
        self.pending = signum
        # No step boundary within the grace period: send the signal again, which then acts at once.
        timer = threading.Timer(self.grace, self._signal_again, (signum,))
        timer.daemon = True
        timer.start()

    def _signal_again(self, signum: int) -> None:
        if self.pending == signum:
            os.kill(os.getpid(), signum)

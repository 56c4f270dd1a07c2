"""Background verification for the CheckpointManager: ``verify_every=N`` saves.

Every N-th commit the manager makes is handed to one worker thread, which runs
:meth:`ckptvcs.Repo.verify` on it (a fresh process restores the commit, re-hashes every
chunk and runs the optional ``module:func`` check); the loop never waits for it. The
outcome is recorded by ``verify`` itself (``verified/<commit id>`` and the audit log);
a failure also becomes a RuntimeWarning at the manager's next call.

At most one verification runs and at most one waits: when a newer commit is due while
one is already waiting, the newer one takes its place (the skipped commit is named in
:attr:`BackgroundVerifier.skipped`), so a verification slower than N saves cannot pile up
work, or hold back data, without bound.

The commits running or waiting are *held*: :meth:`BackgroundVerifier.holding` names them
and the manager adds them to what its retention must not prune, so neither retention nor
the automatic gc can release the data of a commit while its verification reads it.
Once verified, a held commit is an ordinary one again and the next save's retention may
prune it.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

from ..errors import CkptvcsError, InvalidInputError, VerifyFailedError
from ..verify import check_spec

if TYPE_CHECKING:
    from ..repo import Repo

__all__ = ["BackgroundVerifier"]


class BackgroundVerifier:
    """Verifies every ``every``-th saved commit of ``repo`` on a background thread."""

    def __init__(self, repo: Repo, every: int, check: str | None = None, timeout: float | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInputError(f"verify_every must be a positive integer (0 disables), got {every!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise InvalidInputError(f"verify_timeout must be a positive number of seconds, got {timeout!r}")
        self.repo = repo
        self.every = every
        self.check = check_spec(check)
        self.timeout = timeout
        self.results: dict[str, dict[str, Any]] = {}
        """Commit id -> outcome: the verification record, or ``{"ok": False, "error": ...}`` when
        verify could not run at all."""
        self.skipped: list[str] = []
        """Commits that were due but replaced by a newer one before their turn."""
        self._saves = 0
        self._cond = threading.Condition()
        self._running: str | None = None
        self._waiting: str | None = None
        self._failures: list[str] = []  # warnings not yet given to the caller
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- the manager's calls -------------------------------------------------------

    def saved(self, commit_id: str) -> None:
        """A commit was made: queue it when it is the N-th since the last one queued."""
        self._saves += 1
        if self._saves % self.every == 0:
            self.submit(commit_id)

    def submit(self, commit_id: str) -> None:
        """Queue ``commit_id`` for verification (held from now on); never blocks on a verification."""
        with self._cond:
            if self._closing:
                return
            if self._waiting is not None and self._waiting != commit_id:
                self.skipped.append(self._waiting)
            self._waiting = commit_id
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="ckptvcs-verify", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def holding(self) -> set[str]:
        """The commits whose verification runs or waits: retention must not prune them."""
        with self._cond:
            return {c for c in (self._running, self._waiting) if c is not None}

    def warn_failures(self, stacklevel: int = 3) -> None:
        """Give each failed verification not reported yet to the caller as a RuntimeWarning."""
        with self._cond:
            failures, self._failures = self._failures, []
        for message in failures:
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def drain(self) -> None:
        """Block until no verification runs or waits."""
        with self._cond:
            while self._running is not None or self._waiting is not None:
                self._cond.wait()

    def close(self) -> None:
        """Finish the verifications queued, then stop the worker. Idempotent."""
        self.drain()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- the worker ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closing:
                    self._cond.wait()
                if self._waiting is None:
                    return
                commit_id, self._running, self._waiting = self._waiting, self._waiting, None
            outcome, failure = self._verify(commit_id)
            with self._cond:
                self.results[commit_id] = outcome
                if failure is not None:
                    self._failures.append(failure)
                self._running = None
                self._cond.notify_all()

    def _verify(self, commit_id: str) -> tuple[dict[str, Any], str | None]:
        """Run one verification; returns its outcome and the warning to give (None: it passed)."""
        what = f"background verification of commit {commit_id[:12]}"
        try:
            record = self.repo.verify(commit_id, check=self.check, timeout=self.timeout)
        except VerifyFailedError as err:  # recorded by verify: verified/<id> and the audit log
            return dict(err.record), f"{what} failed (recorded; training goes on): {err}"
        except CkptvcsError as err:
            return {"ok": False, "error": str(err)}, f"{what} could not run (training goes on): {err}"
        except Exception as err:  # noqa: BLE001 (a background thread must never take the loop down)
            return ({"ok": False, "error": f"{type(err).__name__}: {err}"},
                    f"{what} could not run (training goes on): {type(err).__name__}: {err}")
        return record, None

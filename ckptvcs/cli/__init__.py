"""The ``ckptvcs`` command: a thin click layer over :class:`ckptvcs.Repo`, one module per area.

Commands parse arguments, call the library and print; no logic lives here. ``_app`` holds the
group, the error-to-exit-code mapping and the shared output helpers; each area module
registers its commands on the group when imported:

- ``data``: init, commit, checkout, export (the commands that touch tensor values)
- ``history``: log, best, show, diff
- ``refnames``: branch, tag, reflog
- ``maintenance``: stats, gc, fsck, repair, status, prune
- ``report``: report (HTML page or JSON summary)
- ``trust``: verify, verify-tag, keygen, trust, protect, unprotect, audit (docs/audit.md)
- ``remote``: remote, push, fetch, pull, clone, archive (and fsck --remote)

Start-up is kept light: torch is imported only by commands that read or write tensor values.
"""

from __future__ import annotations

import os

from . import data, history, maintenance, refnames, remote, report, trust  # noqa: F401  (each registers its commands)
from ._app import cli

__all__ = ["main", "cli"]


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="ckptvcs")

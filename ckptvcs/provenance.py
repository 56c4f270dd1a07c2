"""Where a checkpoint came from: author, time, code version and environment.

Captured automatically on every commit so a checkpoint can be traced to the code
and software that produced it (audit of released models). Everything here is best
effort and cheap: a missing git or a non-checkout directory yields ``None``, never an
error, and the environment is computed once per process.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

__all__ = ["utc_now", "default_author", "code_version", "environment"]


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def default_author() -> str:
    """``$CKPTVCS_AUTHOR``, else ``user@host``."""
    configured = os.environ.get("CKPTVCS_AUTHOR")
    if configured:
        return configured
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _git(cwd: str, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(cwd: str | None = None) -> dict[str, Any] | None:
    """Git HEAD and dirty flag of the working directory, or None outside a checkout."""
    cwd = cwd or os.getcwd()
    commit = _git(cwd, "rev-parse", "--verify", "-q", "HEAD")
    if not commit:
        return None
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    top = _git(cwd, "rev-parse", "--show-toplevel")
    return {"git_commit": commit, "dirty": bool(status), "path": top}


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    import numpy
    import torch

    from . import __version__

    devices: list[str] = [f"cpu x{os.cpu_count()}"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "ckptvcs": __version__,
        "platform": platform.platform(),
        "executable": sys.executable,
        "hostname": socket.gethostname(),
        "devices": devices,
    }


def environment() -> dict[str, Any]:
    """Versions, platform, host and devices of this process."""
    return dict(_static_environment())

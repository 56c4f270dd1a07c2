"""Where a checkpoint came from: author, time, code version and environment.

Captured automatically on every commit so a checkpoint can be traced to the code
and software that produced it (audit of released models). Everything here is best
effort and cheap: a missing git or a non-checkout directory yields ``None``, never an
error, and the environment is computed once per process.

The code version runs ``git`` only when the working tree may have changed since the
last call in this process (a training loop commits thousands of times; each ``git``
run costs tens of milliseconds). The rule, per working directory: git runs again when
``.git/HEAD``, the branch ref it names (or ``packed-refs``), ``.git/index`` or any
tracked file's size, mtime, ctime or inode differs from the last run, or when a
tracked file's mtime lies within two seconds of that run (a same-tick edit could hide
behind a coarse timestamp; git's "racy" rule). So commits, checkouts, staging and
edits of tracked files are always seen; untracked files never count (as before). In
a checkout of more than 2000 tracked files stat'ing them all costs more than git, so
there, while HEAD, the ref and the index are unchanged, only ``git status`` runs (one
git run instead of three). With ``GIT_DIR``, ``GIT_WORK_TREE``, ``GIT_INDEX_FILE`` or
``GIT_COMMON_DIR`` set, git runs every time.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
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
    """Git HEAD and dirty flag of the working directory, or None outside a checkout.

    Cached per directory while the working tree is unchanged (module docstring).
    """
    cwd = os.path.abspath(cwd or os.getcwd())
    if any(os.environ.get(name) for name in _GIT_LOCATION_VARS):
        return _run_git_code_version(cwd)[0]
    with _cache_lock:
        hit = _code_cache.get(cwd)
    if hit is not None and hit[0] == _tree_state(cwd, hit[2]):
        if hit[1] is None or hit[2] is None or hit[2].tracked is not None:
            return None if hit[1] is None else dict(hit[1])
        # A large checkout: HEAD is unchanged, only dirtiness needs git (one run, not three).
        status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            return {**hit[1], "dirty": bool(status)}
    started = time.time_ns()
    version, layout = _run_git_code_version(cwd)
    state = _tree_state(cwd, layout)
    with _cache_lock:
        if state is not None and not _racy(state, started):
            _code_cache[cwd] = (state, version, layout)
        else:
            _code_cache.pop(cwd, None)
    return None if version is None else dict(version)


_GIT_LOCATION_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR")
_RACY_NS = 2_000_000_000
# Up to this many tracked files, stat'ing them is cheaper than running `git status`
# (measured: ~6 us per file in Python against ~10 ms per git run, plus git's own stats).
_STAT_LIMIT = 2000
_cache_lock = threading.Lock()
# cwd -> (tree state when git last ran, its answer, the checkout's layout)
_code_cache: dict[str, tuple[Any, dict[str, Any] | None, _Layout | None]] = {}


class _Layout:
    """Where a checkout keeps HEAD, refs and index, and which files it tracks."""

    def __init__(self, git_dir: Path, common_dir: Path, top: Path, tracked: list[bytes] | None, index_key: Any) -> None:
        self.git_dir = git_dir
        self.common_dir = common_dir
        self.top = top
        self.tracked = tracked  # None: too many to stat; `git status` tells dirtiness
        self.index_key = index_key


def _run_git_code_version(cwd: str) -> tuple[dict[str, Any] | None, _Layout | None]:
    """Run git: ``(code version or None, layout or None)``."""
    where = _git(cwd, "rev-parse", "--absolute-git-dir", "--path-format=absolute", "--git-common-dir", "--show-toplevel",
                 "--verify", "-q", "HEAD")
    lines = where.splitlines() if where else []
    if len(lines) != 4:
        return None, None
    git_dir, common, top, commit = lines
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    version = {"git_commit": commit, "dirty": bool(status), "path": top}
    if status is None:
        return version, None  # git failed half-way: answer, but do not cache
    git_path = Path(git_dir)
    index_key = _stat_key(git_path / "index")
    tracked: list[bytes] | None = None
    if _index_entries(git_path / "index") <= _STAT_LIMIT:
        listed = _git_bytes(cwd, "ls-files", "-z", "--full-name")
        if listed is None:
            return version, None
        tracked = [name for name in listed.split(b"\0") if name]
    return version, _Layout(git_path, Path(common), Path(top), tracked, index_key)


def _index_entries(path: Path) -> int:
    """The number of entries in a git index (its header: "DIRC", version, count)."""
    try:
        with open(path, "rb") as f:
            header = f.read(12)
    except OSError:
        return 0
    return int.from_bytes(header[8:12], "big") if len(header) == 12 and header[:4] == b"DIRC" else _STAT_LIMIT + 1


def _git_bytes(cwd: str, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _stat_key(path: Path | bytes) -> tuple[int, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _tree_state(cwd: str, layout: _Layout | None) -> Any:
    """Everything whose change means git must run again; None when it cannot be told."""
    if layout is None:
        # Not a checkout: cache only while no .git exists here or above (git init would add one).
        here = Path(cwd)
        if any((folder / ".git").exists() for folder in (here, *here.parents)):
            return None
        return ("no-checkout",)
    head = _read(layout.git_dir / "HEAD")
    if head is None:
        return None
    ref = head.strip().removeprefix(b"ref: ") if head.startswith(b"ref: ") else None
    refs = (_stat_key(layout.common_dir / ref.decode(errors="replace")) if ref else None,
            _stat_key(layout.common_dir / "packed-refs"))
    index = _stat_key(layout.git_dir / "index")
    if index != layout.index_key:
        return None  # the tracked-file list is stale: run git
    if layout.tracked is None:
        return (head, refs, index, None)
    top = bytes(layout.top)
    files = tuple(_stat_key(os.path.join(top, name)) for name in layout.tracked)
    return (head, refs, index, files)


def _racy(state: Any, started_ns: int) -> bool:
    """A tracked file changed too close to the git run to trust its timestamp.

    (The index and refs need no such care: git replaces them by rename, so their
    inode changes with every write.)
    """
    if state == ("no-checkout",):
        return False
    files = state[3] or ()
    return any(key is not None and key[2] >= started_ns - _RACY_NS for key in files)


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

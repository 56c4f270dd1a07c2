"""Recovery readiness: restore a commit in a fresh process, re-hash it, run a check, record it.

:func:`run_child` starts ``python -m ckptvcs._verify_child`` (the same interpreter, the
parent's import path), which opens the repository anew, loads the whole commit (every
chunk is decoded and checked against its BLAKE3 id, as every load is) and, when asked,
imports ``module:func`` and calls it with the loaded state; it writes what happened to
a result file. Nothing crosses the process boundary but JSON: the check is named, never
pickled. The parent turns the result into a record, ``verified/<commit id>`` (the last
verification of that commit, written atomically; docs/format.md "Verification records").
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _fs, layout
from .backends import Backend, backend_of
from .errors import CorruptObjectError, UsageError, VerifyFailedError
from .objects import canonical_json

if TYPE_CHECKING:
    from .repo import Repo

__all__ = ["verify_commit", "VERIFIED_DIR", "RECORD_VERSION", "run_child", "write_record", "read_record", "read_records",
           "check_spec"]

VERIFIED_DIR = layout.VERIFIED
RECORD_VERSION = 1
_MAX_RECORD = 1 << 20
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TAIL = 2000  # characters of a crashed child's stderr kept in the record


def verify_commit(repo: Repo, commit_id: str, check: str | None, timeout: float | None, who: str) -> dict[str, Any]:
    """Restore ``commit_id`` in a fresh process, record the outcome, and return the record.

    Raises VerifyFailedError (after recording) when the restore or the check failed.
    """
    check = check_spec(check)
    if repo.backend.local_root() is None:
        raise UsageError(f"verify restores the commit in a fresh process, which opens the repository from a local "
                         f"directory; {repo.backend.describe()} has none (verify a local clone instead)")
    when = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    result = run_child(repo.root, commit_id, check, timeout)
    record = {
        "version": RECORD_VERSION,
        "commit": commit_id,
        "time": when,
        "who": who,
        "ok": bool(result.get("ok")),
        "seconds": result.get("seconds"),
        "import_seconds": result.get("import_seconds"),
        "restore_seconds": result.get("restore_seconds"),
        "check_seconds": result.get("check_seconds"),
        "bytes": result.get("bytes"),
        "chunks": result.get("chunks"),
        "check": check,
        "metrics": result.get("metrics") or {},
        "error": result.get("error"),
        "error_type": result.get("error_type"),
        "chunk_id": result.get("chunk_id"),
    }
    write_record(repo.backend, commit_id, record)
    repo.audit("verify", commit=commit_id, ok=record["ok"], check=check, error=record["error"],
               restore_seconds=record["restore_seconds"])
    if not record["ok"]:
        chunk = record["chunk_id"] if isinstance(record["chunk_id"], str) else None
        raise VerifyFailedError(f"verification of commit {commit_id[:12]} failed: {record['error']}", commit_id,
                                record, chunk)
    return record


def check_spec(spec: str | None) -> str | None:
    """Validate a ``module:func`` check name (None: no check)."""
    if spec is None:
        return None
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise UsageError(f"a check is named as module:function (e.g. evals.holdout:run), got {spec!r}")
    return spec


def _child_env() -> dict[str, str]:
    """The parent's environment, with its import path and the working directory (as ``python -m``
    has it; the ``ckptvcs`` script does not): a check the caller can import, the child can."""
    env = dict(os.environ)
    paths = [os.getcwd(), *(p or os.getcwd() for p in sys.path)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run_child(root: Path, commit_id: str, check: str | None, timeout: float | None) -> dict[str, Any]:
    """Restore ``commit_id`` in a fresh interpreter; returns its result (``ok``, timings, ``error``...)."""
    with tempfile.TemporaryDirectory(prefix="ckptvcs-verify-") as scratch:
        result_path = Path(scratch) / "result.json"
        argv = [sys.executable, "-m", "ckptvcs._verify_child", str(root), commit_id, str(result_path)]
        if check:
            argv.append(check)
        started = time.perf_counter()
        try:
            proc = subprocess.run(argv, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return _failed(f"the restore did not finish within {timeout:g} s (timeout)", "Timeout", started)
        except OSError as err:
            return _failed(f"cannot start {sys.executable}: {err.strerror}", "OSError", started)
        try:
            result: dict[str, Any] = json.loads(result_path.read_bytes())
        except (OSError, ValueError):
            tail = proc.stderr.decode("utf-8", "replace").strip()[-_TAIL:]
            last = tail.splitlines()[-1] if tail else "no output"
            return _failed(f"the restoring process exited with status {proc.returncode} without a result: {last}",
                           "ChildCrashed", started, stderr=tail)
        result["seconds"] = round(time.perf_counter() - started, 6)
        return result


def _failed(error: str, error_type: str, started: float, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": error, "error_type": error_type, "seconds": round(time.perf_counter() - started, 6),
            **extra}


def clean_metrics(value: Any) -> dict[str, float | str]:
    """A check's return value as metrics: a dict of names to numbers (NaN/inf as strings, as commits do).

    Raises TypeError naming what is wrong (the child reports it as the check's failure).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"the check returned {type(value).__name__}, not a dict of metrics")
    metrics: dict[str, float | str] = {}
    for name, number in value.items():
        if not isinstance(name, str) or isinstance(number, bool) or not isinstance(number, (int, float)):
            raise TypeError(f"metric {name!r} is not a name with a number (got {type(number).__name__})")
        x = float(number)
        metrics[name] = x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    return metrics


def write_record(where: Backend | str | os.PathLike[str], commit_id: str, record: dict[str, Any]) -> None:
    """Store ``record`` as ``verified/<commit id>`` through the backend (an atomic, durable put)."""
    with _fs.storage_errors(f"recording the verification of commit {commit_id[:12]}"):
        backend_of(where).put(layout.join(VERIFIED_DIR, commit_id), canonical_json(record) + b"\n")


def read_record(where: Backend | str | os.PathLike[str], commit_id: str) -> dict[str, Any] | None:
    """The last verification record of a commit, or None. A damaged record raises CorruptObjectError."""
    if not _HEX_ID.match(commit_id):
        return None
    key = layout.join(VERIFIED_DIR, commit_id)
    try:
        record = json.loads(backend_of(where).get(key, max_size=_MAX_RECORD))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, RecursionError, CorruptObjectError) as err:
        raise CorruptObjectError(f"verification record {key} is unreadable: {str(err)[:200]}", path=key) from None
    if not isinstance(record, dict) or not isinstance(record.get("ok"), bool) or record.get("commit") != commit_id:
        raise CorruptObjectError(f"verification record {key} is malformed", path=key)
    return record


def read_records(where: Backend | str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(commit id → last verification record, commit id → why its record is damaged)``."""
    backend = backend_of(where)
    try:
        names = [key.rsplit("/", 1)[-1] for key in backend.list(VERIFIED_DIR)]
    except (FileNotFoundError, NotADirectoryError):
        return {}, {}
    except CorruptObjectError as err:  # verified/ is a link or a special file: nothing in it is read
        return {}, {VERIFIED_DIR: f"{VERIFIED_DIR}/ is unreadable: {str(err)[:200]}"}
    records: dict[str, dict[str, Any]] = {}
    damaged: dict[str, str] = {}
    for name in names:
        if _HEX_ID.match(name):
            try:
                record = read_record(backend, name)
            except CorruptObjectError as err:
                damaged[name] = str(err)
                continue
            if record is not None:
                records[name] = record
    return records, damaged

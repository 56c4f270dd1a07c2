"""The fresh process of ``Repo.verify``: ``python -m ckptvcs._verify_child ROOT COMMIT RESULT [module:func]``.

Opens the repository, loads the whole commit onto the CPU (every chunk verified
against its BLAKE3 id), runs the check if one is named, and writes a JSON result to
RESULT: ``ok``, ``import_seconds`` (torch), ``restore_seconds``, ``check_seconds``, ``bytes``, ``chunks``,
``tensors``, ``metrics``, ``error``, ``error_type``, ``chunk_id``. It exits 0 whenever
it could write the result (the result says whether the commit passed).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ckptvcs.errors import CkptvcsError, IntegrityError
from ckptvcs.repo import Repo
from ckptvcs.state import blob_kinds
from ckptvcs.verify import clean_metrics


def _restore(root: str, commit_id: str, result: dict[str, Any]) -> Any:
    with Repo.open(root) as repo:
        manifest = repo.manifest(commit_id)
        result["bytes"] = sum(int(b["nbytes"]) for b in manifest.blobs)
        result["chunks"] = sum(len(b["chunks"]) for b in manifest.blobs)
        started = time.perf_counter()
        if "torch" in blob_kinds(manifest.root).values():
            importlib.import_module("torch")  # timed apart: the restore time is the repository's part
        result["import_seconds"] = round(time.perf_counter() - started, 6)
        started = time.perf_counter()
        state = repo.load(commit_id, map_location="cpu")
        result["restore_seconds"] = round(time.perf_counter() - started, 6)
        return state


def _run_check(spec: str, state: Any, result: dict[str, Any]) -> None:
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise LookupError(f"cannot import the check {spec}: {err}") from None
    started = time.perf_counter()
    metrics = func(state)
    result["check_seconds"] = round(time.perf_counter() - started, 6)
    result["metrics"] = clean_metrics(metrics)


def main(argv: list[str]) -> int:
    root, commit_id, result_path = argv[:3]
    check = argv[3] if len(argv) > 3 else None
    result: dict[str, Any] = {"ok": False, "metrics": {}, "error": None, "error_type": None, "chunk_id": None}
    stage = "restore"
    try:
        state = _restore(root, commit_id, result)
        if check:
            stage = "check"
            _run_check(check, state, result)
        result["ok"] = True
    except IntegrityError as err:
        result.update(error=str(err), error_type=type(err).__name__, chunk_id=err.chunk_id)
    except CkptvcsError as err:
        result.update(error=str(err), error_type=type(err).__name__)
    except Exception as err:  # noqa: BLE001 (the user's check may raise anything: that is its verdict)
        where = f"the check {check} failed" if stage == "check" else "the restore failed"
        line = str(err).splitlines()[0][:300] if str(err) else ""
        result.update(error=f"{where}: {type(err).__name__}: {line}", error_type=type(err).__name__,
                      traceback=traceback.format_exc()[-2000:])
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The architecture contracts of pyproject.toml, from the side that static checks cannot see.

scripts/check.sh runs lint-imports on these contracts (CI runs it before pytest). Two gaps
are closed here: modules that no layer names are unconstrained (so every module must be
placed), and torch imported through ckptvcs._lazy.LazyModule is invisible to import-linter
(so the torch-free modules are imported for real and torch must stay unloaded).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckptvcs

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _contract(contract_id: str) -> dict:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    (found,) = [c for c in config["contracts"] if c["id"] == contract_id]
    return found


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(ckptvcs.__path__, "ckptvcs.") if m.name != "ckptvcs.__main__"]


def test_every_module_has_a_layer() -> None:
    named = {name.strip() for layer in _contract("layers")["layers"] for name in layer.split("|")}
    unplaced = [m for m in _modules() if not any(m == n or m.startswith(n + ".") for n in named)]
    assert not unplaced, f"add these modules to a layer in pyproject.toml [tool.importlinter]: {unplaced}"


def test_torch_free_modules_load_no_torch() -> None:
    modules = _contract("torch-free-storage")["source_modules"]
    code = (
        f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"importing {modules} loaded torch"

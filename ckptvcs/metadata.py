"""The metadata of a commit (message, step, epoch, metrics, config, data and code version),
validated before anything is written.

One set of rules for :meth:`ckptvcs.Repo.commit`, :meth:`ckptvcs.Repo.publish` and the
CheckpointManager (which commits through them): integers and metrics follow
:mod:`ckptvcs._validate`; ``config`` and a given ``code_version`` must be plain JSON that
canonical hashing accepts, nested no deeper than an object may be.
"""

from __future__ import annotations

import json
from typing import Any

from . import provenance
from ._validate import metrics, optional_int, require_str
from .errors import UnsupportedValueError
from .objects import MAX_JSON_DEPTH, canonical_json, json_depth_exceeds

__all__ = ["commit_body", "json_value"]


def commit_body(
    message: Any, step: Any, epoch: Any, metrics_: Any, config: Any, data_version: Any, code_version: Any
) -> dict[str, Any]:
    """The validated metadata fields of a commit object (before any write)."""
    return {
        "message": require_str(message, "message"),
        "step": optional_int(step, "step"),
        "epoch": optional_int(epoch, "epoch"),
        "metrics": metrics(metrics_),
        "config": json_value(config, "config"),
        "data_version": None if data_version is None else require_str(data_version, "data_version"),
        "code_version": provenance.code_version() if code_version is True
        else (None if code_version in (None, False) else json_value(dict(code_version), "code_version")),
    }


def json_value(value: Any, name: str) -> Any:
    """Check that ``value`` is plain JSON (what canonical hashing accepts); returns it."""
    if json_depth_exceeds(value, MAX_JSON_DEPTH - 2):
        raise UnsupportedValueError(name, f"nests deeper than {MAX_JSON_DEPTH - 2} levels")
    try:
        canonical_json(value)
    except (TypeError, ValueError) as err:
        raise UnsupportedValueError(name, f"must be plain JSON (dict, list, str, number, bool, None): {err}") from None
    return json.loads(json.dumps(value))

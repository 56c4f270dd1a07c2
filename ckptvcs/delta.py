"""Choosing delta bases: for each chunk of a new commit, the chunk at the same place in the parent.

"The same place" is the same tensor (found by the key path of the first tensor that
uses the blob, so a state whose structure shifted still pairs tensors by name) and the
same offset within it. Blobs with no tensor path (large ``bytes`` values) pair by
position. A pair is only proposed when the element types agree; the chunk store then
checks lengths and the delta chain bound before it tries the delta, and keeps the
delta only when it is the smallest verified encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .state import iter_tensors

__all__ = ["parent_bases", "first_paths"]


def first_paths(root: Any) -> dict[int, str]:
    """Blob index → key path of the first tensor or array that uses it."""
    paths: dict[int, str] = {}
    for path, _kind, body in iter_tensors(root):
        blob = body.get("blob") if isinstance(body, dict) else None
        if isinstance(blob, int) and not isinstance(blob, bool):
            paths.setdefault(blob, path)
    return paths


def parent_bases(
    parent_root: Any, parent_blobs: Sequence[dict[str, Any]], root: Any, dtypes: Sequence[str], *,
    parent_paths: Mapping[int, str] | None = None, paths: Mapping[int, str] | None = None,
) -> list[list[bytes] | None]:
    """For each blob of the new state (``root``, ``dtypes``): the parent's chunk ids to delta against.

    ``parent_root`` and ``parent_blobs`` are the parent commit's manifest. Entry ``i``
    is None when blob ``i`` has no counterpart in the parent. ``parent_paths`` and
    ``paths``, when given, are :func:`first_paths` of the two roots, already computed
    (a commit walks its tree once and keeps the result for the next commit).
    """
    parent_paths = first_paths(parent_root) if parent_paths is None else parent_paths
    parent_by_path = {path: index for index, path in parent_paths.items()}
    paths = first_paths(root) if paths is None else paths
    result: list[list[bytes] | None] = []
    for index, dtype in enumerate(dtypes):
        match = parent_by_path.get(paths[index]) if index in paths else None
        if match is None and index not in paths and index < len(parent_blobs):
            match = index  # a bytes value: pair by position
        if match is None or not 0 <= match < len(parent_blobs) or parent_blobs[match].get("dtype") != dtype:
            result.append(None)
            continue
        result.append([bytes.fromhex(c) for c in parent_blobs[match].get("chunks", [])])
    return result

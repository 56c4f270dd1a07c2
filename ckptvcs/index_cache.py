"""Where the chunk index of a store without local files lives: a per-user, per-host cache.

A repository on object storage (S3, any fsspec URL) has no local folder for its LMDB chunk
index, which is derived data. Instead of rebuilding it in a fresh temporary folder on every
open (a walk of every pack: docs/scale.md), each host keeps one index per store in
``$CKPTVCS_INDEX_CACHE`` (default ``$XDG_CACHE_HOME/ckptvcs/index``, i.e.
``~/.cache/ckptvcs/index``), in a folder named by a hash of the store's identity: its URL
and the ``id`` of its config.json. The index records which packs it has read
(``store_index``), so a reopen lists ``packs/`` once and reads only the new packs' index
objects. Every process of the host (the ranks of a job) shares it: LMDB serialises writers
between processes and its readers never block; what one rank indexes, the others find.

The cache is never trusted over the store: every chunk read is verified against its id,
rows of deleted packs are dropped at each sync, and a cache that does not open or names
another store is discarded and rebuilt. ``CKPTVCS_INDEX_CACHE=off`` (or a cache folder that
cannot be created) gives a private temporary index per handle, removed at close. Keep the
cache on a local disk: LMDB does not work on network file systems. A memory store (its data dies with the
process) gets a temporary one unless ``CKPTVCS_INDEX_CACHE`` names a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import _fs, layout
from .backends import Backend

__all__ = ["open_cache", "is_temporary", "discard_index", "ENV"]

ENV = "CKPTVCS_INDEX_CACHE"
_TEMP_PREFIX = "ckptvcs-index-"
_IDENTITY = "store.json"


def _base(backend: Backend) -> Path | None:
    """The cache's root folder, or None for a temporary index."""
    value = os.environ.get(ENV, "")
    if value == "off" or (not value and backend.describe().startswith("memory:")):
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ckptvcs" / "index"


def _identity(backend: Backend, config: dict[str, Any]) -> dict[str, str]:
    return {"store": backend.describe(), "id": str(config.get("id", ""))}


def open_cache(backend: Backend, config: dict[str, Any]) -> Path:
    """The local folder holding the chunk index (in ``index/``) of the store ``backend``.

    The same folder for every process of this user that opens this store; a temporary
    one (see the module docstring) when caching is off. A folder whose identity record
    names another store (a hash collision, a hand-copied folder) has its index discarded.
    """
    base = _base(backend)
    if base is None:
        return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    identity = _identity(backend, config)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    root = base / digest
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = root / _IDENTITY
        try:
            found = json.loads(record.read_text())
        except (OSError, ValueError):
            found = None
        if found != identity:
            if found is not None:
                discard_index(root)
            _fs.atomic_write(record, json.dumps(identity, sort_keys=True).encode())
    except OSError:
        # No usable cache here (a read-only home, a full disk): a private index still works.
        return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    return root


def is_temporary(root: Path) -> bool:
    """Whether ``root`` is a private temporary index folder (removed when its Repo closes)."""
    return root.name.startswith(_TEMP_PREFIX)


def discard_index(root: Path) -> None:
    """Remove the cached index under ``root`` (it is rebuilt from the store on next use).

    Renamed aside first, so a process opening it meanwhile finds the old one or none;
    processes that still have the old one open keep reading their copy until they reopen.
    """
    index = root / layout.INDEX
    parked = root / _fs.temp_name(layout.INDEX_OLD_PREFIX)
    try:
        os.rename(index, parked)
    except FileNotFoundError:
        return
    _fs.remove_tree(parked)

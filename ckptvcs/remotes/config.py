"""Named remotes, kept in the repository's config.json under ``"remotes"``.

``{"remotes": {"origin": {"url": "s3://bucket/prefix", "endpoint_url": "http://..."}}}``;
``endpoint_url`` is optional (S3-compatible servers; else ``AWS_ENDPOINT_URL`` or AWS's own).
Credentials are never stored: they come from the usual AWS variables and files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptvcs import _fs
from ckptvcs.backends.base import Backend
from ckptvcs.errors import CorruptObjectError, RefExistsError, RemoteNotFoundError, UsageError

if TYPE_CHECKING:
    from ckptvcs.repo import Repo

__all__ = ["Remote", "list_remotes", "add_remote", "remove_remote", "get_remote", "open_backend", "RemoteNotFoundError"]

_MAX_CONFIG = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint_url: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"url": self.url}
        if self.endpoint_url:
            out["endpoint_url"] = self.endpoint_url
        return out


def open_backend(url: str, endpoint_url: str | None = None) -> Backend:
    """The backend for a remote URL: s3://bucket/prefix, memory://name, or a local path."""
    from ckptvcs.backends.fsspec_backend import FsspecBackend

    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return FsspecBackend(url, **options)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"invalid remote name {name!r}: letters, digits, '.', '_' and '-' (at most 64)")
    return name


def _read_config(repo: Repo) -> dict[str, Any]:
    """config.json as it is on disk now (another process may have added a remote since open)."""
    with _fs.storage_errors("reading config.json"):
        config = json.loads(_fs.read_record(repo.root / "config.json", _MAX_CONFIG))
    if not isinstance(config, dict):
        raise CorruptObjectError(f"{repo.root}/config.json is not a JSON object")
    return config


def list_remotes(repo: Repo) -> dict[str, Remote]:
    """The configured remotes, by name (read from config.json each time)."""
    raw = _read_config(repo).get("remotes") or {}
    found = {}
    if isinstance(raw, dict):
        for name, value in raw.items():
            if isinstance(value, dict) and isinstance(value.get("url"), str):
                endpoint = value.get("endpoint_url")
                found[name] = Remote(name, value["url"], endpoint if isinstance(endpoint, str) else None)
    return found


def get_remote(repo: Repo, name: str) -> Remote:
    remote = list_remotes(repo).get(name)
    if remote is None:
        known = ", ".join(sorted(list_remotes(repo))) or "none"
        raise RemoteNotFoundError(f"no remote named {name!r} (configured: {known}); add one with `ckptvcs remote add`")
    return remote


def _write_remotes(repo: Repo, remotes: dict[str, Remote]) -> None:
    """Rewrite config.json with ``remotes`` (atomic: temp, fsync, rename, fsync dir)."""
    path = repo.root / "config.json"
    with _fs.storage_errors("updating config.json"):
        config = _read_config(repo)
        if remotes:
            config["remotes"] = {name: r.to_json() for name, r in sorted(remotes.items())}
        else:
            config.pop("remotes", None)
        _fs.atomic_write(path, json.dumps(config, indent=2).encode() + b"\n")
    repo.config = config


def set_lazy_remote(repo: Repo, name: str) -> None:
    """Mark the repository a lazy clone of remote ``name``: loads fetch the chunks they lack."""
    from ckptvcs.remotes.lazy import LazyChunkSource

    get_remote(repo, name)
    path = repo.root / "config.json"
    with _fs.storage_errors("updating config.json"):
        config = _read_config(repo)
        config["lazy_remote"] = name
        _fs.atomic_write(path, json.dumps(config, indent=2).encode() + b"\n")
    repo.config = config
    repo.chunk_source = LazyChunkSource(repo, name)


def add_remote(repo: Repo, name: str, url: str, endpoint_url: str | None = None) -> Remote:
    """Configure remote ``name`` at ``url``; an existing name raises RefExistsError."""
    _check_name(name)
    if not isinstance(url, str) or not url.strip():
        raise UsageError("a remote needs a URL (s3://bucket/prefix, a path, or memory://name)")
    remotes = list_remotes(repo)
    if name in remotes:
        raise RefExistsError(f"remote {name!r} already exists ({remotes[name].url}); remove it first")
    remotes[name] = Remote(name, url.strip(), endpoint_url or None)
    _write_remotes(repo, remotes)
    return remotes[name]


def remove_remote(repo: Repo, name: str) -> None:
    """Forget remote ``name`` and its remote-tracking refs (the remote itself is untouched)."""
    remotes = list_remotes(repo)
    if name not in remotes:
        get_remote(repo, name)
    del remotes[name]
    for branch in repo.refs.names(f"remotes/{name}"):
        ref = f"refs/remotes/{name}/{branch}"
        value = repo.refs.read_raw(ref)
        if value is not None:
            repo.refs.remove_if_equals(ref, value, who="ckptvcs", message=f"remote remove {name}")
    _write_remotes(repo, remotes)
    from ckptvcs.remotes.policy import clear_policy, get_policy

    policy = get_policy(repo)
    if policy is not None and policy.remote == name:  # a policy naming a remote that is gone would fail each use
        clear_policy(repo)

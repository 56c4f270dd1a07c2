"""Remotes: push, fetch, pull and clone against object storage (docs/remotes.md).

Library first: ``push(repo, "origin")``, ``fetch(repo, "origin")``, ``pull(repo, "origin")``,
``clone(url, path)``, and named remotes in the repository's config (``add_remote``...).
"""

from ckptvcs.remotes.config import Remote, add_remote, get_remote, list_remotes, open_backend, remove_remote
from ckptvcs.remotes.layout import RemoteStore
from ckptvcs.remotes.transfer import FetchReport, PushReport, clone, connect, fetch, pull, push

__all__ = [
    "Remote", "add_remote", "get_remote", "list_remotes", "remove_remote", "open_backend", "RemoteStore",
    "PushReport", "FetchReport", "push", "fetch", "pull", "clone", "connect",
]

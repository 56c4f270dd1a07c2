"""Remotes: push, fetch, pull and clone against object storage (docs/remotes.md).

Library first: ``push(repo, "origin")``, ``fetch(repo, "origin")``, ``pull(repo, "origin")``,
``clone(url, path)``, and named remotes in the repository's config (``add_remote``...).
"""

from ckptvcs.remotes import lazy as _lazy
from ckptvcs.remotes.config import Remote, add_remote, get_remote, list_remotes, open_backend, remove_remote
from ckptvcs.remotes.layout import RemoteStore
from ckptvcs.remotes.tiers import ArchiveReport, TierSummary, archive, archive_commits, where
from ckptvcs.remotes.transfer import FetchReport, PushReport, clone, connect, fetch, pull, push
from ckptvcs.repo import CHUNK_SOURCE_FACTORIES

if _lazy._factory not in CHUNK_SOURCE_FACTORIES:  # a Repo opened on a lazy clone fetches what it lacks
    CHUNK_SOURCE_FACTORIES.append(_lazy._factory)

__all__ = [
    "Remote", "add_remote", "get_remote", "list_remotes", "remove_remote", "open_backend", "RemoteStore",
    "PushReport", "FetchReport", "push", "fetch", "pull", "clone", "connect", "archive", "archive_commits", "ArchiveReport",
    "TierSummary", "where",
]

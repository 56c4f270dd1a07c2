"""Every name inside a repository, in one place (docs/format.md, section 2).

A backend stores *keys* (relative POSIX paths); this module says which key holds what,
so no other module spells ``"objects/"`` or ``"refs/heads"`` itself. Functions return
keys; callers that still need a local path join them to the repository root.
Pure string functions: no I/O, no imports from the rest of the package.
"""

from __future__ import annotations

__all__ = [
    "CONFIG", "HEAD", "GITIGNORE", "LOCK", "LOCK_GATE", "OBJECTS", "PACKS", "TMP", "INDEX", "REFS", "HEADS", "TAGS",
    "LOGS", "DELETED_LOGS", "PRUNED", "STAGED", "FSCK_RECORD", "STATS_CACHE",
    "STATS_CACHE_COMMITS", "CATALOG_CACHE", "INDEX_REBUILT", "INDEX_REBUILD_PREFIX",
    "INDEX_OLD_PREFIX", "RECORDS", "AUDIT", "VERIFIED", "KEYS",
    "TOP_LEVEL", "FILES", "INIT_FOLDERS", "LOCK_SUFFIX", "TMP_SUFFIX", "PACK_SUFFIX", "PACK_INDEX_SUFFIX",
    "object_key", "object_folder", "pack_key", "pack_name", "pack_index_key", "ref_key", "reflog_key", "pruned_key", "staged_key",
    "lock_key", "join",
]

CONFIG = "config.json"
HEAD = "HEAD"
GITIGNORE = ".gitignore"
LOCK = "lock"  # the repository's reader/writer lock (flock)
LOCK_GATE = "lock.gate"  # its fairness gate (see _fs.RepoLock)
OBJECTS = "objects"
PACKS = "packs"
TMP = "tmp"
INDEX = "index"  # the LMDB chunk index: local, derived, rebuildable
INDEX_REBUILT = "index.rebuilt"  # a complete rebuilt index waiting to be swapped in
INDEX_REBUILD_PREFIX = "index.rebuild-"
INDEX_OLD_PREFIX = "index.old-"
REFS = "refs"
HEADS = "refs/heads"
TAGS = "refs/tags"
LOGS = "logs"
DELETED_LOGS = "logs/deleted"
PRUNED = "pruned"
STAGED = "staged"
FSCK_RECORD = "last-fsck.json"
STATS_CACHE = "stats-cache.json"  # derived, rebuildable: what stats() read before (stats_cache.py)
STATS_CACHE_COMMITS = "stats-cache.commits"  # its binary table of reachable commits
CATALOG_CACHE = "catalog-cache.jsonl"  # derived, rebuildable: commit summaries for find/best (catalog_cache.py)
RECORDS = "records"  # operational records: gc.jsonl, restore.jsonl (records.py)
AUDIT = "audit"  # the hash-chained audit log (audit.py)
VERIFIED = "verified"  # the last verification of each commit (verify.py)
KEYS = "keys"  # public keys trusted by `tag -v` (trust.py)

LOCK_SUFFIX = ".lock"  # a ref's lock file, the staging file of its new value
TMP_SUFFIX = ".tmp"  # a temporary file (see _fs.temp_name); never a key
PACK_SUFFIX = ".pack"
PACK_INDEX_SUFFIX = ".idx"  # a pack's index object, in stores without local files (pack_index.py)

# The store's own top-level entries: none may be a symbolic link (docs/format.md, "Symbolic links").
TOP_LEVEL = (CONFIG, HEAD, LOCK, LOCK_GATE, OBJECTS, PACKS, TMP, INDEX, REFS, LOGS, PRUNED, STAGED, RECORDS, AUDIT,
             VERIFIED, KEYS)
FILES = (CONFIG, HEAD, LOCK, LOCK_GATE)  # top-level entries that are files; the others are folders
INIT_FOLDERS = (OBJECTS, PACKS, TMP, INDEX, HEADS, TAGS, LOGS)  # what ``init`` creates


def join(*parts: str) -> str:
    """Keys joined with ``/``."""
    return "/".join(parts)


def object_folder(oid: str) -> str:
    """The fan-out folder of an object id: ``objects/<2 hex>``."""
    return f"{OBJECTS}/{oid[:2]}"


def object_key(oid: str) -> str:
    """``objects/<2 hex>/<62 hex>``."""
    return f"{OBJECTS}/{oid[:2]}/{oid[2:]}"


def pack_key(name: str) -> str:
    """``packs/<name>.pack``."""
    return f"{PACKS}/{name}{PACK_SUFFIX}"


def pack_index_key(name: str) -> str:
    """``packs/<name>.idx``: the pack's index object (written in stores without local files)."""
    return f"{PACKS}/{name}{PACK_INDEX_SUFFIX}"


def pack_name(key: str) -> str:
    """The pack name of a ``packs/<name>.pack`` key (or file name)."""
    return key.rsplit("/", 1)[-1].removesuffix(PACK_SUFFIX)


def ref_key(ref: str) -> str:
    """A ref (``HEAD``, ``refs/heads/<name>``) is its own key; validated by refs.is_valid_ref."""
    return ref


def reflog_key(ref: str) -> str:
    """``logs/<ref>``, or ``logs/deleted/<...>`` for a deleted ref's log set aside."""
    return f"{LOGS}/{ref}"


def pruned_key(commit_id: str) -> str:
    """``pruned/<commit id>``: the record of a commit whose tensor data was released."""
    return f"{PRUNED}/{commit_id}"


def staged_key(manifest_id: str) -> str:
    """``staged/<manifest id>``: the record of a staged, not yet published, state."""
    return f"{STAGED}/{manifest_id}"


def lock_key(key: str) -> str:
    """The lock file of a key updated by compare-and-swap (``refs/heads/main.lock``)."""
    return key + LOCK_SUFFIX

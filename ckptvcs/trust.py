"""Release trust: signed tags and their verification, trusted keys, protected refs (docs/audit.md).

Functions over a Repo (as fsck's are), called through its methods. Every decision
here that matters to an auditor is appended to the audit log by the caller or here.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _fs, layout, signing
from .backends import ConcurrentUpdate
from .errors import (
    BadSignatureError,
    CkptvcsError,
    CorruptObjectError,
    IntegrityError,
    InvalidInputError,
    ProtectedRefError,
    RevisionNotFoundError,
    UsageError,
)
from .refs import check_ref_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .repo import Repo

__all__ = ["KEYS_DIR", "PROTECTED_KEY", "protected_patterns", "protection_of", "guard", "set_protection",
           "trusted_keys", "trust_key", "verify_tag"]

KEYS_DIR = layout.KEYS
PROTECTED_KEY = "protected_refs"  # config.json: a list of patterns over full ref names
_MAX_CONFIG = 1 << 20
_KEY_FILE = re.compile(r"^[0-9a-f]{64}\.pub$")
_MAX_KEYS = 1000
_MAX_KEY_FILE = 16 << 10  # as signing reads a key file


# -- protected refs ------------------------------------------------------------------------


def check_pattern(pattern: str) -> str:
    """A protection pattern: ``refs/heads/...`` or ``refs/tags/...``, glob ``*`` ``?`` allowed."""
    if not isinstance(pattern, str) or not pattern.startswith(("refs/heads/", "refs/tags/")):
        raise UsageError(f"a protected-ref pattern names refs/heads/... or refs/tags/... (e.g. refs/tags/release-*), "
                         f"got {pattern!r}")
    check_ref_name(pattern.replace("*", "x").replace("?", "x")[len("refs/"):], "pattern")
    return pattern


def _config_on_disk(repo: Repo) -> dict[str, Any]:
    """config.json as it is now (another process may have changed the protections since open)."""
    return _parse_config(_read_config(repo))


def _read_config(repo: Repo) -> bytes:
    try:
        return repo.backend.get(layout.CONFIG, max_size=_MAX_CONFIG)
    except (OSError, CorruptObjectError) as err:
        raise CorruptObjectError(f"config.json is unreadable: {str(err)[:200]}", path="config.json") from None


def _parse_config(raw: bytes) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CorruptObjectError(f"config.json is unreadable: {str(err)[:200]}", path="config.json") from None
    if not isinstance(config, dict):
        raise CorruptObjectError("config.json is not a JSON object", path="config.json")
    return config


def protected_patterns(repo: Repo) -> list[str]:
    """The protected-ref patterns of config.json (``protected_refs``), read from disk."""
    patterns = _config_on_disk(repo).get(PROTECTED_KEY, [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise CorruptObjectError(f"config.json: {PROTECTED_KEY} is not a list of patterns", path="config.json")
    return patterns


def protection_of(repo: Repo, ref: str) -> str | None:
    """The first pattern protecting ``ref`` (a full ref name), or None."""
    return next((p for p in protected_patterns(repo) if fnmatch.fnmatchcase(ref, p)), None)


def guard(repo: Repo, ref: str, action: str, override: bool) -> str | None:
    """Refuse ``action`` ("delete", "force-move") on a protected ``ref`` unless ``override``.

    Returns the pattern that was overridden (the caller marks its reflog line), or None.
    """
    pattern = protection_of(repo, ref)
    if pattern is None:
        return None
    if not override:
        raise ProtectedRefError(
            f"{ref} is protected (pattern {pattern}): refusing to {action} it; pass --override-protection "
            "(override_protection=True) to do it anyway, recorded in the reflog and the audit log", ref, pattern)
    repo.audit("protection.override", ref=ref, pattern=pattern, action=action)
    return pattern


def set_protection(repo: Repo, pattern: str, protect: bool) -> list[str]:
    """Add (``protect``) or remove a pattern in config.json atomically; returns the new list."""
    check_pattern(pattern)
    with _fs.storage_errors("updating config.json"):
        while True:  # compare-and-swap: a concurrent change of config.json makes us re-read it
            raw = _read_config(repo)
            config = _parse_config(raw)
            patterns = [p for p in config.get(PROTECTED_KEY, []) if isinstance(p, str)]
            if protect and pattern not in patterns:
                patterns.append(pattern)
            elif not protect:
                if pattern not in patterns:
                    raise UsageError(f"{pattern} is not protected (protected: {', '.join(patterns) or 'nothing'})")
                patterns.remove(pattern)
            config[PROTECTED_KEY] = patterns
            try:
                repo.backend.compare_and_swap(layout.CONFIG, raw, json.dumps(config, indent=2).encode() + b"\n")
                break
            except ConcurrentUpdate:
                continue
    repo.config[PROTECTED_KEY] = patterns
    repo.audit("protect" if protect else "unprotect", pattern=pattern)
    return patterns


# -- keys ------------------------------------------------------------------------------------


def trusted_keys(repo: Repo, extra: Iterable[Any] | None = None) -> dict[str, Ed25519PublicKey]:
    """Key id → public key: ``extra`` (paths, PEM bytes, keys) when given, else ``keys/*.pub``."""
    if extra is not None:
        keys = [signing.load_public_key(k) for k in extra]
        return {signing.key_id(k): k for k in keys}
    try:
        names = sorted(n for n in (k.rsplit("/", 1)[-1] for k in repo.backend.list(KEYS_DIR)) if _KEY_FILE.match(n))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for name in names[:_MAX_KEYS]:
        key = signing.load_public_key(_read_key(repo, layout.join(KEYS_DIR, name)))
        if signing.key_id(key) == name[:-4]:  # a file whose name lies about its key trusts nothing
            found[name[:-4]] = key
    return found


def trust_key(repo: Repo, source: Any) -> str:
    """Copy a public key (PEM path or bytes; a private key file gives its public half) into
    ``keys/<key id>.pub``; returns the key id."""
    try:
        key = signing.load_public_key(source)
    except CkptvcsError:
        key = signing.load_private_key(source).public_key()
    kid = signing.key_id(key)
    with _fs.storage_errors("adding a trusted key"):
        repo.backend.put(layout.join(KEYS_DIR, f"{kid}.pub"), signing.public_pem(key))
    repo.audit("key.trust", key=kid)
    return kid


def _read_key(repo: Repo, key: str) -> bytes:
    """A trusted key file's bytes (at most _MAX_KEY_FILE; the backend refuses links and FIFOs)."""
    try:
        return repo.backend.get(key, max_size=_MAX_KEY_FILE)
    except (OSError, CorruptObjectError) as err:
        raise InvalidInputError(f"cannot read the public key {key}: {err}") from None


# -- verifying a tag -----------------------------------------------------------------------------


def verify_tag(repo: Repo, name: str, trusted: Iterable[Any] | None = None) -> dict[str, Any]:
    """Check tag ``name``'s signature, then re-hash everything it pins; returns what was checked.

    Signature: UnsignedTagError, UntrustedKeyError or BadSignatureError. Data: the tag,
    commit and manifest objects are read (each verified against its BLAKE3 id) and
    every chunk the manifest lists is read and decoded and verified against its id;
    damage raises IntegrityError naming the object or chunk. The outcome is audited.
    """
    ref = f"refs/tags/{check_ref_name(name, 'tag')}"
    tag_id = repo.refs.read_raw(ref)
    if tag_id is None:
        raise RevisionNotFoundError(f"no tag named {name!r}")
    try:
        result = _verify_tag(repo, name, tag_id, trusted)
    except CkptvcsError as err:
        repo.audit("tag.verify", tag=name, tag_object=tag_id, ok=False, error=str(err)[:500],
                   error_type=type(err).__name__)
        raise
    repo.audit("tag.verify", tag=name, tag_object=tag_id, ok=True, key=result["key"], commit=result["commit"])
    return result


def _verify_tag(repo: Repo, name: str, tag_id: str, trusted: Iterable[Any] | None) -> dict[str, Any]:
    _, body = repo.objects.get(tag_id, "tag")
    if not isinstance(body, dict):
        raise CorruptObjectError(f"tag {name!r}: object {tag_id} is not a JSON object", object_id=tag_id)
    key = signing.verify_tag_body(name, body, trusted_keys(repo, trusted))
    if body.get("name") != name:
        raise BadSignatureError(
            f"tag {name!r} points at a tag object signed as {str(body.get('name'))[:100]!r}: "
            "a signed tag was copied under another name", name)
    tag = repo.objects.read_tag(tag_id)
    commit = repo.objects.read_commit(tag.object)
    manifest = repo.manifest(commit.id)
    chunks = nbytes = 0
    for blob_no, blob in enumerate(manifest.blobs):
        where = f"tag {name!r}: blob {blob_no} of commit {commit.id[:12]}"
        for chunk in blob["chunks"]:
            try:
                nbytes += len(repo.chunks.read_chunk(bytes.fromhex(chunk), describe=functools.partial(str, where)))
            except IntegrityError as err:
                err.commit_ids = err.commit_ids or (commit.id,)
                raise
            chunks += 1
    return {"tag": name, "tag_object": tag_id, "commit": commit.id, "manifest": manifest.id, "key": key,
            "chunks": chunks, "bytes": nbytes}

"""The revision grammar: what names a commit, and how a name becomes a commit id.

A revision is ``HEAD``, a full commit id or a unique prefix of one (4 or more hex
digits), a branch, a tag, a full ref name (``refs/...``), each optionally followed by
suffixes ``~N`` (the N-th first-parent ancestor; ``~`` is ``~1``) and ``^N`` (the N-th
parent; ``^`` is ``^1``, ``^0`` the commit itself). A tag (or an id naming a tag object)
resolves to the commit it names. :func:`split_range` parses git's ``A..B``.

Resolution reads the repository only through :class:`Resolver`, a narrow view of refs
and objects: the grammar is tested against a few dicts (tests/test_revisions.py), and
:class:`StoreResolver` is the view over a repository's :class:`~ckptvcs.refs.Refs` and
:class:`~ckptvcs.objects.ObjectStore`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

from .errors import AmbiguousRevisionError, RevisionNotFoundError, UsageError
from .objects import ObjectStore
from .refs import HEAD, Refs, is_valid_ref

__all__ = ["Resolver", "StoreResolver", "resolve", "peel", "split_range"]

_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{4,63}$")
_SHORT_PREFIX = re.compile(r"^[0-9a-fA-F]{1,3}$")
_REV_SUFFIX = re.compile(r"(~\d*|\^\d*)$")


class Resolver(Protocol):
    """What resolving a revision reads: refs, object kinds, tag targets, parents, id prefixes."""

    def follow_head(self) -> tuple[str, str | None]:
        """``(the ref HEAD names, or HEAD when detached; its commit id, or None when unborn)``."""
        ...

    def read_ref(self, ref: str) -> str | None:
        """The raw value of a ref (an id, or ``ref: <name>``), None when it does not exist."""
        ...

    def has_object(self, oid: str) -> bool: ...

    def object_kind(self, oid: str) -> str:
        """``commit``, ``tag``, ``manifest``, ... of an existing object."""
        ...

    def tag_target(self, oid: str) -> str:
        """The object id a tag object names."""
        ...

    def parents(self, commit_id: str) -> tuple[str, ...]: ...

    def ids_with_prefix(self, prefix: str) -> Iterable[str]:
        """Ids of the objects (of any kind) starting with ``prefix``."""
        ...


class StoreResolver:
    """:class:`Resolver` over a repository's refs and object store."""

    def __init__(self, refs: Refs, objects: ObjectStore) -> None:
        self.refs = refs
        self.objects = objects

    def follow_head(self) -> tuple[str, str | None]:
        return self.refs.follow(HEAD)

    def read_ref(self, ref: str) -> str | None:
        return self.refs.read_raw(ref)

    def has_object(self, oid: str) -> bool:
        return self.objects.has(oid)

    def object_kind(self, oid: str) -> str:
        return self.objects.kind(oid)

    def tag_target(self, oid: str) -> str:
        return self.objects.read_tag(oid).object

    def parents(self, commit_id: str) -> tuple[str, ...]:
        return tuple(self.objects.read_commit(commit_id).parents)

    def ids_with_prefix(self, prefix: str) -> Iterable[str]:
        return self.objects.with_prefix(prefix)


def resolve(resolver: Resolver, rev: str) -> str:
    """The full commit id ``rev`` names (RevisionNotFoundError, AmbiguousRevisionError)."""
    if not isinstance(rev, str) or not rev.strip():
        raise RevisionNotFoundError(f"invalid revision {rev!r}")
    rev = rev.strip()
    match = _REV_SUFFIX.search(rev)
    if match and match.start() > 0:
        base = resolve(resolver, rev[: match.start()])
        op, num = match.group(0)[0], match.group(0)[1:]
        count = int(num) if num else 1
        if op == "~":
            for _ in range(count):
                parents = resolver.parents(base)
                if not parents:
                    raise RevisionNotFoundError(f"{rev}: history is not that deep")
                base = parents[0]
            return base
        if count == 0:
            return base
        parents = resolver.parents(base)
        if len(parents) < count:
            raise RevisionNotFoundError(f"{rev}: commit {base[:12]} has no parent {count}")
        return parents[count - 1]
    return _resolve_name(resolver, rev)


def _resolve_name(resolver: Resolver, rev: str) -> str:
    if rev == HEAD:
        ref, value = resolver.follow_head()
        if value is None:
            branch = ref.removeprefix("refs/heads/")
            raise RevisionNotFoundError(f"HEAD: branch {branch!r} has no commits yet")
        return value
    if _HEX_ID.match(rev):
        if not resolver.has_object(rev):
            raise RevisionNotFoundError(f"unknown revision {rev}")
        return peel(resolver, rev)
    for candidate in (f"refs/heads/{rev}", f"refs/tags/{rev}", rev if rev.startswith("refs/") else None):
        if candidate is None or not is_valid_ref(candidate):
            continue
        value = resolver.read_ref(candidate)
        if value is not None and not value.startswith("ref: "):
            return peel(resolver, value)
    if _HEX_PREFIX.match(rev):
        matches = [oid for oid in resolver.ids_with_prefix(rev) if resolver.object_kind(oid) in ("commit", "tag")]
        if len(matches) > 1:
            raise AmbiguousRevisionError(f"revision {rev} is ambiguous: matches {', '.join(m[:12] for m in matches)}")
        if matches:
            return peel(resolver, matches[0])
    if _SHORT_PREFIX.match(rev):
        raise RevisionNotFoundError(
            f"unknown revision {rev!r}: not a branch or tag, and too short for a commit id "
            "(an id prefix needs at least 4 hex digits)"
        )
    raise RevisionNotFoundError(f"unknown revision {rev!r} (not a branch, tag, or commit id)")


def peel(resolver: Resolver, oid: str) -> str:
    """Follow a tag object to the commit it names."""
    kind = resolver.object_kind(oid)
    if kind == "tag":
        return peel(resolver, resolver.tag_target(oid))
    if kind != "commit":
        raise RevisionNotFoundError(f"{oid[:12]} is a {kind}, not a commit")
    return oid


def split_range(rev: str) -> tuple[str, str] | None:
    """``(A, B)`` of a range ``A..B`` (an empty side means HEAD), or None when ``rev`` is no range.

    ``A...B`` (git's symmetric difference) raises UsageError.
    """
    if not isinstance(rev, str) or ".." not in rev:
        return None
    old, _, new = rev.partition("..")
    if new.startswith("."):
        raise UsageError(f"{rev}: A...B (symmetric difference) is not supported; use A..B")
    return old or HEAD, new or HEAD

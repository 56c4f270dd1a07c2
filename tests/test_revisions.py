"""The revision grammar (ckptvcs.revisions) against an in-memory view of refs and objects.

The fake implements our own narrow Resolver protocol (a few dicts), not a user-facing
component; Repo.resolve over a real store is covered by tests/test_repo.py and test_cli.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from ckptvcs import revisions
from ckptvcs.errors import AmbiguousRevisionError, RevisionNotFoundError, UsageError


def oid(prefix: str) -> str:
    return prefix.ljust(64, "0")


ROOT, SIDE, MERGE, TIP = oid("a1"), oid("b2"), oid("c3"), oid("d4")
TAG_OBJ, MANIFEST = oid("e5"), oid("f6")
# Two commits that share the prefix "abcd", and one that shares only "abc" with them.
TWIN1, TWIN2 = oid("abcd1"), oid("abcd2")


class FakeResolver:
    """History: ROOT <- SIDE; ROOT <- MERGE (parents ROOT, SIDE) <- TIP; a tag v1 on MERGE."""

    def __init__(self, head: str = "ref: refs/heads/main") -> None:
        self.refs = {
            "HEAD": head,
            "refs/heads/main": TIP,
            "refs/heads/side": SIDE,
            "refs/heads/feature/x": ROOT,
            "refs/tags/v1": TAG_OBJ,
        }
        self.kinds = {ROOT: "commit", SIDE: "commit", MERGE: "commit", TIP: "commit", TAG_OBJ: "tag",
                      MANIFEST: "manifest", TWIN1: "commit", TWIN2: "commit"}
        self.parent_map = {ROOT: (), SIDE: (ROOT,), MERGE: (ROOT, SIDE), TIP: (MERGE,), TWIN1: (), TWIN2: ()}
        self.tag_targets = {TAG_OBJ: MERGE}

    def follow_head(self) -> tuple[str, str | None]:
        value = self.refs["HEAD"]
        if value.startswith("ref: "):
            ref = value[len("ref: "):]
            return ref, self.refs.get(ref)
        return "HEAD", value

    def read_ref(self, ref: str) -> str | None:
        return self.refs.get(ref)

    def has_object(self, oid: str) -> bool:
        return oid in self.kinds

    def object_kind(self, oid: str) -> str:
        return self.kinds[oid]

    def tag_target(self, oid: str) -> str:
        return self.tag_targets[oid]

    def parents(self, commit_id: str) -> tuple[str, ...]:
        return self.parent_map[commit_id]

    def ids_with_prefix(self, prefix: str) -> Iterable[str]:
        return sorted(o for o in self.kinds if o.startswith(prefix))


@pytest.fixture
def view() -> FakeResolver:
    return FakeResolver()


def test_the_fake_is_a_resolver() -> None:
    resolver: revisions.Resolver = FakeResolver()  # checked by mypy as well
    assert revisions.resolve(resolver, "HEAD") == TIP


@pytest.mark.parametrize("rev, want", [
    ("HEAD", TIP), ("  main  ", TIP), ("main", TIP), ("side", SIDE), ("feature/x", ROOT),
    ("refs/heads/side", SIDE), ("v1", MERGE), ("refs/tags/v1", MERGE), (TIP, TIP), (TAG_OBJ, MERGE),
    ("d4000", TIP), ("e5000", MERGE),
])
def test_names(view: FakeResolver, rev: str, want: str) -> None:
    assert revisions.resolve(view, rev) == want


@pytest.mark.parametrize("rev, want", [
    ("HEAD~", MERGE), ("HEAD~1", MERGE), ("HEAD~2", ROOT), ("main~0", TIP), ("HEAD^", MERGE),
    ("HEAD^0", TIP), ("HEAD~1^2", SIDE), ("HEAD^^", ROOT), ("v1^2", SIDE), ("v1^2~1", ROOT), ("side~1", ROOT),
])
def test_suffixes(view: FakeResolver, rev: str, want: str) -> None:
    assert revisions.resolve(view, rev) == want


@pytest.mark.parametrize("rev, match", [
    ("HEAD~3", "history is not that deep"),
    ("HEAD^2", "has no parent 2"),
    ("nope", "not a branch, tag, or commit id"),
    ("abc", "too short for a commit id"),
    (oid("99"), "unknown revision"),
    ("", "invalid revision"),
    ("   ", "invalid revision"),
    ("f6000", "unknown revision"),  # a manifest prefix is no commit
    (MANIFEST, "is a manifest, not a commit"),
])
def test_refusals(view: FakeResolver, rev: str, match: str) -> None:
    with pytest.raises(RevisionNotFoundError, match=match):
        revisions.resolve(view, rev)


def test_a_non_string_is_refused(view: FakeResolver) -> None:
    with pytest.raises(RevisionNotFoundError, match="invalid revision"):
        revisions.resolve(view, None)  # type: ignore[arg-type]


def test_an_ambiguous_prefix_names_the_candidates(view: FakeResolver) -> None:
    with pytest.raises(AmbiguousRevisionError, match="abcd10000000, abcd20000000"):
        revisions.resolve(view, "abcd")
    assert revisions.resolve(view, "abcd1") == TWIN1


def test_a_branch_wins_over_an_id_prefix(view: FakeResolver) -> None:
    view.refs["refs/heads/d400"] = SIDE
    assert revisions.resolve(view, "d400") == SIDE
    assert revisions.resolve(view, "d4000") == TIP


def test_a_symbolic_branch_is_not_followed(view: FakeResolver) -> None:
    view.refs["refs/heads/alias"] = "ref: refs/heads/main"
    with pytest.raises(RevisionNotFoundError):
        revisions.resolve(view, "alias")


def test_unborn_and_detached_head() -> None:
    unborn = FakeResolver(head="ref: refs/heads/new")
    with pytest.raises(RevisionNotFoundError, match="branch 'new' has no commits yet"):
        revisions.resolve(unborn, "HEAD")
    assert revisions.resolve(FakeResolver(head=SIDE), "HEAD~1") == ROOT


def test_peel_follows_tags_of_tags(view: FakeResolver) -> None:
    outer = oid("77")
    view.kinds[outer] = "tag"
    view.tag_targets[outer] = TAG_OBJ
    assert revisions.peel(view, outer) == MERGE


@pytest.mark.parametrize("rev, want", [
    ("main", None), ("a..b", ("a", "b")), ("a..", ("a", "HEAD")), ("..b", ("HEAD", "b")), ("..", ("HEAD", "HEAD")),
])
def test_split_range(rev: str, want: tuple[str, str] | None) -> None:
    assert revisions.split_range(rev) == want


def test_symmetric_difference_is_refused() -> None:
    with pytest.raises(UsageError, match="symmetric difference"):
        revisions.split_range("a...b")

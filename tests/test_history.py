"""Commit-graph walks (ckptvcs.history) over plain Commit records held in a dict."""

from __future__ import annotations

from ckptvcs import history
from ckptvcs.objects import Commit

# root(1) <- a(2) <- merge(5) <- tip(6);  root <- b(4) <- merge;  root <- c(3), on no branch
PARENTS = {"root": (), "a": ("root",), "b": ("root",), "c": ("root",), "merge": ("a", "b"), "tip": ("merge",)}
TIMES = {"root": 1, "a": 2, "c": 3, "b": 4, "merge": 5, "tip": 6}


def load(oid: str) -> Commit:
    return Commit(manifest="m", parents=PARENTS[oid], message=oid, author="t",
                  time=f"2026-01-01T00:00:0{TIMES[oid]}Z", id=oid)


def ids(commits: list[Commit]) -> list[str]:
    return [c.id for c in commits]


def test_walk_lists_newest_first_across_merges() -> None:
    assert ids(history.walk(load, ["tip"])) == ["tip", "merge", "b", "a", "root"]
    assert ids(history.walk(load, ["tip", "c"])) == ["tip", "merge", "b", "c", "a", "root"]


def test_walk_stops_at_n_and_hides_a_range_base() -> None:
    assert ids(history.walk(load, ["tip"], 2)) == ["tip", "merge"]
    hidden = {c.id for c in history.walk(load, ["a"])}
    assert ids(history.walk(load, ["tip"], hidden=hidden)) == ["tip", "merge", "b"]


def test_walk_reads_each_commit_once() -> None:
    seen: list[str] = []
    history.walk(lambda oid: (seen.append(oid), load(oid))[1], ["tip", "merge", "a"])
    assert sorted(seen) == sorted(set(seen))


def test_reachable_with_stop() -> None:
    assert history.reachable(PARENTS.__getitem__, ["tip"]) == {"tip", "merge", "a", "b", "root"}
    assert history.reachable(PARENTS.__getitem__, ["tip", "c"], stop={"merge"}) == {"tip", "c", "root"}
    assert history.reachable(PARENTS.__getitem__, ["merge"], stop={"merge"}) == set()

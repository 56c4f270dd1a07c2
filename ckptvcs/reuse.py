"""Reusing the chunk ids of tensors the caller knows are unchanged (``Repo.commit(reuse=...)``).

A commit hashes every byte of the state, even bytes that have not changed since the
last commit: BLAKE3 of an unchanged 271 MB state costs about a third of a
``torch.save``. Only the caller can know that a tensor was not touched (a training
loop sees ``tensor._version`` and its storage across saves; the bytes alone cannot say).
A :class:`ReuseHint` carries that knowledge: "the tensors at these key paths hold the
bytes they held in commit C". For each blob whose tensors are all named, whose layout
(members, dtypes, shapes, strides, offsets, size) is the one C's manifest records, and
whose chunks are all stored with their whole delta chains, the commit takes C's chunk
ids without reading the bytes.

The safety net, because a hint can be wrong (a write through ``.data`` or a numpy view
does not bump the version counter): every commit still hashes a rotating ``1 /
check_every`` of the chunks it would reuse, the same chunks every ``check_every``-th
round, so each reused chunk is re-hashed at least once every ``check_every`` commits
made with hints of consecutive rounds. If one of them does not hash to the id it would
reuse, the hint is dropped for the whole commit (every byte hashed, as without a hint)
and :attr:`ReuseOutcome.mismatch` names the tensor, so the caller stops trusting its hints.

What this guarantees, and what not: a reused id is always the id of a chunk that is
stored, with its chain, and that hashes to it (ids are never invented or guessed), and
the commit never depends on a commit that was pruned. What a wrong hint can do is
record a tensor's bytes as they were in C: a stale value, until the check reaches the
changed chunk. docs/training.md states the manager's terms.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from .errors import InvalidInputError
from .state import EncodedState, iter_tensors
from .store import ChunkStore, chunk_hash

__all__ = ["ReuseHint", "ReuseOutcome", "prepare", "plan_reuse", "checked_chunks"]

ManifestSource = Callable[[str], "tuple[Any, Sequence[dict[str, Any]]] | str"]
"""Commit id → ``(manifest root, manifest blobs)``, or why its chunk ids may not be reused."""


@dataclass
class ReuseOutcome:
    """What a commit did with a :class:`ReuseHint` (set on ``hint.outcome``)."""

    reused_chunks: int = 0  # chunks taken from the hinted commit without hashing
    reused_bytes: int = 0
    checked_chunks: int = 0  # reusable chunks hashed anyway (the rotating check)
    checked_bytes: int = 0
    mismatch: str | None = None  # a tensor whose checked chunk did not match: the hint was dropped
    refused: str | None = None  # why the hint was not used at all (commit pruned, missing...)


@dataclass
class ReuseHint:
    """The caller's word that the tensors at ``unchanged`` key paths hold the bytes they held in ``commit``.

    Key paths are the ones the manifest uses (``"model/encoder.weight"``,
    ``"optimizer/state/0/exp_avg"``: keys joined with ``/``). ``check_every`` (≥ 1; 1
    hashes everything) and ``check_round`` select the rotating sample that is hashed
    anyway; pass round numbers that increase by one per commit. The commit sets
    :attr:`outcome`.
    """

    commit: str
    unchanged: Collection[str]
    check_every: int = 8
    check_round: int = 0
    outcome: ReuseOutcome | None = field(default=None, compare=False)


Members = tuple[dict[int, list[tuple[Any, ...]]], set[str]]
_last_members: list[tuple[Any, Members]] = []  # (root, its members): the last tree walked


def _members(root: Any) -> Members:
    """Blob → its tensors ``(path, kind, dtype, shape, stride, offset)`` sorted, and the paths seen twice.

    The last tree walked is remembered (by identity: manifest trees are never changed once
    written): a commit's new tree is the next commit's old one.
    """
    for seen_root, members in _last_members:
        if seen_root is root:
            return members
    result = _walk_members(root)
    _last_members[:] = [(root, result)]
    return result


def _walk_members(root: Any) -> Members:
    groups: dict[int, list[tuple[Any, ...]]] = {}
    seen: set[str] = set()
    repeated: set[str] = set()
    for path, kind, body in iter_tensors(root):
        if path in seen:
            repeated.add(path)
        seen.add(path)
        layout = (path, kind, body.get("dtype"), _tup(body.get("shape")), _tup(body.get("stride")), body.get("offset"))
        groups.setdefault(body["blob"], []).append(layout)
    for members in groups.values():
        members.sort(key=lambda m: m[0])
    return groups, repeated


def _tup(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def plan_reuse(
    hint: ReuseHint,
    old_root: Any,
    old_blobs: Sequence[dict[str, Any]],
    new_root: Any,
    new_blobs: Sequence[tuple[int, str]],
    chunk_count: Callable[[int], int],
) -> tuple[list[list[bytes] | None], dict[int, str]]:
    """Per blob of the new state: the hinted commit's chunk ids to reuse, or None (hash it);
    and the name (first key path) of each reused blob.

    ``new_blobs`` holds each new blob's ``(nbytes, dtype)``; ``chunk_count(nbytes)`` is
    how many chunks a blob of that size has. A blob is reused only when it holds
    tensors alone, every one of them hinted, with key paths that occur once in both
    trees, and the hinted commit's blob (found by the first path) has exactly the same
    members and layouts, size, dtype and chunk count. Index look-ups are the caller's.
    """
    unchanged = hint.unchanged if isinstance(hint.unchanged, (set, frozenset)) else set(hint.unchanged)
    old_groups, old_repeated = _members(old_root)  # first: the remembered tree is usually this one
    new_groups, new_repeated = _members(new_root)
    repeated = new_repeated | old_repeated
    old_by_path = {members[0][0]: blob for blob, members in old_groups.items()}
    plan: list[list[bytes] | None] = [None] * len(new_blobs)
    names: dict[int, str] = {}
    for blob, members in new_groups.items():
        if not 0 <= blob < len(new_blobs):
            continue
        nbytes, dtype = new_blobs[blob]
        if nbytes == 0 or any(m[1] != "tensor" or m[0] not in unchanged or m[0] in repeated for m in members):
            continue
        old = old_by_path.get(members[0][0])
        if old is None or not 0 <= old < len(old_blobs) or old_groups[old] != members:
            continue
        record = old_blobs[old]
        chunks = record.get("chunks")
        if record.get("nbytes") != nbytes or record.get("dtype") != dtype or not isinstance(chunks, list) \
                or len(chunks) != chunk_count(nbytes):
            continue
        try:
            plan[blob] = [bytes.fromhex(c) for c in chunks]
        except (TypeError, ValueError):
            continue
        names[blob] = members[0][0]
    return plan, names


def checked_chunks(
    names: dict[int, str], plan: Sequence[list[bytes] | None], check_every: int, check_round: int
) -> list[tuple[int, int]]:
    """``(blob, chunk)`` positions of the reusable chunks to hash anyway this round.

    Chunk ``j`` of a blob named ``p`` (``names``: its first key path) is checked in the rounds
    where ``(h(p) + j) % check_every == check_round % check_every`` (``h`` a stable
    hash of the path): the choice does not depend on which other blobs are reused,
    so a chunk reused in ``check_every`` consecutive rounds is checked in one of them.
    """
    if check_every <= 1:
        return [(b, j) for b, ids in enumerate(plan) if ids is not None for j in range(len(ids))]
    phase = check_round % check_every
    picked = []
    for blob, ids in enumerate(plan):
        if ids is None:
            continue
        start = int.from_bytes(blake3.blake3(names[blob].encode("utf-8", "surrogatepass")).digest(8), "little")
        picked += [(blob, j) for j in range((phase - start) % check_every, len(ids), check_every)]
    return picked


def prepare(hint: ReuseHint, encoded: EncodedState, store: ChunkStore, source: ManifestSource) -> list[list[bytes] | None] | None:
    """The ``known`` chunk ids for ``WriteSession.put_blobs``, or None to hash everything.

    Run under the repository's shared lock, so no gc removes what is checked here before
    the commit refers to it. Sets ``hint.outcome``. The hinted commit must be readable
    and not pruned (``source`` says why not); each reused chunk must be in the index with
    its whole delta chain; then the rotating sample is hashed, and a mismatch drops the
    whole hint.
    """
    if isinstance(hint.check_every, bool) or not isinstance(hint.check_every, int) or hint.check_every < 1:
        raise InvalidInputError(f"ReuseHint.check_every must be an integer >= 1, got {hint.check_every!r}")
    if isinstance(hint.check_round, bool) or not isinstance(hint.check_round, int):
        raise InvalidInputError(f"ReuseHint.check_round must be an integer, got {hint.check_round!r}")
    outcome = hint.outcome = ReuseOutcome()
    found = source(hint.commit) if isinstance(hint.commit, str) else "the hinted commit is not a commit id"
    if isinstance(found, str):
        outcome.refused = found
        return None
    old_root, old_blobs = found
    sizes = [(len(b.data), b.dtype) for b in encoded.blobs]
    plan, names = plan_reuse(hint, old_root, old_blobs, encoded.root, sizes, lambda n: len(store.split(n)))
    for blob, ids in enumerate(plan):
        if ids is not None and not all(store.has_complete_chain(c) for c in set(ids)):
            plan[blob] = None
    if not any(ids is not None for ids in plan):
        return None
    checks = checked_chunks(names, plan, hint.check_every, hint.check_round)
    futures = []
    for blob, j in checks:
        data = encoded.blobs[blob].data
        chunk = data[j * store.chunk_size:(j + 1) * store.chunk_size]
        futures.append(store.pool.submit(chunk_hash, chunk))
        outcome.checked_chunks += 1
        outcome.checked_bytes += len(chunk)
    for (blob, j), fut in zip(checks, futures):
        if fut.result() != plan[blob][j]:  # type: ignore[index]  # checked_chunks only picks reused blobs
            outcome.mismatch = names[blob]
            for other in futures:
                other.cancel()
            return None
    for blob, ids in enumerate(plan):
        if ids is not None:
            outcome.reused_chunks += len(ids)
            outcome.reused_bytes += len(encoded.blobs[blob].data)
    outcome.reused_chunks -= outcome.checked_chunks
    outcome.reused_bytes -= outcome.checked_bytes
    return plan


"""A stateful test: a real Repo against a plain-Python model of what it must contain.

hypothesis drives random sequences of commits (onto HEAD or a named branch, new states,
repeated states and one-tensor changes, so dedup and XOR-delta chains occur), stage and
publish (and stages left unpublished), branches, tags, checkouts (detached too), manual
prunes, gc (``prune_unreachable_after="now"`` and the default grace) and reopening the
repository from disk. After every step the refs, HEAD, history and loadable commits must
agree with the model; after every gc and at the end of each run fsck must find no error.

What the model predicts for gc: the kept commits are those reachable (all parents) from a
branch, tag or HEAD, plus, under the default grace, from every commit a reflog names
(here: every commit ever made, as the grace is 30 days), minus the pruned ones that are
no ref's tip. A pruned commit always raises CommitPrunedError. An unreachable commit that
is not kept loses its data (CommitCollectedError) unless its chunks are all still live:
the model knows each state's chunk ids (BLAKE3 of each 4 KiB piece), so it says "must
still load" when every chunk belongs to a kept commit or a pending stage, "must be
collected" when one chunk belongs to no other state and can be no delta base (no commit
or stage was made on top of a state holding it), and accepts either outcome in between
(delta bases chosen by the store are not modelled).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ckptvcs import Repo
from ckptvcs.errors import (
    CkptvcsError,
    CommitCollectedError,
    CommitPrunedError,
    ProtectedCommitError,
    RefConflictError,
    RefExistsError,
    RevisionNotFoundError,
    UnmergedBranchError,
)

CHUNK = 4096
BRANCHES = ("main", "dev", "exp", "old")
TAGS = ("v1", "v2", "best")
SHAPES = {"w": (2100,), "b": (16,), "m": (1030,)}  # float32: 3, 1 and 2 chunks


def _state_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _chunk_ids(arrays: dict[str, np.ndarray]) -> frozenset[bytes]:
    ids = set()
    for arr in arrays.values():
        data = arr.tobytes()
        ids.update(blake3.blake3(data[i:i + CHUNK]).digest() for i in range(0, len(data), CHUNK))
    return frozenset(ids)


def _as_state(arrays: dict[str, np.ndarray], step: int) -> dict[str, Any]:
    return {"model": {n: torch.from_numpy(a.copy()) for n, a in arrays.items() if n != "m"},
            "optim": {"m": torch.from_numpy(arrays["m"].copy())}, "step": step}


@dataclass
class ModelCommit:
    seq: int
    arrays: dict[str, np.ndarray]
    chunks: frozenset[bytes]
    parent: str | None
    step: int
    fate: str = "live"  # live | pruned | collected


@dataclass
class Pending:
    staged: Any
    branch: str | None  # as passed to stage/publish (None: where HEAD points)
    arrays: dict[str, np.ndarray]
    chunks: frozenset[bytes]
    step: int


@dataclass
class Model:
    commits: dict[str, ModelCommit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    head_branch: str | None = "main"  # None: detached
    head_id: str | None = None  # the detached commit
    pending: list[Pending] = field(default_factory=list)
    children_of: set[frozenset[bytes]] = field(default_factory=set)  # chunk sets that were a parent
    stranded: list[frozenset[bytes]] = field(default_factory=list)  # stages whose publish failed: record kept

    def head(self) -> tuple[str | None, str | None]:
        if self.head_branch is not None:
            return self.head_branch, self.branches.get(self.head_branch)
        return None, self.head_id

    def tips(self) -> set[str]:
        tips = set(self.branches.values()) | set(self.tags.values())
        if self.head()[1] is not None:
            tips.add(self.head()[1])  # type: ignore[arg-type]
        return tips

    def reachable(self, starts: set[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(starts)
        while stack:
            cid = stack.pop()
            if cid not in seen:
                seen.add(cid)
                parent = self.commits[cid].parent
                if parent is not None:
                    stack.append(parent)
        return seen

    def kept(self, grace: bool) -> set[str]:
        tips = self.tips()
        starts = tips | (set(self.commits) if grace else set())
        return {c for c in self.reachable(starts) if c in tips or self.commits[c].fate != "pruned"}


class RepoMachine(RuleBasedStateMachine):
    """Drives one repository in a fresh temporary folder per run."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ckptvcs-model-"))
        self.path = self.tmp / "store"
        self.repo = Repo.init(self.path, chunk_size=CHUNK)
        self.model = Model()
        self.seq = 0
        self.unchecked: set[str] = set()  # commits whose load was not checked since they changed

    def teardown(self) -> None:
        try:
            report = self.repo.fsck()
            assert report.ok, report.summary()
        finally:
            self.repo.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------

    def _arrays(self, data: st.DataObject) -> dict[str, np.ndarray]:
        """A new state, an earlier one again, or an earlier one with one tensor or every chunk changed."""
        known = [c.arrays for c in self.model.commits.values()]
        mode = data.draw(st.sampled_from(["new", "same", "change", "drift"] if known else ["new"]), label="mode")
        if mode == "new":
            return _state_arrays(data.draw(st.integers(0, 3), label="seed"))
        base = data.draw(st.sampled_from(known), label="earlier")
        if mode == "same":
            return base
        arrays = {n: a.copy() for n, a in base.items()}
        if mode == "drift":  # one element of every chunk: every chunk new, each an XOR delta of its parent's
            for arr in arrays.values():
                arr[:: CHUNK // 4] *= 1.5
            return arrays
        name = data.draw(st.sampled_from(sorted(arrays)), label="tensor")
        index = data.draw(st.integers(0, arrays[name].size - 1), label="index")
        arrays[name][index : index + 7] += 1.0  # a few elements of one chunk (or two) change
        return arrays

    def _target(self, branch: str | None) -> tuple[str | None, str | None]:
        """(branch that moves or None for a detached HEAD, parent commit), as commit chooses them."""
        if branch is None:
            name, value = self.model.head()
            return name, value
        if branch in self.model.branches:
            return branch, self.model.branches[branch]
        return branch, self.model.head()[1]

    def _record(self, cid: str, arrays: dict[str, np.ndarray], parent: str | None, step: int,
                moved: str | None) -> None:
        assert cid not in self.model.commits
        self.seq += 1
        chunks = _chunk_ids(arrays)
        self.model.commits[cid] = ModelCommit(self.seq, arrays, chunks, parent, step)
        if parent is not None:
            self.model.children_of.add(self.model.commits[parent].chunks)
        if moved is None:
            self.model.head_id = cid
        else:
            self.model.branches[moved] = cid
        self.unchecked.add(cid)

    def _commit_ids(self) -> st.SearchStrategy[str]:
        # In creation order: ids hold commit times, so sorting them would not replay.
        return st.sampled_from(list(self.model.commits))

    def _check_load(self, cid: str) -> None:
        mc = self.model.commits[cid]
        if mc.fate == "live":
            state = self.repo.load(cid)
            assert state["step"] == mc.step
            got = {**state["model"], **state["optim"]}
            assert sorted(got) == sorted(mc.arrays)
            for name, arr in mc.arrays.items():
                assert torch.equal(got[name].view(torch.uint8), torch.from_numpy(arr.copy()).view(torch.uint8))
        else:
            wanted = CommitCollectedError if mc.fate == "collected" else CommitPrunedError
            with pytest.raises(CommitPrunedError) as err:
                self.repo.load(cid)
            assert type(err.value) is wanted, (mc.fate, err.value)

    @initialize(seeds=st.tuples(st.integers(0, 3), st.integers(0, 3)))
    def two_branches(self, seeds: tuple[int, int]) -> None:
        """main and dev, one commit each, so unreachable commits come soon (force-delete dev)."""
        for onto, seed in zip(("main", "dev"), seeds):
            arrays = _state_arrays(seed)
            moved, parent = self._target(onto)
            cid = self.repo.commit(_as_state(arrays, seed), branch=onto, step=seed, code_version=None)
            self._record(cid, arrays, parent, seed, moved)

    # -- rules: writing ------------------------------------------------------------------

    @rule(data=st.data(), onto=st.sampled_from((None, *BRANCHES)), step=st.integers(0, 10**6),
          loss=st.floats(0, 10, allow_nan=False))
    def commit(self, data: st.DataObject, onto: str | None, step: int, loss: float) -> None:
        arrays = self._arrays(data)
        moved, parent = self._target(onto)
        cid = self.repo.commit(_as_state(arrays, step), f"step {step}", branch=onto, step=step,
                               metrics={"loss": loss}, code_version=None)
        self._record(cid, arrays, parent, step, moved)
        assert self.repo.show(cid).step == step
        assert list(self.repo.show(cid).parents) == ([parent] if parent else [])

    @rule(data=st.data(), onto=st.sampled_from((None, *BRANCHES)), step=st.integers(0, 100),
          publish_now=st.booleans())
    def stage(self, data: st.DataObject, onto: str | None, step: int, publish_now: bool) -> None:
        arrays = self._arrays(data)
        staged = self.repo.stage(_as_state(arrays, step), branch=onto)
        assert staged.parent == self._target(onto)[1]
        if staged.parent is not None:
            self.model.children_of.add(self.model.commits[staged.parent].chunks)
        self.model.pending.append(Pending(staged, onto, arrays, _chunk_ids(arrays), step))
        if publish_now:
            self.publish(len(self.model.pending) - 1)

    @precondition(lambda self: self.model.pending)
    @rule(data=st.data())
    def publish_later(self, data: st.DataObject) -> None:
        self.publish(data.draw(st.integers(0, len(self.model.pending) - 1), label="pending"))

    def publish(self, which: int) -> None:
        pend = self.model.pending.pop(which)
        moved, current = self._target(pend.branch)
        exists = current is not None if pend.branch is None else pend.branch in self.model.branches
        if exists and current != pend.staged.parent:
            event("publish refused: the branch moved")
            with pytest.raises(RefConflictError):
                self.repo.publish(pend.staged, branch=pend.branch, step=pend.step, code_version=None)
            self.model.stranded.append(pend.chunks)  # its staged record stays (within the grace)
            return
        cid = self.repo.publish(pend.staged, branch=pend.branch, step=pend.step, code_version=None)
        self._record(cid, pend.arrays, pend.staged.parent, pend.step, moved)

    # -- rules: refs ---------------------------------------------------------------------

    @precondition(lambda self: self.model.commits)
    @rule(data=st.data(), name=st.sampled_from(BRANCHES))
    def branch(self, data: st.DataObject, name: str) -> None:
        cid = data.draw(self._commit_ids(), label="at")
        fate = self.model.commits[cid].fate
        if fate != "live":
            with pytest.raises(CommitPrunedError):
                self.repo.branch(name, cid)
        elif name in self.model.branches:
            with pytest.raises(RefExistsError):
                self.repo.branch(name, cid)
        else:
            assert self.repo.branch(name, cid) == cid
            self.model.branches[name] = cid

    @rule(name=st.sampled_from(BRANCHES), force=st.booleans())
    def delete_branch(self, name: str, force: bool) -> None:
        m = self.model
        if name not in m.branches:
            with pytest.raises(RevisionNotFoundError):
                self.repo.delete_branch(name, force=force)
            return
        if m.head_branch == name:
            with pytest.raises(CkptvcsError):
                self.repo.delete_branch(name, force=force)
            return
        others = {c for b, c in m.branches.items() if b != name} | set(m.tags.values())
        if m.head_branch is None and m.head_id is not None:
            others.add(m.head_id)
        if not force and m.branches[name] not in m.reachable(others):
            with pytest.raises(UnmergedBranchError):
                self.repo.delete_branch(name)
            event("delete_branch refused an unmerged branch")
            return
        self.repo.delete_branch(name, force=force)
        del m.branches[name]

    @precondition(lambda self: self.model.commits)
    @rule(data=st.data(), name=st.sampled_from(TAGS))
    def tag(self, data: st.DataObject, name: str) -> None:
        cid = data.draw(self._commit_ids(), label="at")
        if self.model.commits[cid].fate != "live":
            with pytest.raises(CommitPrunedError):
                self.repo.tag(name, cid)
        elif name in self.model.tags:
            with pytest.raises(RefExistsError):
                self.repo.tag(name, cid)
        else:
            assert self.repo.tag(name, cid, message="model") == cid
            self.model.tags[name] = cid

    @precondition(lambda self: self.model.tags)
    @rule(data=st.data())
    def delete_tag(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.tags)), label="tag")
        self.repo.delete_tag(name)
        del self.model.tags[name]

    @precondition(lambda self: self.model.branches)
    @rule(data=st.data())
    def checkout_branch(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.branches)), label="branch")
        assert self.repo.checkout(name) == self.model.branches[name]
        self.model.head_branch, self.model.head_id = name, None

    @precondition(lambda self: self.model.commits)
    @rule(data=st.data())
    def checkout_detached(self, data: st.DataObject) -> None:
        cid = data.draw(self._commit_ids(), label="commit")
        assert self.repo.checkout(cid) == cid
        self.model.head_branch, self.model.head_id = None, cid

    # -- rules: pruning, gc, reopening ----------------------------------------------------------

    @precondition(lambda self: self.model.commits)
    @rule(data=st.data())
    def prune(self, data: st.DataObject) -> None:
        # A commit gc already collected is left alone: pruning it again would only rename its record.
        candidates = [c for c, mc in self.model.commits.items() if mc.fate != "collected"]
        if data.draw(st.booleans(), label="parent of a tip"):  # the delta base of a kept commit
            parents = {self.model.commits[t].parent for t in self.model.tips()} - self.model.tips()
            candidates = [c for c in candidates if c in parents] or candidates
        if not candidates:
            return
        cid = data.draw(st.sampled_from(candidates), label="commit")
        if cid in self.model.tips():
            with pytest.raises(ProtectedCommitError):
                self.repo.prune(cid, rule="manual")
            return
        assert self.repo.prune(cid, rule="manual", reason="model") == cid
        self.model.commits[cid].fate = "pruned"
        self.unchecked.add(cid)

    @rule(now=st.booleans())
    def gc(self, now: bool) -> None:
        m = self.model
        kept = m.kept(grace=not now)
        staged = [p.chunks for p in m.pending] + m.stranded
        live_chunks = set().union(*(m.commits[c].chunks for c in kept), *staged)
        bases = set().union(*m.children_of)
        report = self.repo.gc(prune_unreachable_after="now" if now else None)
        collected = set(report.collected_commits)
        if set(m.commits) - kept - {c for c, mc in m.commits.items() if mc.fate != "live"}:
            event(f"gc ({'now' if now else 'grace'}) with known unkept commits")
        for cid, mc in m.commits.items():
            if mc.fate != "live" or cid in kept:
                assert cid not in collected, f"gc collected kept or pruned commit {cid[:12]}"
                continue
            if mc.chunks <= live_chunks:
                assert cid not in collected, f"gc collected {cid[:12]} whose chunks all stay live"
            # Chunks some other state holds (unkept states with the same content go together).
            other = set().union(*staged, *(o.chunks for c, o in m.commits.items()
                                           if c != cid and (c in kept or o.chunks != mc.chunks)))
            if any(x not in other and x not in bases for x in mc.chunks):
                assert cid in collected, f"gc kept the data of unreachable commit {cid[:12]}"
            if cid in collected:
                mc.fate = "collected"
                event("gc collected an unreachable commit")
        self.unchecked |= set(m.commits)
        fsck = self.repo.fsck()
        assert fsck.ok, fsck.summary()

    @rule()
    def reopen(self) -> None:
        self.repo.close()
        self.repo = Repo.open(self.path)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def refs_agree(self) -> None:
        assert self.repo.branches() == self.model.branches
        assert {n: t.object for n, t in self.repo.tags().items()} == self.model.tags
        assert self.repo.head() == self.model.head()

    @invariant()
    def history_agrees(self) -> None:
        for name, tip in self.model.branches.items():
            log = self.repo.log(name)
            assert {c.id for c in log} == self.model.reachable({tip})
            for newer, older in zip(log, log[1:]):
                seqs = self.model.commits[newer.id].seq, self.model.commits[older.id].seq
                assert seqs[0] > seqs[1] or newer.time == older.time
            fates = {c.id: c.pruned is not None for c in log}
            assert fates == {c: self.model.commits[c].fate != "live" for c in fates}

    @invariant()
    def loads_agree(self) -> None:
        # Every commit changed since the last check (all of them after a gc), at most 12 a step.
        for cid in sorted(self.unchecked, key=lambda c: -self.model.commits[c].seq)[:12]:
            self._check_load(cid)
            self.unchecked.discard(cid)


RepoMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_repo_against_model = RepoMachine.TestCase


class DeepRepoMachine(RepoMachine):
    pass


DeepRepoMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_repo_against_model_deep = pytest.mark.slow(DeepRepoMachine.TestCase)

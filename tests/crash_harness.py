"""SIGKILL harness for the crash suite (tests/test_crash.py).

A *scenario* is a module-level function run in a child process that writes READY to
an ack file once it is set up, then does durable work in a loop and appends one
acknowledgement line (one ``write()`` with O_APPEND) each time an operation has
returned. The parent waits for READY (and in every other round for the first
acknowledgement), then kills the child with SIGKILL after a random fraction of the
measured time of one operation, and checks the repository with a *verifier*. Nothing
depends on the machine's speed: on a busy machine the kills land in the same phases. Children
are forked from a forkserver that has already imported torch and ckptvcs, so a kill
round costs milliseconds, not an interpreter start.

Adding a scenario (kill during gc, gc racing a writer) is one more function here and
one more parametrized case in test_crash.py: ``run_kill_rounds(scenario, verify, ...)``.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckptvcs import Repo

CHUNK_SIZE = 4096

_context = None


def context():  # type: ignore[no-untyped-def]
    """The forkserver context (started once per test session, torch preloaded)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["torch", "numpy", "ckptvcs", "crash_harness"])
    return _context


# -- states ------------------------------------------------------------------------------


def make_state(seed: int) -> dict:
    """A deterministic training-like state of ~100-250 KB: some tensors change with the
    seed, one ("frozen") never does (dedup), sizes vary so blob boundaries move."""
    rng = np.random.default_rng(seed)
    n = 8_000 + (seed % 7) * 2_000
    return {
        "model": {
            "w": torch.from_numpy(rng.standard_normal(n).astype(np.float32)),
            "b": torch.from_numpy(rng.standard_normal(257).astype(np.float32)),
            "frozen": torch.from_numpy(np.random.default_rng(0).standard_normal(12_000).astype(np.float32)),
        },
        "optimizer": {"step": seed, "exp_avg": torch.from_numpy(rng.standard_normal(n // 2).astype(np.float16))},
        "ids": rng.integers(0, 1000, size=1000, dtype=np.int64),
        "seed": seed,
    }


def seed_of(message: str) -> int:
    assert message.startswith("seed "), message
    return int(message.split()[1])


# -- acknowledgements ---------------------------------------------------------------------


READY = "ready"  # first line a scenario writes: the kill timer starts only then


def ack(path: str, line: str) -> None:
    """Append one acknowledgement line with a single write (a kill cannot tear the earlier ones)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_acks(path: str | Path) -> list[list[str]]:
    """The complete acknowledgement lines (a torn last line is dropped)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [line.split() for line in lines[:-1] if line and line != READY]


# -- scenarios (run in the child) --------------------------------------------------------------


def scenario_commit(store: str, ack_path: str, first_seed: int) -> None:
    """Commit states in a loop to HEAD (and every third one to branch ``side``)."""
    with Repo.open(store) as repo:
        ack(ack_path, READY)
        seed = first_seed
        while True:
            branch = "side" if seed % 3 == 0 else None
            cid = repo.commit(make_state(seed), f"seed {seed}", branch=branch, code_version=None)
            ack(ack_path, f"{cid} {seed} {branch or '-'}")
            seed += 1


def scenario_stage_publish(store: str, ack_path: str, first_seed: int) -> None:
    """Commit states in a loop as stage then publish (the halves a distributed writer runs apart)."""
    with Repo.open(store) as repo:
        ack(ack_path, READY)
        seed = first_seed
        while True:
            staged = repo.stage(make_state(seed))
            cid = repo.publish(staged, f"seed {seed}", code_version=None)
            ack(ack_path, f"{cid} {seed} -")
            seed += 1


def scenario_init(parent: str, ack_path: str, first_seed: int) -> None:
    """Create repositories ``parent/r<seed>`` in a loop."""
    ack(ack_path, READY)
    seed = first_seed
    while True:
        Repo.init(Path(parent) / f"r{seed}", chunk_size=CHUNK_SIZE).close()
        ack(ack_path, f"r{seed}")
        seed += 1


def scenario_tag(store: str, ack_path: str, first_seed: int) -> None:
    """Create annotated tags ``t<seed>`` on HEAD in a loop."""
    with Repo.open(store) as repo:
        ack(ack_path, READY)
        seed = first_seed
        while True:
            target = repo.tag(f"t{seed}", message=f"tag {seed}")
            ack(ack_path, f"t{seed} {target}")
            seed += 1


def scenario_repair(store: str, ack_path: str, first_seed: int) -> None:
    """Rebuild the index in a loop (exclusive lock, build aside, swap)."""
    with Repo.open(store) as repo:
        ack(ack_path, READY)
        seed = first_seed
        while True:
            report = repo.repair_index()
            ack(ack_path, f"repair{seed} {report.chunks}")
            seed += 1


def scenario_gc(store: str, ack_path: str, first_seed: int) -> None:
    """Collect garbage in a loop (needs ``Repo.gc``, from the garbage-collection work)."""
    with Repo.open(store) as repo:
        ack(ack_path, READY)
        seed = first_seed
        while True:
            repo.gc()
            ack(ack_path, f"gc{seed}")
            seed += 1


def make_drift_state(seed: int) -> dict:
    """Step ``seed`` of a dense update: every weight moves a little, so a commit after
    the previous step stores every chunk as an XOR delta (work for repack)."""
    base = np.random.default_rng(0).standard_normal(6_000).astype(np.float32)
    drift = np.random.default_rng(seed).standard_normal(6_000).astype(np.float32) * 1e-4
    return {"w": torch.from_numpy(base + drift), "seed": seed}


def scenario_repack(store: str, ack_path: str, first_seed: int) -> None:
    """Repack in a loop (the verifier commits new delta tips between kills)."""
    with Repo.open(store) as repo:
        ack(ack_path, READY)
        seed = first_seed
        while True:
            repo.repack()
            ack(ack_path, f"repack{seed}")
            seed += 1


def scenario_slow(store: str, ack_path: str, first_seed: int) -> None:
    """Operations as slow as a busy machine makes them (0.3 s each): tests the harness itself."""
    ack(ack_path, READY)
    seed = first_seed
    while True:
        time.sleep(0.3)
        ack(ack_path, f"slow{seed}")
        seed += 1


# -- the kill loop ---------------------------------------------------------------------------------


HANG_GUARD = 600.0  # seconds; only so that a hung child fails the test instead of hanging it


@dataclass
class KillRound:
    number: int
    first_seed: int
    delay: float
    ack_path: Path


def _wait_for_acks(proc, ack_path: Path, count: int) -> None:  # type: ignore[no-untyped-def]
    """Block until the child wrote READY and then ``count`` acknowledgements.

    A child that dies first, or says nothing for HANG_GUARD seconds, fails the round
    with its exit code: a kill must never land before the child is set up.
    """
    deadline = time.monotonic() + HANG_GUARD
    while True:
        try:
            ready = Path(ack_path).read_text().startswith(READY)
        except FileNotFoundError:
            ready = False
        if ready and len(read_acks(ack_path)) >= count:
            return
        if not proc.is_alive():
            raise AssertionError(f"child exited with {proc.exitcode} before it was ready")
        assert time.monotonic() < deadline, f"child not ready after {HANG_GUARD:.0f} s"
        time.sleep(0.001)


def kill_child(target: Callable[..., None], args: tuple, delay: float) -> int | None:
    """Run ``target(store, ack_path, seed)`` in a forkserver child; SIGKILL it ``delay`` s after
    it reported ready; return its exit code."""
    return kill_child_timed(target, args, delay, pace=1.0)[0]


def kill_child_timed(
    target: Callable[..., None], args: tuple, fraction: float, *, pace: float | None = None, after_acks: int = 0
) -> tuple[int | None, float, float]:
    """Run ``target(store, ack_path, seed)`` in a forkserver child, wait until it reported ready
    and then acknowledged ``after_acks`` operations (``took`` seconds after ready), sleep
    ``fraction * pace`` seconds (``pace`` None: ``took``) and SIGKILL it.
    Returns (exit code, took, the delay slept)."""
    proc = context().Process(target=target, args=args, daemon=True)
    proc.start()
    ack_path = Path(args[1])
    _wait_for_acks(proc, ack_path, 0)
    ready_at = time.monotonic()
    _wait_for_acks(proc, ack_path, after_acks)
    took = time.monotonic() - ready_at
    seconds = fraction * (took if pace is None else pace)
    time.sleep(seconds)
    proc.kill()
    proc.join(HANG_GUARD)
    assert proc.exitcode is not None, "child did not die"
    return proc.exitcode, took, seconds


def run_kill_rounds(
    target: Callable[..., None],
    location: Callable[[], str],
    verify: Callable[[KillRound], None],
    *,
    rounds: int,
    workdir: Path,
    seed: int,
    spread: float = 1.2,
    max_delay: float | None = None,
) -> int:
    """``rounds`` times: start ``target(location(), ack_path, first_seed)``, SIGKILL it at a
    random moment, then ``verify``. Returns how many kills hit a child that was still running.

    Nothing depends on the machine's speed. The kill timer starts only once the child is
    ready; even rounds also wait for its first acknowledgement (so every run has
    acknowledged operations to check) and measure how long that operation took. The delay
    is a random fraction (0 to ``spread``) of the last measured operation time, so on a slow
    or busy machine the kills still fall across every phase of an operation. (``max_delay``,
    a fixed bound in seconds, is ignored: it made the phases hit depend on the machine.)
    """
    rng = random.Random(seed)
    killed_running = 0
    op_time = 0.0
    for number in range(rounds):
        first_seed = 1_000 * (number + 1) + seed
        after_acks = 1 if number % 2 == 0 else 0
        fraction = rng.uniform(0.0, spread)
        ack_path = workdir / f"acks-{number}.txt"
        args = (location(), str(ack_path), first_seed)
        # Even rounds: the operation just acknowledged is the pace; odd rounds: the last one seen.
        code, took, delay = kill_child_timed(
            target, args, fraction, pace=None if after_acks else op_time, after_acks=after_acks
        )
        if after_acks:
            op_time = took
        if code == -9:
            killed_running += 1
        else:  # the child failed on its own: show why
            raise AssertionError(f"round {number}: child exited with {code} before the kill")
        verify(KillRound(number, first_seed, delay, ack_path))
    return killed_running

"""SIGKILL harness for the crash suite (tests/test_crash.py).

A *scenario* is a module-level function run in a child process that does durable
work in a loop and appends one acknowledgement line to an ack file (one ``write()``
with O_APPEND) each time an operation has returned. The parent kills the child with
SIGKILL after a random delay, then checks the repository with a *verifier*. Children
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


# -- the kill loop ---------------------------------------------------------------------------------


@dataclass
class KillRound:
    number: int
    first_seed: int
    delay: float
    ack_path: Path


def kill_child(target: Callable[..., None], args: tuple, delay: float) -> int | None:
    """Run ``target(store, ack_path, seed)`` in a forkserver child; SIGKILL it ``delay`` s after
    it reported ready; return its exit code."""
    proc = context().Process(target=target, args=args, daemon=True)
    proc.start()
    ack_path = Path(args[1])
    deadline = time.monotonic() + 60
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            if ack_path.read_text().startswith(READY):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    time.sleep(delay)
    proc.kill()
    proc.join(30)
    assert proc.exitcode is not None, "child did not die"
    return proc.exitcode


def run_kill_rounds(
    target: Callable[..., None],
    location: Callable[[], str],
    verify: Callable[[KillRound], None],
    *,
    rounds: int,
    workdir: Path,
    seed: int,
    max_delay: float = 0.15,
) -> int:
    """``rounds`` times: start ``target(location(), ack_path, first_seed)``, SIGKILL it at a
    random moment, then ``verify``. Returns how many kills hit a child that was still running."""
    rng = random.Random(seed)
    killed_running = 0
    for number in range(rounds):
        first_seed = 1_000 * (number + 1) + seed
        delay = rng.uniform(0.002, max_delay)
        ack_path = workdir / f"acks-{number}.txt"
        code = kill_child(target, (location(), str(ack_path), first_seed), delay)
        if code == -9:
            killed_running += 1
        else:  # the child failed on its own: show why
            raise AssertionError(f"round {number}: child exited with {code} before the kill")
        verify(KillRound(number, first_seed, delay, ack_path))
    return killed_running

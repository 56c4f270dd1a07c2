"""Exact resume across process death: SIGKILL mid-run, and a SIGTERM preemption save.

Each run is a fresh Python process (tests/train_script.py). Resumed runs must produce
the same loss at every step and bit-identical final weights and optimizer state as an
uninterrupted run. A child that the test interrupts stops at a given step and waits for
the signal (``--wait-at``): where it stops never depends on the machine's speed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptvcs import Repo
from helpers import tensor_bits

SCRIPT = Path(__file__).with_name("train_script.py")
STEPS = 20
HANG_GUARD = 600  # seconds; only so that a hung child cannot hang the suite


def run(store: Path, out: Path, *args: str, timeout: float = HANG_GUARD) -> int:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--store", str(store), "--out", str(out), "--steps", str(STEPS), *args],
        timeout=timeout, capture_output=True, text=True,
    )
    if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
        raise AssertionError(f"training run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def start_until(store: Path, out: Path, step: int, *args: str) -> subprocess.Popen:
    """Start a run that stops after ``step`` and waits for a signal; return once it is there."""
    cmd = [sys.executable, str(SCRIPT), "--store", str(store), "--out", str(out), "--steps", str(STEPS),
           "--wait-at", str(step), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_GUARD
    while not (out.exists() and step in losses(out)[1]):
        if proc.poll() is not None:
            raise AssertionError(f"training run ended ({proc.returncode}) before step {step}:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no step {step} after {HANG_GUARD} s"
        time.sleep(0.01)
    return proc


def losses(out: Path) -> tuple[list[int], dict[int, list[str]]]:
    """(start step of each run, step -> every loss recorded for it)."""
    starts, by_step = [], {}
    for line in out.read_text().split("\n")[:-1]:  # complete lines only (the child may be writing)
        key, value = line.split()
        if key == "start":
            starts.append(int(value))
        else:
            by_step.setdefault(int(key), []).append(value)
    return starts, by_step


def final_state(store: Path) -> dict:
    with Repo.open(store) as repo:
        return repo.load("final", keys=["model", "optimizer"])


def assert_same_final_state(a: Path, b: Path) -> None:
    state_a, state_b = final_state(a), final_state(b)
    for name, tensor in state_a["model"].items():
        assert tensor_bits(tensor).equal(tensor_bits(state_b["model"][name])), name
    for index, slots in state_a["optimizer"]["state"].items():
        for slot, value in slots.items():
            assert tensor_bits(value).equal(tensor_bits(state_b["optimizer"]["state"][index][slot])), (index, slot)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, list[str]]]:
    """An uninterrupted run of STEPS steps."""
    folder = tmp_path_factory.mktemp("reference")
    assert run(folder / "store", folder / "losses.txt", "--every", "5") == 0
    starts, by_step = losses(folder / "losses.txt")
    assert starts == [0] and sorted(by_step) == list(range(1, STEPS + 1))
    return folder / "store", by_step


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_after_sigkill_is_exact(tmp_path, reference, mode) -> None:
    ref_store, ref_losses = reference
    store, out = tmp_path / "store", tmp_path / "losses.txt"
    extra = ["--async-save"] if mode == "async" else []
    assert run(store, out, "--every", "5", "--kill-at", "13", *extra) == -signal.SIGKILL
    assert run(store, out, "--every", "5", *extra) == 0
    starts, by_step = losses(out)
    # Sync: step 10 was durable before the kill. Async: the step-10 save may still have
    # been in flight when the process died; then the run resumes from step 5.
    assert starts[0] == 0 and (starts[1] == 10 if mode == "sync" else starts[1] in (5, 10))
    assert sorted(by_step) == list(range(1, STEPS + 1))
    for step, values in by_step.items():
        assert set(values) == set(ref_losses[step]), f"loss differs at step {step}"
    assert_same_final_state(ref_store, store)


def test_preemption_saves_then_terminates_and_resumes_exactly(tmp_path, reference) -> None:
    ref_store, ref_losses = reference
    store, out = tmp_path / "store", tmp_path / "losses.txt"
    proc = start_until(store, out, 3, "--preemption")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_GUARD) == -signal.SIGTERM  # the signal took its course after the save
    finally:
        proc.kill()
    _, before = losses(out)
    assert max(before) == 4  # the signal came while the run waited after step 3
    with Repo.open(store) as repo:
        head = repo.show()
        assert head.step == 4  # saved at the first step boundary after the signal
        assert "preemption: SIGTERM" in head.message
    assert run(store, out) == 0
    starts, by_step = losses(out)
    assert starts[1] == head.step
    for step, values in by_step.items():
        assert set(values) == set(ref_losses[step]), f"loss differs at step {step}"
    assert_same_final_state(ref_store, store)


@pytest.fixture(scope="module")
def loader_reference(tmp_path_factory) -> tuple[Path, dict[int, list[str]]]:
    """An uninterrupted run of STEPS steps on shuffled batches from a StatefulDataLoader."""
    folder = tmp_path_factory.mktemp("loader-reference")
    assert run(folder / "store", folder / "losses.txt", "--every", "5", "--loader") == 0
    _, by_step = losses(folder / "losses.txt")
    return folder / "store", by_step


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_resume_of_a_shuffled_loader_mid_epoch_is_exact(tmp_path, loader_reference, mode) -> None:
    """Killed at step 13 (an epoch is 8 steps): the step-10 checkpoint holds the loader's
    position in epoch 2; the resumed run sees the same batches, then a new epoch in the
    same shuffled order, as the uninterrupted run."""
    ref_store, ref_losses = loader_reference
    store, out = tmp_path / "store", tmp_path / "losses.txt"
    extra = ["--async-save"] if mode == "async" else []
    proc = start_until(store, out, 13, "--every", "5", "--loader", *extra)
    try:
        proc.kill()
        assert proc.wait(HANG_GUARD) == -signal.SIGKILL
    finally:
        proc.kill()
    assert run(store, out, "--every", "5", "--loader", *extra) == 0
    starts, by_step = losses(out)
    # Async: the step-10 save may still have been in flight at the kill; then it resumes at 5.
    assert starts[0] == 0 and (starts[1] == 10 if mode == "sync" else starts[1] in (5, 10))
    assert sorted(by_step) == list(range(1, STEPS + 1)) and len(by_step[11]) == 2
    for step, values in by_step.items():
        assert set(values) == set(ref_losses[step]), f"loss differs at step {step}"
    assert_same_final_state(ref_store, store)

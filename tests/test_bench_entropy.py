"""benchmarks/bench_entropy.py measures what docs/performance.md quotes: its code lengths,
its copy of the per-tensor estimate and its AdamW prediction are checked on tiny data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_entropy  # noqa: E402
import bench_sequences  # noqa: E402


def bits_per_byte(sizes: tuple[float, float], n: int) -> tuple[float, float]:
    return 8 * sizes[0] / n, 8 * sizes[1] / n


def test_code_lengths_of_noise_and_of_a_byte_its_context_decides() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 1 << 18, dtype=np.uint8)
    entropy, kt = bits_per_byte(bench_entropy.code_lengths(noise), noise.size)
    assert 7.99 < entropy <= 8.0 and entropy <= kt < 8.01
    # With a useless context the empirical entropy drops (it ignores the model's cost) but
    # the adaptive code length, an achievable size, rises above 8 bits: what the doc relies on.
    entropy, kt = bits_per_byte(bench_entropy.code_lengths(noise, bench_entropy._prev(noise), 256), noise.size)
    assert entropy < 8.0 < kt
    decided = noise ^ 0x5A  # fully determined by the context
    entropy, kt = bits_per_byte(bench_entropy.code_lengths(decided, noise, 256), noise.size)
    assert entropy == 0.0 and kt < 1.0  # KT pays ~log2(n)/2 bits per symbol and context to learn
    assert bench_entropy.code_lengths(decided, noise, 256)[1] < bench_entropy.code_lengths(decided)[1] / 8


def test_the_estimate_matches_bench_sequences(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weight = torch.randn(300, 200) * 0.05
    files = []
    for i in range(3):
        weight = weight + torch.randn_like(weight) * 1e-4
        state = {"model": {"w": weight.clone(), "h": torch.randn(64).to(torch.bfloat16), "n": torch.arange(10)}, "step": i}
        files.append(tmp_path / f"ckpt-{i}.pt")
        torch.save(state, files[-1])
    measured = bench_entropy.measure(files, zstd19_every=4)["totals"]
    assert measured["estimate"] == bench_sequences.estimate(files)["stored_bytes"]
    assert measured["floor"] <= measured["best"] <= measured["best-zstd"] <= measured["estimate"]
    assert 0 < measured["ckptvcs"] < 3 * 300 * 200 * 4


def test_one_adamw_step_is_predicted_from_the_stored_moments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    files = []
    for i in range(2):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        files.append(tmp_path / f"{i}.pt")
        torch.save({"model": {"encoder." + k: v for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict()}, files[-1])

    monkeypatch.setattr(bench_entropy, "optimized_weights",  # this model's parameter order
                        lambda sequence, state: [state["model"]["encoder.weight"], state["model"]["encoder.bias"]])
    sizes = bench_entropy.adamw_prediction("full", files, steps=1)
    # One step apart the prediction is exact up to rounding: far fewer bytes than the XOR.
    assert sizes["predicted zstd-1"] < 0.5 * sizes["xor zstd-1"]

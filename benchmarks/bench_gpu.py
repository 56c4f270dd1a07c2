"""The GPU rows of the performance targets, in one run on a machine with an NVIDIA GPU.

Why
---
Issue 16's GPU rows: a ~1.9 GB GPU-resident training state (fp32 weights + AdamW
moments of bench_core.TinyLM) committed against ``torch.save`` + fsync; loaded to the
GPU against ``torch.load(map_location="cuda")``, ``torch.load(mmap=True)`` + ``.cuda()``
and safetensors ``load_file(device="cuda")`` (warm page cache), from a keyframe and
from a commit two deltas deep; and the training-loop stall of an async
``CheckpointManager`` save against a pinned device-to-host copy of the same state.
Every comparison alternates the two sides (A, B, A, B ...) and quotes the median of the
pair-by-pair ratios. The report records the date, the GPU, the CPU and the load
average; ``--out`` writes it as JSON.

Without CUDA it prints why and exits 0 (nothing to measure; the project's tests never
need a GPU).

Run
---
    .venv/bin/python benchmarks/bench_gpu.py --out bench-out/gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --size-mb 300 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_peers  # noqa: E402

import ckptvcs  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def to_cuda(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.cuda()
    if isinstance(state, dict):
        return {k: to_cuda(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cuda(v) for v in state)
    return state


def synced(op: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    op()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def pairs(a: Any, b: Any, repeats: int, write: bool = False) -> dict[str, Any]:
    """Median of the a/b ratios over ``repeats`` alternating runs."""
    ta, tb = [], []
    for _ in range(repeats):
        for op, out in ((a, ta), (b, tb)):
            if write:
                os.sync()
            out.append(synced(op))
    ratios = [x / y for x, y in zip(ta, tb)]
    return {"a_median_s": statistics.median(ta), "b_median_s": statistics.median(tb),
            "ratio_median": statistics.median(ratios), "ratios": ratios}


def run(size_mb: float, repeats: int, work: Path) -> dict[str, Any]:
    cpu_state, names = bench_core.build_state(size_mb)
    state = to_cuda(cpu_state)
    nbytes = bench_core.state_nbytes(state)
    result: dict[str, Any] = {"state_bytes": nbytes}

    # Commit of a new GPU state (fresh repository each time) vs torch.save + fsync.
    def commit_fresh() -> None:
        shutil.rmtree(work / "fresh", ignore_errors=True)
        repo = ckptvcs.Repo.init(work / "fresh")
        repo.commit(state, code_version=None)
        repo.close()

    result["commit_new"] = pairs(commit_fresh, lambda: bench_core.torch_save_fsync(state, work / "t.pt"),
                                 repeats, write=True)

    # A repository with a keyframe and two deltas after it (dense fake AdamW steps).
    shutil.rmtree(work / "chain", ignore_errors=True)
    repo = ckptvcs.Repo.init(work / "chain")
    commits = []
    every = list(range(len(names)))
    for i in range(3):
        if i:
            bench_core.perturb(cpu_state, names, every, seed=i)
            state = to_cuda(cpu_state)
        commits.append(repo.commit(state, code_version=None))
    bench_core.torch_save_fsync(state, work / "t.pt")
    from safetensors.torch import load_file, save_file

    save_file(bench_peers.flatten(cpu_state), str(work / "t.safetensors"))
    torch_load = lambda: torch.load(work / "t.pt", map_location="cuda", weights_only=True)  # noqa: E731
    result["load_keyframe_vs_torch_load"] = pairs(lambda: repo.load(commits[0], map_location="cuda"), torch_load, repeats)
    result["load_2_deltas_vs_torch_load"] = pairs(lambda: repo.load(commits[2], map_location="cuda"), torch_load, repeats)
    result["torch_load_mmap_vs_torch_load"] = pairs(
        lambda: to_cuda(torch.load(work / "t.pt", mmap=True, weights_only=True)), torch_load, repeats)
    result["safetensors_cuda_vs_torch_load"] = pairs(
        lambda: load_file(str(work / "t.safetensors"), device="cuda"), torch_load, repeats)
    for key in list(result):
        if key.startswith(("load_", "torch_load_", "safetensors_")):
            result[key]["a_gb_per_s"] = nbytes / result[key]["a_median_s"] / 1e9
    repo.close()

    # Async-save stall against a pinned device-to-host copy of the same state.
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in bench_core.state_tensors(state)]

    def pinned_copy() -> None:
        for dst, src in zip(pinned, bench_core.state_tensors(state)):
            dst.copy_(src, non_blocking=True)

    stalls = []
    shutil.rmtree(work / "async", ignore_errors=True)
    with ckptvcs.CheckpointManager(ckptvcs.Repo.init(work / "async"), {"state": _Holder(state)},
                                   async_save=True, code_version=None) as mgr:
        for step in range(repeats + 1):
            stall = synced(lambda step=step: mgr.save(step))
            mgr.wait()
            if step:
                stalls.append(stall)
        mgr.repo.close()
    copies = [synced(pinned_copy) for _ in range(repeats)]
    result["async_stall"] = {"stall_median_s": statistics.median(stalls),
                             "pinned_copy_median_s": statistics.median(copies)}
    for path in ("fresh", "chain", "async", "t.pt", "t.safetensors"):
        target = work / path
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    return result


class _Holder:
    """A state the manager snapshots through state_dict() (as it does a model)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "gpu")
    parser.add_argument("--size-mb", type=float, default=1900.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; the GPU rows need a machine with an NVIDIA GPU (skipped)")
        return
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "machine": bench_core.machine_info(work),
              "load_average_start": os.getloadavg()}
    report.update(run(args.size_mb, args.repeats, work))
    report["load_average_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

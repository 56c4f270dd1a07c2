"""Training-loop stall of CheckpointManager saves: async against sync, same state, one run.

What it measures, and why
-------------------------
A checkpoint costs a training loop the time the loop cannot run. With a synchronous
save that is the whole commit (hash, compress, write, fsync, ref update). With
``async_save=True`` the loop waits only for the copy of the state to host memory; the
commit runs on a background thread while the loop computes. This script measures, for
the same live model + AdamW state (the transformer-like stack of bench_core.py, all
float32 weights and moments changed before every save, so no chunk dedups):

* ``stall``: wall time of ``mgr.save(step)`` as the loop sees it, sync against async;
* ``durable``: for async, the time from the save call until the commit is durable
  (measured with ``wait()`` after the simulated compute);
* the ratio async stall / sync stall (lower is better), from one run.

Between saves the loop "computes" for ``--compute-s`` seconds (a sleep: on a GPU
trainer the CPU is mostly idle while kernels run, which is the case async save
overlaps with). The first save of each mode is an untimed warm-up.

Run
---
    .venv/bin/python benchmarks/bench_manager.py                 # ~300 MB state, 4 timed saves per mode
    .venv/bin/python benchmarks/bench_manager.py --size-mb 40 --saves 2   # quick
"""

from __future__ import annotations

import argparse
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
from bench_core import MB, SEED, TinyLM, machine_info, machine_line, model_dim  # noqa: E402

import ckptvcs  # noqa: E402


def build_run(size_mb: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model = TinyLM(model_dim(size_mb))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


@torch.no_grad()
def train_a_little(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Change every weight and moment in place, as a full fine-tuning step would."""
    factor = 1.0 + 1e-4 * step
    for p in model.parameters():
        p.mul_(factor)
    for slots in opt.state.values():
        for value in slots.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value.mul_(factor)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for slots in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in slots.values() if isinstance(v, torch.Tensor))
    return total


def measure(mode: str, model, opt, work: Path, saves: int, compute_s: float) -> dict[str, Any]:
    store = work / f"store-{mode}"
    shutil.rmtree(store, ignore_errors=True)
    stalls, durable = [], []
    with ckptvcs.CheckpointManager(
        ckptvcs.Repo.init(store), {"model": model, "optimizer": opt},
        async_save=(mode == "async"), code_version=None,
    ) as mgr:
        for step in range(saves + 1):
            train_a_little(model, opt, step)
            os.sync()  # no timed fsync pays for earlier dirty pages
            finished: list[float] = []
            start = time.perf_counter()
            result = mgr.save(step)
            stall = time.perf_counter() - start
            if mode == "async":
                result.add_done_callback(lambda _: finished.append(time.perf_counter()))
            time.sleep(compute_s)  # the loop computes while an async save proceeds
            mgr.wait()
            if step > 0:  # step 0 is the warm-up
                stalls.append(stall)
                durable.append(finished[0] - start if finished else stall)
        # The last save happened after the last change: what it committed must be the live state.
        committed = mgr.repo.load(mgr.last_commit, keys=["model"])["model"]
        if not all(torch.equal(committed[k], v) for k, v in model.state_dict().items()):
            raise SystemExit(f"{mode}: the committed state differs from the state at save time")
        mgr.repo.close()
    shutil.rmtree(store, ignore_errors=True)
    return {
        "stall_s": {"best": min(stalls), "median": statistics.median(stalls), "samples": stalls},
        "durable_s": {"best": min(durable), "median": statistics.median(durable)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=300)
    parser.add_argument("--saves", type=int, default=4, help="timed saves per mode (after one warm-up)")
    parser.add_argument("--compute-s", type=float, default=3.0, help="simulated compute between saves")
    parser.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent.parent / "bench-out")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    model, opt = build_run(args.size_mb)
    nbytes = state_bytes(model, opt)
    report: dict[str, Any] = {
        "machine": machine_info(args.work_dir),
        "state_bytes": nbytes,
        "compute_s": args.compute_s,
        "saves": args.saves,
    }
    for mode in ("sync", "async"):
        report[mode] = measure(mode, model, opt, args.work_dir, args.saves, args.compute_s)
    report["stall_ratio_best"] = report["async"]["stall_s"]["best"] / report["sync"]["stall_s"]["best"]
    report["stall_ratio_median"] = report["async"]["stall_s"]["median"] / report["sync"]["stall_s"]["median"]

    print(machine_line(report["machine"]))
    print(f"state: {nbytes / MB:.0f} MB (model + AdamW), every byte changed before each save; "
          f"{args.saves} timed saves per mode, {args.compute_s:g} s simulated compute between saves")
    print(f"{'':<28}{'sync':>12}{'async':>12}{'async/sync':>12}")
    for label, key in (("loop stall, best", "best"), ("loop stall, median", "median")):
        s, a = report["sync"]["stall_s"][key], report["async"]["stall_s"][key]
        print(f"{label:<28}{s:>11.3f}s{a:>11.3f}s{a / s:>11.2f}x")
    print(f"{'save durable after, median':<28}{report['sync']['durable_s']['median']:>11.3f}s"
          f"{report['async']['durable_s']['median']:>11.3f}s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

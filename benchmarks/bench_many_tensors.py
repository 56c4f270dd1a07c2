"""Reading a state of many small tensors: load, diff and the everyday commands, per tensor.

Why
---
Issue 16 asks that nothing slow down with the number of tensors (100,000 small tensors in
one state). A load used to pay, per tensor, an LMDB read transaction and a pool task, and
a diff a whole read per changed tensor (docs/performance.md, "Many small tensors"). This
script builds one repository per size (``--sizes``), each holding two commits of
bench_tensors_commit.py's state (``{"model": {"layer<i>.weight": 16 floats, ...}, "step":
n}``), the second with every tenth tensor changed, and measures in one run:

* ``Repo.load`` of the newest commit against ``torch.load`` of the same state saved by
  ``torch.save``, alternating (torch, ckptvcs, torch, ...), ratio per pair;
* ``Repo.diff`` of the two commits (10% of the tensors compared value by value);
* ``log -n 20``, ``status`` (what the CLI computes, as bench_scale.py) and ``checkout``
  of the branch;

each as process CPU time (every thread; the figure that survives a busy machine), wall
time, and the CPU per tensor at each size against the smallest size: 1.0 means linear.
Commit costs per tensor are in benchmarks/bench_tensors_commit.py.

Run
---
    .venv/bin/python benchmarks/bench_many_tensors.py --quick      # 1,000 and 20,000 tensors
    .venv/bin/python benchmarks/bench_many_tensors.py              # 1,000 / 10,000 / 100,000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_scale  # noqa: E402
import bench_tensors_commit  # noqa: E402

from ckptvcs import Repo  # noqa: E402

Timing = tuple[float, float]  # (wall seconds, process CPU seconds)


def timed(op: Callable[[], Any]) -> Timing:
    wall, cpu, _ = bench_core.timed_cpu(op)
    return wall, cpu


def build(folder: Path, n: int) -> tuple[Repo, Path]:
    """A repository of two commits of bench_tensors_commit's state of ``n`` small tensors
    (every tenth changed in the second)."""
    state = bench_tensors_commit.make_state(n)
    repo = Repo.init(folder / "repo")
    repo.commit(state, message="first")
    bench_tensors_commit.change_tenth(state)
    repo.commit(state, message="second")
    saved = folder / "state.pt"
    torch.save(state, saved)
    return repo, saved


def measure(n: int, repeats: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-many-{n}-"))
    try:
        repo, saved = build(folder, n)
        pairs: list[tuple[Timing, Timing]] = []
        for _ in range(repeats):
            pairs.append((timed(lambda: torch.load(saved, weights_only=True)), timed(lambda: repo.load())))
        rows: dict[str, list[Timing]] = {"diff": [], "log -n 20": [], "status": [], "checkout": []}
        for _ in range(repeats):
            rows["diff"].append(timed(lambda: repo.diff("HEAD~1", "HEAD")))
            rows["log -n 20"].append(timed(lambda: repo.log(n=20)))
            rows["status"].append(timed(lambda: bench_scale.status(repo)))
            rows["checkout"].append(timed(lambda: repo.checkout("main")))
        changed = len(repo.diff("HEAD~1", "HEAD"))
        repo.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result: dict[str, Any] = {
        "tensors": n,
        "diff_entries": changed,
        "load": {
            "wall": statistics.median(m[0] for _, m in pairs),
            "cpu": statistics.median(m[1] for _, m in pairs),
            "torch_load_wall": statistics.median(t[0] for t, _ in pairs),
            "torch_load_cpu": statistics.median(t[1] for t, _ in pairs),
            "ratio_wall": statistics.median(m[0] / t[0] for t, m in pairs),
            "ratio_cpu": statistics.median(m[1] / t[1] for t, m in pairs),
        },
    }
    for name, timings in rows.items():
        result[name] = {"wall": statistics.median(w for w, _ in timings), "cpu": statistics.median(c for _, c in timings)}
    return result


def render(results: list[dict[str, Any]]) -> str:
    base = results[0]
    lines = [
        "| tensors | load / torch.load (wall, CPU) | load CPU µs/tensor | diff CPU µs/tensor | "
        "log -n 20 CPU ms | status CPU ms | checkout CPU ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n = r["tensors"]
        load_us, diff_us = r["load"]["cpu"] / n * 1e6, r["diff"]["cpu"] / n * 1e6
        growth = "" if r is base else (
            f" ({load_us / (base['load']['cpu'] / base['tensors'] * 1e6):.2f}x of {base['tensors']:,})"
        )
        diff_growth = "" if r is base else (
            f" ({diff_us / (base['diff']['cpu'] / base['tensors'] * 1e6):.2f}x)"
        )
        lines.append(
            f"| {n:,} | {r['load']['ratio_wall']:.2f}x, {r['load']['ratio_cpu']:.2f}x | {load_us:.0f}{growth} | "
            f"{diff_us:.0f}{diff_growth} | {r['log -n 20']['cpu'] * 1e3:.1f} | {r['status']['cpu'] * 1e3:.1f} | "
            f"{r['checkout']['cpu'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1,000 and 20,000 tensors, 2 repeats")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes, repeats = ([1000, 20_000], 2) if args.quick else (sorted(args.sizes), args.repeats)
    results = []
    for n in sizes:
        print(f"{n:,} tensors ...", file=sys.stderr, flush=True)
        results.append(measure(n, repeats))
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Commit cost per tensor: many small tensors in one state (issue 16, "Scale").

Why
---
A state of many small tensors (a model with many layers, per-parameter optimizer
state) pays ckptvcs's per-tensor CPU cost: walking the state, grouping storages,
choosing delta bases, one chunk per tensor, the manifest. This script commits
``{"model": {"layer<i>.weight": torch.randn(16) ...}, "step": 1}`` at several sizes and
reports, per tensor, the commit's process CPU time (``time.process_time``: every
thread, so the store's pool counts) and wall time, for

* the first commit of the state into a new repository, and
* a second commit with every 10th tensor changed (delta bases from the first),

against ``torch.save`` + fsync of the same state, as alternating pairs (save, commit,
save, commit) in one run; the ratio is taken pair by pair (median). CPU time does not
depend on the machine's load, wall time does: quote the load average printed with it.
Per-tensor figures that grow with the size are the superlinear cost this benchmark is
for. It also prints the ids of both manifests of the first pair: the same state must
give the same manifests before and after a change to the commit path (the seed is
fixed; compare the ids printed by two checkouts).

``--baseline DIR`` (a folder holding an older ``ckptvcs`` package, e.g. from ``git
worktree add /tmp/base main`` or ``git archive main ckptvcs | tar -x -C /tmp/base``) also
measures that code in the same run: each pair is then one child process on the old code
and one on the current code, alternating, each measuring every size in turn (one pair
each), and the table gives the per-tensor CPU time of both and their ratio pair by
pair, and says whether both wrote the same manifests.

Run
---
    .venv/bin/python benchmarks/bench_tensors_commit.py            # 1k, 10k, 100k tensors
    .venv/bin/python benchmarks/bench_tensors_commit.py --quick    # 1k and 20k
    .venv/bin/python benchmarks/bench_tensors_commit.py --sizes 5000 --pairs 3
    .venv/bin/python benchmarks/bench_tensors_commit.py --quick --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptvcs


def make_state(n: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": {f"layer{i}.weight": torch.randn(16) for i in range(n)}, "step": 1}


def change_tenth(state: dict[str, Any]) -> None:
    """Move every 10th tensor (as a sparse update would) and the step."""
    model = state["model"]
    for i in range(0, len(model), 10):
        model[f"layer{i}.weight"].add_(1.0)
    state["step"] += 1


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU seconds, wall seconds, result) of ``fn()``."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - c0, time.perf_counter() - w0, result


def torch_save(state: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def run_size(n: int, pairs: int, workdir: Path) -> dict[str, Any]:
    warm = ckptvcs.Repo.init(workdir / f"warm-{n}")  # imports and first-use set-up, not measured
    warm.commit(make_state(10), code_version=None)
    warm.close()
    shutil.rmtree(workdir / f"warm-{n}")
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("save1", "commit1", "save2", "commit2")}
    manifests: tuple[str, str] | None = None
    for p in range(pairs):
        folder = workdir / f"n{n}-p{p}"
        folder.mkdir()
        repo = ckptvcs.Repo.init(folder / "repo")
        state = make_state(n)
        c, w, _ = timed(lambda: torch_save(state, folder / "a.pt"))
        rows["save1"].append((c, w))
        c, w, first = timed(lambda: repo.commit(state, "first", code_version=None))
        rows["commit1"].append((c, w))
        change_tenth(state)
        c, w, _ = timed(lambda: torch_save(state, folder / "b.pt"))
        rows["save2"].append((c, w))
        c, w, second = timed(lambda: repo.commit(state, "second", code_version=None))
        rows["commit2"].append((c, w))
        if manifests is None:
            manifests = (repo.show(first).manifest, repo.show(second).manifest)
        repo.close()
        shutil.rmtree(folder)
    return {"n": n, "rows": rows, "manifests": manifests}


def per_tensor_us(values: list[tuple[float, float]], n: int, which: int) -> float:
    return statistics.median(v[which] for v in values) / n * 1e6


def ratio(commits: list[tuple[float, float]], saves: list[tuple[float, float]], which: int) -> float:
    return statistics.median(c[which] / max(s[which], 1e-9) for c, s in zip(commits, saves))


def report(result: dict[str, Any]) -> None:
    n, rows = result["n"], result["rows"]
    print(f"\n{n:,} tensors of 16 float32 ({len(rows['commit1'])} pairs)")
    print(f"  {'':32} {'CPU us/tensor':>14} {'wall us/tensor':>15} {'CPU ratio':>10} {'wall ratio':>11}")
    for label, commit, save in (("first commit", "commit1", "save1"), ("second commit (10% changed)", "commit2", "save2")):
        print(f"  {label:32} {per_tensor_us(rows[commit], n, 0):14.1f} {per_tensor_us(rows[commit], n, 1):15.1f} "
              f"{ratio(rows[commit], rows[save], 0):10.2f} {ratio(rows[commit], rows[save], 1):11.2f}")
        print(f"  {'  torch.save + fsync':32} {per_tensor_us(rows[save], n, 0):14.1f} {per_tensor_us(rows[save], n, 1):15.1f}")
    first, second = result["manifests"]
    print(f"  manifests: first {first}  second {second}")


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_child(code: Path, sizes: list[int], workdir: Path) -> list[dict[str, Any]]:
    """One pair at each size, in order, in a child process importing ckptvcs from ``code``
    (every size in one process, as the main run measures them)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--sizes", ",".join(map(str, sizes)), "--pairs", "1",
         "--dir", str(workdir)],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def compare(sizes: list[int], pairs: int, baseline: Path, workdir: Path) -> None:
    """Alternate children on the old and the current code; per-tensor CPU and their ratios."""
    runs: dict[str, list[list[dict[str, Any]]]] = {"before": [], "after": []}
    for _ in range(pairs):
        runs["before"].append(run_child(baseline, sizes, workdir))
        runs["after"].append(run_child(PROJECT_ROOT, sizes, workdir))
    for i, n in enumerate(sizes):
        print(f"\n{n:,} tensors: before ({baseline}) and after (this checkout), {pairs} alternating process "
              "pairs, CPU time")
        print(f"  {'':32} {'before us/tensor':>17} {'after us/tensor':>16} {'after/before':>13}")
        for label, key in (("first commit", "commit1"), ("second commit (10% changed)", "commit2"),
                           ("torch.save + fsync (first)", "save1")):
            before = [r[i]["rows"][key][0][0] / n * 1e6 for r in runs["before"]]
            after = [r[i]["rows"][key][0][0] / n * 1e6 for r in runs["after"]]
            ratios = statistics.median(a / b for a, b in zip(after, before))
            print(f"  {label:32} {statistics.median(before):17.1f} {statistics.median(after):16.1f} {ratios:13.2f}")
        same = {tuple(r[i]["manifests"]) for r in runs["before"] + runs["after"]}
        print(f"  manifests identical before and after: {'yes' if len(same) == 1 else 'NO'} {sorted(same)[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 20,000 tensors, 3 pairs")
    parser.add_argument("--sizes", default=None, help="comma-separated tensor counts (default 1000,10000,100000)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per size (default 3; 2 at 100,000)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--baseline", default=None, help="folder holding an older ckptvcs package to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1000,20000" if args.quick else "1000,10000,100000")).split(",")]
    if args.child:  # raw figures as JSON for compare()
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="child-") as tmp:
            print(json.dumps([run_size(n, args.pairs or 1, Path(tmp)) for n in sizes]))
        return
    print(f"ckptvcs {Path(ckptvcs.__file__).parent}, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-tensors-") as tmp:
        for n in sizes:
            pairs = args.pairs or (2 if n >= 100_000 else 3)
            report(run_size(n, pairs, Path(tmp)))
        if args.baseline:
            compare(sizes, args.pairs or (2 if max(sizes) >= 100_000 else 3), Path(args.baseline).resolve(), Path(tmp))
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

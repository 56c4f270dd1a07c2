"""Everyday commands on a long history: 10,000 commits against 10.

Why
---
``log -n 20``, ``status``, ``checkout`` and ``stats`` must not slow down with the length
of the history (issue 16: at most 1.5x at 10,000 commits against 10). This script builds
two repositories the way bench_catalog.py does (one real commit, the others commit
objects on the same manifest, chained by parent; the same records ``Repo.commit``
writes) and times each operation on both, alternating (small, large, small, large ...),
so the ratio large/small is taken pair by pair on a machine whose speed drifts:

* library: ``Repo.log(n=20)``; ``status`` as the CLI computes it (``head``, ``show``,
  ``last_fsck``; with ``--gc`` also ``gc(dry_run=True)``); ``checkout`` of the branch
  (HEAD re-pointed, reflog appended); ``stats()`` (its cache warm from the previous
  call, as in use) and ``stats()`` with its cache deleted first (a first run); and
  ``commit`` of a tiny state on top;
* the same commands through the CLI in a subprocess (start-up included):
  ``log -n 20``, ``status``, ``checkout main``, ``stats``.

Run
---
    .venv/bin/python benchmarks/bench_scale.py                   # 10 vs 10,000 commits
    .venv/bin/python benchmarks/bench_scale.py --large 2000      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_catalog  # noqa: E402

from ckptvcs import Repo, layout  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def status(repo: Repo, with_gc: bool = False) -> None:
    """What `ckptvcs status` computes (with ``with_gc``: `ckptvcs status --gc`)."""
    _, head_id = repo.head()
    if head_id:
        repo.show(head_id)
    if with_gc:
        repo.gc(dry_run=True)
    repo.last_fsck()


def stats_uncached(repo: Repo) -> None:
    """stats() without its cache (the first run on a repository, or after the cache was lost)."""
    (repo.root / layout.STATS_CACHE).unlink(missing_ok=True)
    repo.stats()


def operations(repo: Repo) -> dict[str, Callable[[], Any]]:
    state = {"w": np.zeros(4, dtype=np.float32)}
    return {
        "log -n 20": lambda: repo.log(n=20),
        "status": lambda: status(repo),
        "status --gc": lambda: status(repo, with_gc=True),
        "checkout": lambda: repo.checkout("main"),
        "stats": repo.stats,
        "stats (cache dropped)": lambda: stats_uncached(repo),
        "commit (tiny)": lambda: repo.commit(state, code_version=None),
    }


def cli_commands(root: Path) -> dict[str, list[str]]:
    exe = str(Path(sys.executable).with_name("ckptvcs"))
    base = [exe, "--repo", str(root)]
    return {"cli log -n 20": [*base, "log", "-n", "20"], "cli status": [*base, "status"],
            "cli checkout": [*base, "checkout", "main"], "cli stats": [*base, "stats"]}


def once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(small: Repo, large: Repo, small_root: Path, large_root: Path, repeats: int, cli: bool) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    ops_s, ops_l = operations(small), operations(large)
    todo: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [(k, ops_s[k], ops_l[k]) for k in ops_s]
    if cli:
        cs, cl = cli_commands(small_root), cli_commands(large_root)
        for k in cs:
            todo.append((k, lambda a=cs[k]: subprocess.run(a, check=True, capture_output=True),
                         lambda a=cl[k]: subprocess.run(a, check=True, capture_output=True)))
    for name, fs, fl in todo:
        fs(), fl()  # warm
        pairs = [(once(fs), once(fl)) for _ in range(repeats)]
        ratios = [b / a for a, b in pairs]
        rows[name] = {"small_median_s": statistics.median(a for a, _ in pairs),
                      "large_median_s": statistics.median(b for _, b in pairs),
                      "ratio_median": statistics.median(ratios), "ratios": ratios}
        print(f"  {name}: {rows[name]['ratio_median']:.2f}x", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "scale")
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cli", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    work = args.work_dir.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    small = bench_catalog.build(work / "small", args.small)
    large = bench_catalog.build(work / "large", args.large)
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    load_start = os.getloadavg()[0]
    try:
        rows = measure(small, large, work / "small", work / "large", args.repeats, not args.no_cli)
    finally:
        small.close()
        large.close()
    report = {"small": args.small, "large": args.large, "load_average": [load_start, os.getloadavg()[0]],
              "cores": os.cpu_count(), "rows": rows}
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"pairs alternate, medians quoted\n")
    print(f"| operation | {args.small} commits | {args.large} commits | ratio (median of pairs) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['small_median_s'] * 1000:.1f} ms | {r['large_median_s'] * 1000:.1f} ms | "
              f"{r['ratio_median']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

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
  ``log -n 20``, ``status``, ``checkout main``, ``stats``, ``log --where``, ``best``.

Each row gives the wall-clock and the CPU time (``time.process_time`` plus the finished
children's, so the CLI rows count their subprocess) and their large/small ratios,
medians over the pairs.

Run
---
    .venv/bin/python benchmarks/bench_scale.py                   # 10 vs 10,000 commits
    .venv/bin/python benchmarks/bench_scale.py --large 2000      # quicker
    .venv/bin/python benchmarks/bench_scale.py --quick           # 2,000 commits, 3 pairs, no CLI
    .venv/bin/python benchmarks/bench_scale.py --only stats --only find   # some rows only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from ckptvcs.backends.local import TOKEN_MIN_AGE  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WHERE = ("val_loss < 0.3", "data_version == 'v2'")  # bench_catalog.py's query


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
    (repo.root / layout.STATS_CACHE_COMMITS).unlink(missing_ok=True)
    repo.stats()


def move_a_tag(repo: Repo, _moved: dict[int, bool] = {}) -> None:  # noqa: B006 (a per-repo toggle)
    """Move the tag ``bench-moving`` between HEAD~1 and HEAD~2 (not timed): the next stats()
    finds other tips and walks the reachable set again over its commit table."""
    _moved[id(repo)] = not _moved.get(id(repo), False)
    repo.tag("bench-moving", "HEAD~1" if _moved[id(repo)] else "HEAD~2", force=True)


# Operations timed after an untimed preparation (so that what is timed is the call alone).
PREPARE: dict[str, Callable[[Repo], Any]] = {"stats (tips moved)": move_a_tag}


def operations(repo: Repo) -> dict[str, Callable[[], Any]]:
    state = {"w": np.zeros(4, dtype=np.float32)}
    return {
        "log -n 20": lambda: repo.log(n=20),
        "status": lambda: status(repo),
        "status --gc": lambda: status(repo, with_gc=True),
        "checkout": lambda: repo.checkout("main"),
        "stats": repo.stats,
        "stats (tips moved)": repo.stats,
        "stats (cache dropped)": lambda: stats_uncached(repo),
        "find": lambda: repo.find(*WHERE),
        "best": lambda: repo.best("val_loss", k=3),
        "commit (tiny)": lambda: repo.commit(state, code_version=None),
    }


def cli_commands(root: Path) -> dict[str, list[str]]:
    exe = str(Path(sys.executable).with_name("ckptvcs"))
    base = [exe, "--repo", str(root)]
    where = [a for w in WHERE for a in ("--where", w)]
    return {"cli log -n 20": [*base, "log", "-n", "20"], "cli status": [*base, "status"],
            "cli log --where": [*base, "log", "--json", *where], "cli best": [*base, "best", "--metric", "val_loss"],
            "cli checkout": [*base, "checkout", "main"], "cli stats": [*base, "stats"]}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the CLI subprocesses)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def once(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children) of one call."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def measure(small: Repo, large: Repo, small_root: Path, large_root: Path, repeats: int, cli: bool,
            only: list[str] | None = None) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    ops_s, ops_l = operations(small), operations(large)
    todo: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [(k, ops_s[k], ops_l[k]) for k in ops_s]
    prepare = {k: (lambda p=p: p(small), lambda p=p: p(large)) for k, p in PREPARE.items()}
    if cli:
        cs, cl = cli_commands(small_root), cli_commands(large_root)
        for k in cs:
            todo.append((k, lambda a=cs[k]: subprocess.run(a, check=True, capture_output=True),
                         lambda a=cl[k]: subprocess.run(a, check=True, capture_output=True)))
    todo = [t for t in todo if not only or t[0] in only]
    for name, fs, fl in todo:
        ps, pl = prepare.get(name, (lambda: None, lambda: None))
        ps(), fs(), pl(), fl()  # warm
        pairs = []
        for _ in range(repeats):
            ps()
            small_time = once(fs)
            pl()
            pairs.append((small_time, once(fl)))
        ratios = [b[0] / a[0] for a, b in pairs]
        cpu_ratios = [b[1] / a[1] if a[1] else float("nan") for a, b in pairs]
        rows[name] = {"small_median_s": statistics.median(a[0] for a, _ in pairs),
                      "large_median_s": statistics.median(b[0] for _, b in pairs),
                      "small_cpu_median_s": statistics.median(a[1] for a, _ in pairs),
                      "large_cpu_median_s": statistics.median(b[1] for _, b in pairs),
                      "ratio_median": statistics.median(ratios), "ratios": ratios,
                      "cpu_ratio_median": statistics.median(cpu_ratios)}
        print(f"  {name}: {rows[name]['ratio_median']:.2f}x (CPU {rows[name]['cpu_ratio_median']:.2f}x)",
              file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "scale")
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cli", action="store_true")
    parser.add_argument("--only", action="append", help="time only this operation (repeatable)")
    parser.add_argument("--quick", action="store_true", help="2,000 commits, 3 pairs, no CLI")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.large, args.repeats, args.no_cli = min(args.large, 2000), 3, True
    work = args.work_dir.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    small = bench_catalog.build(work / "small", args.small)
    large = bench_catalog.build(work / "large", args.large)
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    # stats() trusts a folder's change token only once the folder is TOKEN_MIN_AGE seconds
    # old (coarse file-system clocks); a user's history is older than that, a fresh build is not.
    time.sleep(TOKEN_MIN_AGE + 1)
    load_start = os.getloadavg()[0]
    try:
        rows = measure(small, large, work / "small", work / "large", args.repeats, not args.no_cli, args.only)
    finally:
        small.close()
        large.close()
    report = {"small": args.small, "large": args.large, "load_average": [load_start, os.getloadavg()[0]],
              "cores": os.cpu_count(), "rows": rows}
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"pairs alternate, medians quoted\n")
    print(f"| operation | {args.small} commits | {args.large} commits | ratio (median of pairs) "
          f"| CPU {args.small} | CPU {args.large} | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['small_median_s'] * 1000:.1f} ms | {r['large_median_s'] * 1000:.1f} ms | "
              f"{r['ratio_median']:.2f}x | {r['small_cpu_median_s'] * 1000:.1f} ms | "
              f"{r['large_cpu_median_s'] * 1000:.1f} ms | {r['cpu_ratio_median']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

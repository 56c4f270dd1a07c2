"""Catalog queries on a long history: ``Repo.find`` / ``Repo.best`` / ``ckptvcs log --where``.

What it measures, and why
-------------------------
``find`` and ``best`` scan the commit records of a history (no index): this script
checks that a scan stays fast enough on 10,000 commits, the size of a long run that
checkpoints often. It times, in one run:

* ``log``: ``Repo.log()`` of the whole history (the walk every query starts from);
* ``find``: ``Repo.find("val_loss < 0.3", "data_version == 'v2'")``;
* ``best``: ``Repo.best("val_loss", k=3)``;
* ``cli``: ``ckptvcs log --where ... --json`` in a subprocess (start-up included).

How the history is built
------------------------
Committing 10,000 states through ``Repo.commit`` costs ~20 ms each (fsyncs), so the
script commits one tiny state the normal way, then writes the other commits' objects
directly through the repository's object store (``repo.objects.put("commit", ...)``,
each on the same manifest, chained by parent) and moves the branch once with
``refs.set_if_equals``. The records are the same objects ``Repo.commit`` writes; only
the per-commit fsync cost of building the fixture is skipped.

With ``--compare SRC`` (another checkout of ckptvcs, e.g. the main branch before a
change) it also times ``find`` and ``best`` on the same repository with each source tree,
in fresh interpreters taking turns, and prints the ratio (``before_s / after_s``).

Run
---
    .venv/bin/python benchmarks/bench_catalog.py                  # 10,000 commits
    .venv/bin/python benchmarks/bench_catalog.py --commits 2000   # quick
    .venv/bin/python benchmarks/bench_catalog.py --compare /work/main
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from ckptvcs import Repo


def build(path: Path, commits: int) -> Repo:
    """A repository whose main branch holds ``commits`` commits with metrics and a config."""
    repo = Repo.init(path)
    first = repo.commit({"w": np.zeros(4, dtype=np.float32)}, "c0", step=0, metrics={"val_loss": 1.0},
                        data_version="v1", code_version=None)
    base = repo.objects.read_commit(first)
    start = datetime.fromisoformat(base.time.replace("Z", "+00:00"))
    parent = first
    for i in range(1, commits):
        record = replace(base, parents=(parent,), message=f"c{i}", step=i * 10,
                         time=(start + timedelta(seconds=i)).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                         metrics={"val_loss": 1.0 / (1 + i % 997), "acc": (i % 101) / 100},
                         data_version="v1" if i % 2 else "v2", config={"optim": {"lr": 10.0 ** -(i % 5)}})
        parent = repo.objects.put("commit", record.to_json())
    repo.refs.set_if_equals("refs/heads/main", first, parent, who="bench", message="bench: synthetic history")
    return repo


def timed(fn: object, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


_QUERY = """
import sys, time
sys.path.insert(0, sys.argv[1])
from ckptvcs import Repo
repo = Repo.open(sys.argv[2])
best = {}
for name, query in (("find", lambda: repo.find("val_loss < 0.3", "data_version == 'v2'")),
                    ("best", lambda: repo.best("val_loss", k=3)),
                    ("find1", lambda: repo.find("val_loss < 0.00101"))):
    start, cpu = time.perf_counter(), time.process_time()
    query()
    best[name] = time.perf_counter() - start
    best[name + "_cpu"] = time.process_time() - cpu
print(*(best[k] for k in ("find", "best", "find1", "find_cpu", "best_cpu", "find1_cpu")))
"""
_NAMES = ("find", "best", "find1", "find_cpu", "best_cpu", "find1_cpu")


def compare(repo_path: Path, before_src: Path, rounds: int = 3) -> dict[str, float]:
    """Best-of-``rounds`` times of find and best with ``before_src`` and this checkout, taking
    turns, in fresh interpreters: wall and CPU (``_cpu``) seconds, and before/after ratios.
    ``find1`` is a query matching a handful of commits (find must read every match)."""
    after_src = Path(__file__).resolve().parent.parent
    times: dict[str, list[float]] = {f"{label}_{name}": [] for label in ("before", "after") for name in _NAMES}
    for _ in range(rounds):
        for label, src in (("before", before_src), ("after", after_src)):
            out = subprocess.run([sys.executable, "-c", _QUERY, str(src), str(repo_path)], check=True,
                                 capture_output=True, text=True).stdout.split()
            for name, value in zip(_NAMES, out):
                times[f"{label}_{name}"].append(float(value))
    result = {k: round(min(v), 4) for k, v in times.items()}
    for name in _NAMES:
        result[f"{name}_ratio"] = round(result[f"before_{name}"] / max(result[f"after_{name}"], 1e-6), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--compare", type=Path, help="another ckptvcs source tree to time against")
    parser.add_argument("--repo", type=Path, help="time this repository (e.g. bench_scale.py's) instead of building one")
    args = parser.parse_args()
    if args.repo is not None and args.compare is not None:
        print(json.dumps(compare(args.repo, args.compare), indent=2))
        return
    where = ["val_loss < 0.3", "data_version == 'v2'"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    try:
        start = time.perf_counter()
        repo = build(tmp / "repo", args.commits)
        built = time.perf_counter() - start
        assert len(repo.log()) == args.commits
        cli = Path(sys.executable).with_name("ckptvcs")
        argv = [str(cli), "--repo", str(tmp / "repo"), "log", "--json", *[a for w in where for a in ("--where", w)]]
        results = {
            "commits": args.commits,
            "build_s": round(built, 2),
            "log_s": round(timed(repo.log), 3),
            "find_s": round(timed(lambda: repo.find(*where)), 3),
            "best_s": round(timed(lambda: repo.best("val_loss", k=3)), 3),
            "cli_log_where_s": round(timed(lambda: subprocess.run(argv, check=True, capture_output=True), 1), 3),
            "matches": len(repo.find(*where)),
        }
        if args.compare is not None:
            results["compare"] = compare(tmp / "repo", args.compare)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

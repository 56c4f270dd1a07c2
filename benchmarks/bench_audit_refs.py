"""The cost of logging every ref move (audit/refs.jsonl) on a commit, as a ratio measured in one run.

Commits the same sequence of states into two repositories, alternating, one with the ref
log (the default) and one with it switched off (``repo.refs.on_move = None``), and reports
the median commit time of each and their ratio, for a tiny state (where the fixed per-commit
cost dominates) and a 4 MiB one. Each commit of the logged repository also appends one
fsynced line to audit/refs.jsonl.

    .venv/bin/python benchmarks/bench_audit_refs.py [--commits 40]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ckptvcs import Repo


def run(commits: int, size: int) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-audit-refs-"))
    try:
        logged, plain = Repo.init(tmp / "logged"), Repo.init(tmp / "plain")
        plain.refs.on_move = None
        times: dict[str, list[float]] = {"logged": [], "plain": []}
        rng = np.random.default_rng(0)
        for i in range(commits):
            state = {"w": rng.standard_normal(size).astype(np.float32)}
            for name, repo in (("logged", logged), ("plain", plain)) if i % 2 else (("plain", plain), ("logged", logged)):
                start = time.perf_counter()
                repo.commit(state, f"c{i}", step=i, code_version=None)
                times[name].append(time.perf_counter() - start)
        assert len(logged.ref_events()) == commits and not plain.ref_events()
        logged.close()
        plain.close()
        return statistics.median(times["logged"]), statistics.median(times["plain"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=40)
    args = parser.parse_args()
    for label, size in (("tiny (16 floats)", 16), ("4 MiB", 1 << 20)):
        logged, plain = run(args.commits, size)
        print(f"{label:>18}: commit with ref log {logged * 1e3:7.2f} ms, without {plain * 1e3:7.2f} ms, "
              f"ratio {logged / plain:.3f} (+{(logged - plain) * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()

"""The first commit of a new state into a fresh repository, against torch.save + fsync.

bench_sequences.py times each sequence's first commit as a single pair, which is too few
for a row of its own (one slow torch.save decides it). This script repeats that pair:
for each sequence, the first checkpoint of bench_sequences' files is saved with
``torch.save`` + fsync and committed into a new repository, alternating which goes
first, ``--pairs`` times; the ratio is taken pair by pair and the median quoted.

    bash scripts/setup-bench.sh
    .venv/bin/python benchmarks/bench_first_commit.py            # 3 sequences, 7 pairs
    .venv/bin/python benchmarks/bench_first_commit.py --quick    # 3 pairs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_sequences  # noqa: E402

import ckptvcs  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pairs(state: object, work: Path, count: int) -> list[tuple[float, float]]:
    """``count`` (commit seconds, torch.save + fsync seconds) pairs, alternating the order."""
    out = []
    for i in range(count):
        shutil.rmtree(work / "repo", ignore_errors=True)
        repo = ckptvcs.Repo.init(work / "repo")
        try:
            def commit() -> float:
                return bench_core.timed_write(lambda: repo.commit(state, code_version=None))[0]

            def save() -> float:
                return bench_core.timed_write(lambda: bench_core.torch_save_fsync(state, work / "t.pt"))[0]

            if i % 2 == 0:
                saved, committed = save(), commit()
            else:
                committed, saved = commit(), save()
        finally:
            repo.close()
        out.append((committed, saved))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "first-commit")
    parser.add_argument("--sequences", nargs="+", default=["mlm-tied", "bf16-master", "full"])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 pairs per sequence")
    args = parser.parse_args(argv)
    count = 3 if args.quick else args.pairs
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    rows = []
    for sequence in args.sequences:
        files = bench_sequences.generate(sequence, work / "seq" / f"{sequence}-1", 1, 2, 1500.0)
        state = torch.load(files[0], weights_only=True)
        result = pairs(state, work, count)
        ratios = [c / s for c, s in result]
        rows.append((sequence, statistics.median(c for c, _ in result), statistics.median(s for _, s in result),
                     statistics.median(ratios), min(ratios), max(ratios)))
        print(f"  {sequence}: " + ", ".join(f"{r:.2f}x" for r in ratios), file=sys.stderr)
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{count} alternating pairs per sequence\n")
    print("| sequence | commit (median) | torch.save + fsync (median) | ratio, median of pairs (min-max) |")
    print("|---|---|---|---|")
    for sequence, commit_s, save_s, median, low, high in rows:
        print(f"| {sequence} | {commit_s:.3f} s | {save_s:.3f} s | {median:.2f}x ({low:.2f}-{high:.2f}) |")


if __name__ == "__main__":
    main()

"""Loads before and after ``repack`` (reverse deltas), against torch.load, on dense-update sequences.

Why
---
Dense updates (every weight and AdamW moment changes each step) make every chunk of a new
commit an XOR delta against its parent, so the newest checkpoint, the one a resume
loads, sits at the deep end of its delta chain. ``Repo.repack`` turns the chains of
branch tips around (docs/format.md section 12.1). This script measures, on the MiniLM
``mlm-tied`` and ``full`` sequences (benchmarks/minilm.py; scripts/setup-bench.sh
installs the weights):

* load of the newest and of every older checkpoint (the worst is "any checkpoint in the
  chain") against ``torch.load`` of the same file, before and after one repack, as
  alternating pairs (torch.load, repo.load, ...), warm page cache, wall time and process
  CPU time (all threads), ratio per pair, median quoted;
* pack bytes before and after, and the repack's own wall and CPU time;
* the hook options: a repack after every commit (what ``CheckpointManager(repack_every=1)``
  runs in the background), its time against the commit's, and the bytes it ends with
  against the forward layout.

Run
---
    bash scripts/setup-bench.sh
    .venv/bin/python benchmarks/bench_repack.py --quick     # a few minutes
    .venv/bin/python benchmarks/bench_repack.py             # 6 checkpoints, 10 steps apart
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_sequences  # noqa: E402

import ckptvcs  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
QUICK = {"count": 4, "steps": 2, "repeats": 2}


def pairs(path: Path, repo: ckptvcs.Repo, commit: str, repeats: int) -> dict[str, Any]:
    """torch.load and repo.load alternating, ``repeats`` pairs: medians of the per-pair ratios."""
    wall, cpu = [], []
    for _ in range(repeats):
        tw, tc, _ = bench_core.timed_cpu(lambda: torch.load(path, weights_only=True))
        mw, mc, _ = bench_core.timed_cpu(lambda: repo.load(commit))
        wall.append(mw / tw)
        cpu.append(mc / tc)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "wall_pairs": wall, "cpu_pairs": cpu}


def loads(files: list[Path], repo: ckptvcs.Repo, commits: list[str], repeats: int) -> dict[str, Any]:
    newest = pairs(files[-1], repo, commits[-1], repeats)
    each = [pairs(f, repo, c, max(1, repeats - 1)) for f, c in zip(files[:-1], commits[:-1])]
    worst = max([newest, *each], key=lambda r: r["wall"])
    oldest = each[0] if each else newest
    return {"newest": newest, "oldest": oldest, "worst": worst, "each_wall": [r["wall"] for r in each]}


def pack_bytes(repo_dir: Path) -> int:
    return bench_core.tree_bytes(repo_dir / "packs")


def depth(repo: ckptvcs.Repo, commit: str) -> int:
    manifest = repo.objects.get(repo.objects.read_commit(commit).manifest, "manifest")[1]
    rows = [repo.chunks.index.get(bytes.fromhex(c)) for blob in manifest["blobs"] for c in blob["chunks"]]
    return max((repo.chunks.chain_length(r) for r in rows if r is not None), default=0)


def one_repack(files: list[Path], work: Path, repeats: int) -> dict[str, Any]:
    """Commit the sequence, measure loads, repack once, measure again."""
    repo_dir = work / "repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    with ckptvcs.Repo.init(repo_dir) as repo:
        commits = []
        for src in files:
            state = torch.load(src, weights_only=True)
            commits.append(repo.commit(state, step=int(state["step"]), code_version=None))
        assert bench_core.states_equal(repo.load(commits[-1]), torch.load(files[-1], weights_only=True))
        before = {"loads": loads(files, repo, commits, repeats), "pack_bytes": pack_bytes(repo_dir),
                  "depth_newest": depth(repo, commits[-1]), "depth_oldest": depth(repo, commits[0])}
        wall, cpu, report = bench_core.timed_cpu(repo.repack)
        for f, c in zip(files, commits):
            assert bench_core.states_equal(repo.load(c), torch.load(f, weights_only=True)), "not bit-exact"
        after = {"loads": loads(files, repo, commits, repeats), "pack_bytes": pack_bytes(repo_dir),
                 "depth_newest": depth(repo, commits[-1]), "depth_oldest": depth(repo, commits[0])}
    shutil.rmtree(repo_dir, ignore_errors=True)
    return {"before": before, "after": after, "repack_wall_s": wall, "repack_cpu_s": cpu,
            "keyframes": report.keyframes, "rebased": report.rebased}


def repack_every_commit(files: list[Path], work: Path) -> dict[str, Any]:
    """A repack after each commit (the manager's background hook): its cost against the commit's."""
    repo_dir = work / "repo-every"
    shutil.rmtree(repo_dir, ignore_errors=True)
    steps = []
    with ckptvcs.Repo.init(repo_dir) as repo:
        for src in files:
            state = torch.load(src, weights_only=True)
            os.sync()
            cw, cc, _ = bench_core.timed_cpu(lambda: repo.commit(state, step=int(state["step"]), code_version=None))
            rw, rc, _ = bench_core.timed_cpu(repo.repack)
            steps.append({"commit_wall_s": cw, "commit_cpu_s": cc, "repack_wall_s": rw, "repack_cpu_s": rc})
        result = {"steps": steps, "pack_bytes": pack_bytes(repo_dir), "depth_newest": depth(repo, repo.resolve("HEAD"))}
    shutil.rmtree(repo_dir, ignore_errors=True)
    later = steps[1:] or steps
    result["repack_vs_commit_wall"] = statistics.median(s["repack_wall_s"] / s["commit_wall_s"] for s in later)
    result["repack_vs_commit_cpu"] = statistics.median(s["repack_cpu_s"] / s["commit_cpu_s"] for s in later)
    return result


def render(report: dict[str, Any]) -> str:
    load = report["load_average"]
    out = [f"Machine: {bench_core.machine_line(report['machine'])}",
           f"Load average: {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end ({os.cpu_count()} cores); "
           "ratios per A/B pair (torch.load, repo.load), medians; wall (CPU) time.", "",
           f"{report['count']} checkpoints, {report['steps']} AdamW steps apart:", "",
           "| sequence | when | newest / torch.load | oldest / torch.load | worst / torch.load | depth newest "
           "| pack bytes | repack |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in report["sequences"].items():
        one = r["once"]
        for when in ("before", "after"):
            s = one[when]
            lo = s["loads"]
            cost = "" if when == "before" else f"{one['repack_wall_s']:.2f} s ({one['repack_cpu_s']:.2f} s CPU)"
            ratio = "" if when == "before" else f" ({s['pack_bytes'] / one['before']['pack_bytes']:.4f}x)"
            out.append(
                f"| {name} | {when} repack | {lo['newest']['wall']:.2f}x ({lo['newest']['cpu']:.2f}x) | "
                f"{lo['oldest']['wall']:.2f}x ({lo['oldest']['cpu']:.2f}x) | {lo['worst']['wall']:.2f}x "
                f"({lo['worst']['cpu']:.2f}x) | {s['depth_newest']} | {s['pack_bytes'] / MB:.1f} MB{ratio} | {cost} |")
    out += ["", "A repack after every commit (the manager's hook):", "",
            "| sequence | repack / commit | pack bytes vs forward | depth newest |", "|---|---|---|---|"]
    for name, r in report["sequences"].items():
        e = r.get("every")
        if e:
            fwd = r["once"]["before"]["pack_bytes"]
            out.append(f"| {name} | {e['repack_vs_commit_wall']:.2f}x ({e['repack_vs_commit_cpu']:.2f}x CPU) | "
                       f"{e['pack_bytes'] / fwd:.4f}x | {e['depth_newest']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "repack")
    parser.add_argument("--seq-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "sequences" / "seq",
                        help="where the torch.save files of the sequences are made (shared with bench_sequences)")
    parser.add_argument("--sequences", nargs="+", default=["mlm-tied", "full"])
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['count']} checkpoints {QUICK['steps']} steps apart, {QUICK['repeats']} pairs")
    parser.add_argument("--no-every", action="store_true", help="skip the repack-after-every-commit run")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.steps, args.repeats = QUICK["count"], QUICK["steps"], QUICK["repeats"]
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": bench_core.machine_info(work), "count": args.count, "steps": args.steps,
                              "load_average": {"start": os.getloadavg()}, "sequences": {}}
    for sequence in args.sequences:
        files = bench_sequences.generate(sequence, args.seq_dir.absolute() / f"{sequence}-{args.count}x{args.steps}",
                                         args.count, args.steps, 0.0)
        print(f"  {sequence}: one repack", file=sys.stderr)
        result: dict[str, Any] = {"once": one_repack(files, work, args.repeats)}
        if not args.no_every:
            print(f"  {sequence}: a repack after every commit", file=sys.stderr)
            result["every"] = repack_every_commit(files, work)
        report["sequences"][sequence] = result
    report["load_average"]["end"] = os.getloadavg()
    print(render(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

"""ckptvcs on many checkpoint sequences, next to a simple per-tensor estimate.

Why
---
The first performance round tuned the codec on one sequence (benchmarks/minilm.py's
full fine-tune). This script measures every sequence the same way so no codec choice
is tuned to one of them:

* the three MiniLM regimes of bench_peers (``full``, ``frozen-embeddings``,
  ``adapters``), and the two dense ones added for the second round: ``mlm-tied`` (a
  masked-LM fine-tune whose output head is tied to the embeddings; every weight and
  every AdamW moment changes each step) and ``bf16-master`` (the same run kept as a
  bf16 model + fp32 master weights + fp32 moments), all from the real pretrained
  all-MiniLM-L6-v2 weights (scripts/setup-bench.sh installs them);
* ``large`` (``--large``, ~1.5 GB per checkpoint, ``--large-mb`` to size it): a
  random-init transformer (bench_core.TinyLM) and its AdamW state, every tensor moved
  by one synthetic AdamW step between checkpoints (real training at that size would
  take hours on a small CPU machine; what matters here is the byte pattern of a dense
  update).

For each sequence it reports:

* stored bytes of the sequence in ckptvcs, in ``torch.save`` files, and the **simple
  per-tensor estimate**: per tensor, the smaller of (its byte planes, each compressed
  with zstd level 1) and (its XOR against the same tensor of the previous checkpoint,
  then byte planes + zstd-1); tensors sharing a storage (a tied head) counted once;
* the commit of each checkpoint against ``torch.save`` + fsync of the same state, run
  as A/B pairs (save, commit, save, commit, ...): the ratio is taken pair by pair, so
  it survives a machine whose speed drifts (the first commit is a new full state, the
  later ones full fine-tune steps);
* loads against ``torch.load`` of the same file, warm page cache, again pair by pair:
  the newest checkpoint (``--repeats`` pairs) and every other checkpoint once (the
  worst is the "any checkpoint in the chain" figure).

Ratios, not absolute times, are the result: the report records the machine and its
load average at start and end; numbers taken on a busy machine must be re-run on a
quiet one before they are quoted as absolute figures.

Run
---
    bash scripts/setup-bench.sh
    .venv/bin/python benchmarks/bench_sequences.py --quick          # a couple of minutes
    .venv/bin/python benchmarks/bench_sequences.py                  # the five MiniLM sequences
    .venv/bin/python benchmarks/bench_sequences.py --large --peers  # + 1.5 GB state, + peers

``--peers`` also runs bench_peers' systems (safetensors, zipnn, restic, borg) on every
sequence, for the stored-bytes table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_peers  # noqa: E402
import minilm  # noqa: E402

import ckptvcs  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
QUICK = {"sequences": ["mlm-tied", "bf16-master", "full"], "count": 3, "steps": 2, "repeats": 2}


# -- sequences ------------------------------------------------------------------------------


def large_checkpoints(size_mb: float, count: int) -> Iterator[dict[str, Any]]:
    """A ~size_mb random-init training state; each next one after a synthetic dense AdamW step."""
    state, names = bench_core.build_state(size_mb)
    every = list(range(len(names)))
    for i in range(count):
        if i:
            bench_core.perturb(state, names, every, seed=i)
            state["step"] += 1
        yield state


def generate(sequence: str, folder: Path, count: int, steps: int, large_mb: float) -> list[Path]:
    """The sequence as torch.save files, made once and reused (like bench_peers.generate)."""
    if sequence != "large":
        return bench_peers.generate(sequence, folder, count, steps, regenerate=False)
    files = [folder / f"ckpt-{i}.pt" for i in range(count)]
    marker = folder / "done.json"
    spec = {"scenario": "large", "count": count, "size_mb": large_mb}
    if marker.exists() and json.loads(marker.read_text()) == spec and all(f.exists() for f in files):
        return files
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"generating {count} large checkpoints (~{large_mb:.0f} MB)", file=sys.stderr)
    for path, state in zip(files, large_checkpoints(large_mb, count)):
        bench_core.torch_save_fsync(state, path)
    marker.write_text(json.dumps(spec))
    return files


# -- the simple per-tensor estimate -----------------------------------------------------------


def unique_tensors(state: Any) -> dict[str, torch.Tensor]:
    """Every tensor under its path, a storage shared by several names (a tied head) once."""
    seen: set[tuple[int, int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in bench_peers.flatten(state).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def planes_zstd1(raw: np.ndarray, itemsize: int, cctx: zstandard.ZstdCompressor) -> int:
    """Compressed size of ``raw`` split into ``itemsize`` byte planes, each zstd level 1."""
    if itemsize == 1:
        return len(cctx.compress(raw.tobytes()))
    planes = raw.reshape(-1, itemsize).T
    return sum(len(cctx.compress(np.ascontiguousarray(plane).tobytes())) for plane in planes)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def estimate(files: list[Path]) -> dict[str, Any]:
    """Stored bytes of the per-tensor estimate over the sequence (module docstring)."""
    cctx = zstandard.ZstdCompressor(level=1)
    previous: dict[str, np.ndarray] = {}
    per_checkpoint, xor_chosen, tensors = [], 0, 0
    for path in files:
        state = torch.load(path, weights_only=True)
        current = {name: (t.element_size(), tensor_bytes(t)) for name, t in unique_tensors(state).items()}
        total = 0
        for name, (itemsize, raw) in current.items():
            best = planes_zstd1(raw, itemsize, cctx)
            prev = previous.get(name)
            if prev is not None and prev.shape == raw.shape:
                xored = planes_zstd1(np.bitwise_xor(raw, prev), itemsize, cctx)
                if xored < best:
                    best, xor_chosen = xored, xor_chosen + 1
            total += best
            tensors += 1
        per_checkpoint.append(total)
        previous = {name: raw for name, (_, raw) in current.items()}
    return {"stored_bytes": sum(per_checkpoint), "per_checkpoint": per_checkpoint,
            "xor_chosen": xor_chosen, "tensors": tensors}


# -- ckptvcs against torch.save / torch.load, pair by pair ----------------------------------------


def commits_vs_save(files: list[Path], work: Path) -> dict[str, Any]:
    """Commit every checkpoint into one repository, each paired with a torch.save + fsync."""
    repo_dir = work / "repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = ckptvcs.Repo.init(repo_dir)
    pairs, ids = [], []
    try:
        for src in files:
            state = torch.load(src, weights_only=True)
            save_s, _ = bench_core.timed_write(lambda: bench_core.torch_save_fsync(state, work / "t.pt"))
            commit_s, cid = bench_core.timed_write(lambda: repo.commit(state, step=int(state["step"]), code_version=None))
            pairs.append({"torch_save_s": save_s, "commit_s": commit_s, "ratio": commit_s / save_s})
            ids.append(cid)
        depth = [bench_peers._max_chain(repo, c) for c in ids]
    finally:
        repo.close()
    (work / "t.pt").unlink(missing_ok=True)
    later = [p["ratio"] for p in pairs[1:]]
    return {"pairs": pairs, "commits": ids, "chain_depth": depth, "repo_bytes": bench_core.tree_bytes(repo_dir),
            "ratio_first": pairs[0]["ratio"], "ratio_later_median": statistics.median(later) if later else None}


def loads_vs_torch(files: list[Path], work: Path, commits: list[str], repeats: int) -> dict[str, Any]:
    """repo.load against torch.load of the same checkpoint, warm cache, alternating."""
    repo = ckptvcs.Repo.open(work / "repo")
    try:
        assert bench_core.states_equal(repo.load(commits[-1]), torch.load(files[-1], weights_only=True)), "not bit-exact"
        newest = []
        for _ in range(repeats):
            base, _ = bench_core.timed(lambda: torch.load(files[-1], weights_only=True))
            mine, _ = bench_core.timed(lambda: repo.load(commits[-1]))
            newest.append(mine / base)
        each = []
        for path, cid in zip(files, commits):
            base, _ = bench_core.timed(lambda: torch.load(path, weights_only=True))
            mine, _ = bench_core.timed(lambda: repo.load(cid))
            each.append(mine / base)
    finally:
        repo.close()
    return {"newest_ratios": newest, "ratio_newest_median": statistics.median(newest),
            "each_ratio": each, "ratio_worst": max(each)}


def run_sequence(sequence: str, files: list[Path], work: Path, repeats: int, peers: bool) -> dict[str, Any]:
    folder = work / "runs" / sequence
    folder.mkdir(parents=True, exist_ok=True)
    print(f"  {sequence}: ckptvcs vs torch.save", file=sys.stderr)
    first = unique_tensors(torch.load(files[0], weights_only=True)).values()
    result: dict[str, Any] = {"checkpoints": len(files), "state_bytes": sum(t.numel() * t.element_size() for t in first),
                              "torch_save_bytes": sum(f.stat().st_size for f in files)}
    result["commit"] = commits_vs_save(files, folder)
    result["load"] = loads_vs_torch(files, folder, result["commit"]["commits"], repeats)
    print(f"  {sequence}: per-tensor estimate", file=sys.stderr)
    result["estimate"] = estimate(files)
    result["ckptvcs_vs_estimate"] = result["commit"]["repo_bytes"] / result["estimate"]["stored_bytes"]
    shutil.rmtree(folder / "repo", ignore_errors=True)
    if peers:
        result["peers"] = bench_peers.run_scenario(sequence, files, work / "peers", True)
    return result


# -- report -----------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    load = report["load_average"]
    out = [f"Machine: {bench_core.machine_line(report['machine'])}",
           f"Load average: {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end "
           f"({os.cpu_count()} cores); ratios are pair by pair (A/B alternating), medians quoted.", "",
           f"{report['count']} checkpoints, {report['steps']} AdamW steps apart:", "",
           "| sequence | state | torch.save | estimate | ckptvcs | ckptvcs / estimate | first commit / save "
           "| later commits / save | load newest / torch.load | worst load / torch.load |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["sequences"].items():
        ts, est, mine = r["torch_save_bytes"], r["estimate"]["stored_bytes"], r["commit"]["repo_bytes"]
        later = r["commit"]["ratio_later_median"]
        out.append(
            f"| {name} | {r['state_bytes'] / MB:.0f} MB | {ts / MB:.0f} MB | {est / MB:.0f} MB ({est / ts:.3f}) | "
            f"{mine / MB:.0f} MB ({mine / ts:.3f}) | **{r['ckptvcs_vs_estimate']:.3f}** | "
            f"{r['commit']['ratio_first']:.2f}x | {'-' if later is None else f'{later:.2f}x'} | "
            f"{r['load']['ratio_newest_median']:.2f}x | {r['load']['ratio_worst']:.2f}x "
            f"(depth {max(r['commit']['chain_depth'])}) |")
    peer_rows = {n: r["peers"] for n, r in report["sequences"].items() if "peers" in r}
    if peer_rows:
        out += ["", "Peers, stored bytes (ratio to torch.save):", "",
                "| system | " + " | ".join(peer_rows) + " |", "|---|" + "---|" * len(peer_rows)]
        for system in bench_peers.SYSTEMS:
            cells = []
            for r in peer_rows.values():
                s = r.get(system, {})
                cells.append(f"{s['stored_bytes'] / MB:.0f} MB ({s['ratio_vs_torch_save']:.3f})"
                             if "stored_bytes" in s else s.get("skipped", "not run"))
            out.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    choices = [*minilm.SCENARIOS, "large"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "sequences")
    parser.add_argument("--sequences", nargs="+", choices=choices, default=list(minilm.SCENARIOS))
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help=f"a couple of minutes: {', '.join(QUICK['sequences'])}, {QUICK['count']} checkpoints, "
                             f"{QUICK['steps']} steps apart")
    parser.add_argument("--large", action="store_true", help="add the large sequence (1-2 GB per checkpoint)")
    parser.add_argument("--large-mb", type=float, default=1500.0)
    parser.add_argument("--peers", action="store_true", help="also run bench_peers' systems on every sequence")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.count, args.steps, args.repeats = (
            list(QUICK["sequences"]), QUICK["count"], QUICK["steps"], QUICK["repeats"])
    if args.large and "large" not in args.sequences:
        args.sequences.append("large")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": bench_core.machine_info(work), "count": args.count, "steps": args.steps,
                              "load_average": {"start": os.getloadavg()}, "sequences": {}}
    for sequence in args.sequences:
        count = min(args.count, 4) if sequence == "large" else args.count  # 4 x 1.5 GB files at most
        files = generate(sequence, work / "seq" / f"{sequence}-{count}x{args.steps}", count, args.steps, args.large_mb)
        report["sequences"][sequence] = run_sequence(sequence, files, work, args.repeats, args.peers)
    report["load_average"]["end"] = os.getloadavg()
    print(render(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

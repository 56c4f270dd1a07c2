"""The fixed cost of a commit: a tiny training state committed many times.

Why
---
A small model saved often pays ckptvcs's per-commit fixed cost (fsyncs, object and ref
writes, provenance) rather than its per-byte cost. This script commits a ~1.3 MB
model + AdamW state (bench_core.TinyLM; every tensor moved by one synthetic AdamW step
before each save, as in training) and reports:

* the commit against ``torch.save`` + fsync of the same state, as A/B pairs (save,
  commit, save, commit ...), the ratio taken pair by pair (median and quartiles), with
  ``code_version`` captured as a default commit does (``--no-code-version`` to skip);
* ``--profile``: where a commit's time goes: wall time per stage of the commit path
  (STAGES, timed by wrapping those functions), the fsync, open, mkdir and stat calls
  a commit makes, counted and timed by wrapping ``os`` in this process (every durable
  write of ckptvcs goes through ``os.fsync``), then cProfile's top functions (which
  inflate call-heavy Python code: trust the stage timers for shares);
* ``--strace``: the same loop under ``strace -c -f`` (when installed), for the
  system-call totals the kernel sees (LMDB's own fdatasync included).

The pairs also report, per commit, its process CPU time (``time.process_time`` around
the commit: every thread of the process, so the encoding pool's work counts) and the
fsyncs it made through ``ckptvcs._fs`` (LMDB's fdatasync is not among them: use
``--strace``). CPU time and counts do not depend on the machine's load; the wall-clock
ratio does, so quote the load average printed with it.

Run
---
    .venv/bin/python benchmarks/bench_tiny.py --commits 50 --profile
    .venv/bin/python benchmarks/bench_tiny.py --quick          # 10 pairs, no profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402

import ckptvcs  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRACED = ("fsync", "replace", "rename", "open", "write", "mkdir", "unlink", "stat", "listdir", "scandir")


# label -> (module, class or None, attribute): the commit path's stages, timed by wrapping
# them (wall time, nested stages counted in their parents too). cProfile is printed as
# well, but it inflates call-heavy Python code several times over.
STAGES = {
    "state walk (encode_state)": ("ckptvcs.repo", None, "encode_state"),
    "delta bases (Repo._delta_bases)": ("ckptvcs.repo", "Repo", "_delta_bases"),
    "chunks: hash, encode, pack writes (WriteSession.put_blobs)": ("ckptvcs.store", "WriteSession", "put_blobs"),
    "chunks: seal pack, index txn (WriteSession.finish)": ("ckptvcs.store", "WriteSession", "finish"),
    "objects: manifest + commit (ObjectStore.put)": ("ckptvcs.objects", "ObjectStore", "put"),
    "  of which JSON depth checks": ("ckptvcs.objects", None, "json_depth_exceeds"),
    "ref compare-and-swap + its reflog (Refs.set_if_equals)": ("ckptvcs.refs", "Refs", "set_if_equals"),
    "HEAD reflog (Refs.log_move)": ("ckptvcs.refs", "Refs", "log_move"),
    "code version (provenance.code_version)": ("ckptvcs.provenance", None, "code_version"),
    "environment (provenance.environment)": ("ckptvcs.provenance", None, "environment"),
}


class StageTimer:
    """Wall time spent in each of STAGES while active."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> StageTimer:
        import importlib

        for label, (module_name, owner_name, attr) in STAGES.items():
            module = importlib.import_module(module_name)
            owner = getattr(module, owner_name) if owner_name else module
            original = owner.__dict__[attr] if owner_name else getattr(owner, attr)

            def wrapper(*args: Any, __f: Any = original, __label: str = label, **kw: Any) -> Any:
                start = time.perf_counter()
                try:
                    return __f(*args, **kw)
                finally:
                    self.seconds[__label] += time.perf_counter() - start

            self._saved.append((owner, attr, original))
            setattr(owner, attr, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


def tiny_state(size_mb: float = 1.3) -> tuple[dict[str, Any], list[str]]:
    return bench_core.build_state(size_mb)


class SyscallCounter:
    """Counts and times calls of ``os`` functions while active (wraps them in place)."""

    def __init__(self, names: tuple[str, ...] = TRACED) -> None:
        self.names = names
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> SyscallCounter:
        for name in self.names:
            original = getattr(os, name)
            self._saved[name] = original

            def wrapper(*args: Any, __name: str = name, __f: Callable[..., Any] = original, **kw: Any) -> Any:
                start = time.perf_counter()
                try:
                    return __f(*args, **kw)
                finally:
                    self.calls[__name] += 1
                    self.seconds[__name] += time.perf_counter() - start

            setattr(os, name, wrapper)
        import ckptvcs._fs as fs  # it keeps its own reference to os.fsync (fault injection)

        self._fs_fsync = fs._fsync
        fs._fsync = os.fsync
        return self

    def __exit__(self, *exc: object) -> None:
        import ckptvcs._fs as fs

        fs._fsync = self._fs_fsync
        for name, original in self._saved.items():
            setattr(os, name, original)


def pairs(state: dict[str, Any], names: list[str], work: Path, commits: int, code_version: bool) -> dict[str, Any]:
    """A/B pairs: torch.save + fsync, then repo.commit, of the same state, ``commits`` times."""
    shutil.rmtree(work / "repo", ignore_errors=True)
    repo = ckptvcs.Repo.init(work / "repo")
    every = list(range(len(names)))
    ratios, saves, mine, cpu = [], [], [], []
    fsyncs = FsyncCounter()
    try:
        for i in range(commits):
            bench_core.perturb(state, names, every, seed=i)
            state["step"] = i
            save_s, _ = bench_core.timed_write(lambda: bench_core.torch_save_fsync(state, work / "t.pt"))
            kw: dict[str, Any] = {} if code_version else {"code_version": None}
            cpu_start = time.process_time()
            with fsyncs:
                commit_s, _ = bench_core.timed_write(lambda: repo.commit(state, step=i, **kw))
            cpu.append(time.process_time() - cpu_start)
            saves.append(save_s)
            mine.append(commit_s)
            ratios.append(commit_s / save_s)
    finally:
        repo.close()
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), statistics.median(ratios), max(ratios)]
    return {"state_bytes": bench_core.state_nbytes(state), "commits": commits,
            "torch_save_median_s": statistics.median(saves), "commit_median_s": statistics.median(mine),
            "ratio_median": statistics.median(ratios), "ratio_quartiles": [q[0], q[-1]],
            "commit_cpu_median_s": statistics.median(cpu),
            # the first commit creates folders (fan-out, logs): the steady count is the later ones'
            "fsyncs_per_commit": statistics.median(fsyncs.per_use[1:] or fsyncs.per_use)}


class FsyncCounter:
    """Counts the fsyncs ckptvcs makes through its one durability seam (``_fs._fsync``)
    while active; ``per_use`` holds one count per ``with`` block."""

    def __init__(self) -> None:
        self.per_use: list[int] = []

    def __enter__(self) -> FsyncCounter:
        import ckptvcs._fs as fs

        self._real = real = fs._fsync
        self.per_use.append(0)

        def counting(fd: int) -> None:
            self.per_use[-1] += 1
            real(fd)

        fs._fsync = counting
        return self

    def __exit__(self, *exc: object) -> None:
        import ckptvcs._fs as fs

        fs._fsync = self._real


def profile(state: dict[str, Any], names: list[str], work: Path, commits: int, top: int) -> None:
    """Counted os calls and a cProfile of ``commits`` commits."""
    shutil.rmtree(work / "repo", ignore_errors=True)
    repo = ckptvcs.Repo.init(work / "repo")
    repo.commit(state, step=0)  # warm: imports, environment, code version
    every = list(range(len(names)))
    spent = 0.0
    with SyscallCounter() as counter, StageTimer() as stages:
        for i in range(1, commits + 1):
            bench_core.perturb(state, names, every, seed=i)
            start = time.perf_counter()
            repo.commit(state, step=i)
            spent += time.perf_counter() - start
    print(f"\n{commits} commits, {spent / commits * 1000:.1f} ms each (wall; stage wrappers on, no profiler)")
    print("wall time per commit by stage (stages nest):")
    for label in STAGES:
        sec = stages.seconds[label]
        print(f"  {label:58s} {sec / commits * 1000:7.2f} ms  {100 * sec / spent:5.1f}%")
    prof = cProfile.Profile()
    for i in range(commits + 1, 2 * commits + 1):
        bench_core.perturb(state, names, every, seed=i)
        prof.enable()
        repo.commit(state, step=i)
        prof.disable()
    repo.close()
    print("os calls per commit (count, ms):")
    for name in TRACED:
        if counter.calls[name]:
            print(f"  {name:8s} {counter.calls[name] / commits:6.1f}  {counter.seconds[name] / commits * 1000:7.2f} ms")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    print(out.getvalue())


def strace(work: Path, commits: int) -> None:
    if shutil.which("strace") is None:
        print("strace is not installed: no kernel system-call totals")
        return
    cmd = ["strace", "-c", "-f", "-o", str(work / "strace.txt"), sys.executable, __file__, "--commits", str(commits),
           "--work-dir", str(work / "traced")]
    subprocess.run(cmd, check=True, capture_output=True)
    print((work / "strace.txt").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "tiny")
    parser.add_argument("--commits", type=int, default=30)
    parser.add_argument("--size-mb", type=float, default=1.3)
    parser.add_argument("--no-code-version", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--quick", action="store_true", help="10 pairs (overrides --commits), for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.commits = 10
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    state, names = tiny_state(args.size_mb)
    result = pairs(state, names, work, args.commits, not args.no_code_version)
    print(f"load average {os.getloadavg()[0]:.1f}; state {result['state_bytes'] / 1e6:.2f} MB; "
          f"{result['commits']} pairs: torch.save+fsync median {result['torch_save_median_s'] * 1000:.1f} ms, "
          f"commit median {result['commit_median_s'] * 1000:.1f} ms; commit/save ratio median "
          f"{result['ratio_median']:.2f}x (quartiles {result['ratio_quartiles'][0]:.2f}-{result['ratio_quartiles'][1]:.2f}); "
          f"commit CPU median {result['commit_cpu_median_s'] * 1000:.1f} ms, "
          f"{result['fsyncs_per_commit']:.0f} fsyncs per commit (ckptvcs._fs; LMDB's not counted)")
    if args.profile:
        profile(state, names, work, args.commits, args.top)
    if args.strace:
        strace(work, args.commits)


if __name__ == "__main__":
    main()

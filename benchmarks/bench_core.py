"""Core benchmark: ckptvcs commit/load against torch.save + fsync / torch.load.

What it measures, and why
-------------------------
ckptvcs only earns its place in a training loop if checkpointing through it costs about
what the loop already pays for ``torch.save``. This script builds one realistic
training state in memory and times, in the same process and run:

1. ``torch.save(state, f)`` + ``f.flush()`` + ``os.fsync`` to a fresh file  (baseline);
2. ``repo.commit(state)`` into a fresh repository (new repo per repeat: nothing dedups);
3. re-commit of the unchanged state into a repo that already holds it (dedup path:
   hashing, index look-ups and metadata writes only);
4. commit after changing ~10% of the state's tensor bytes in place (a few layers'
   weights plus their AdamW moments, as fine-tuning the top layers would);
5. ``torch.load(file, weights_only=True)`` against ``repo.load()``, first with the
   files' pages evicted from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``
   on the saved file and on every file of the repo; residency is checked with
   ``mincore`` and reported), then with a warm page cache.

It also reports the repository's stored bytes (packs + objects) against the
``torch.save`` file, and the peak RSS increase of commit, load, save and torch.load,
each measured in a fresh subprocess (peak reset through ``/proc/self/clear_refs``
where permitted, else ``ru_maxrss``).

The state is ``{"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}``
for a small transformer-like stack (embedding, attention and MLP ``nn.Linear`` layers,
float32) sized so the parameters are a third of ``--size-mb`` and the AdamW moments
(``exp_avg``, ``exp_avg_sq``, after one real optimizer step on a synthetic
language-model loss) the other two thirds. Everything is seeded. The weights are
random-init, which compresses worse than trained weights; a later benchmark uses real
MiniLM weights. Commits pass ``code_version=None`` so the timing covers the store, not
the two ``git`` subprocesses provenance would run.

Run
---
    .venv/bin/python benchmarks/bench_core.py                     # ~300 MB, 3 repeats
    .venv/bin/python benchmarks/bench_core.py --size-mb 20 --repeats 1   # smoke test
    .venv/bin/python benchmarks/bench_core.py --out bench-out/core.json

Scratch files go to ``--work-dir`` (default ``bench-out/`` at the project root, which
git ignores) and are removed at the end unless ``--keep``; only the latest round's file
and repo are kept meanwhile (about four times the state size on disk).

Noise control: one untimed warm-up round first (``--warmup``); writes are timed after
``os.sync()`` so no timed fsync pays for an earlier operation's dirty pages; and the
memory the run needs is touched once before timing (``--no-prefault`` skips it), since
on VMs whose host backs guest memory lazily a first touch is several times slower
(page-cache writes and fresh tensors would look slow at random). Disk and page-cache
timings on VMs stay noisy: read medians beside bests and raise ``--repeats`` when
they disagree.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ckptvcs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = PROJECT_ROOT / "bench-out"
SEED = 0
N_LAYERS = 4
HEAD_DIM = 32
VOCAB_PER_DIM = 8  # vocabulary size as a multiple of the model width
BATCH, SEQ_LEN = 4, 64
CHANGED_FRACTION = 0.10
MB = 1_000_000
PROBES = ("torch_save", "commit", "torch_load", "repo_load")
WEIGHTS_NOTE = (
    "weights are random-init (less compressible than trained weights); "
    "AdamW moments come from one real optimizer step on a synthetic LM loss. "
    "A later benchmark uses real MiniLM weights."
)


# -- the training state ---------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Embedding, a stack of blocks, final norm; logits through the embedding matrix."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_PER_DIM * dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(N_LAYERS))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.T


def param_count(dim: int) -> int:
    """Parameters of ``TinyLM(dim)``, without building it."""
    per_block = 12 * dim * dim + 13 * dim
    return VOCAB_PER_DIM * dim * dim + N_LAYERS * per_block + 2 * dim


def model_dim(size_mb: float) -> int:
    """The width (a multiple of HEAD_DIM) whose float32 parameters are closest to size/3."""
    target = size_mb * MB / 3 / 4
    best = max(1, round(math.sqrt(target / (VOCAB_PER_DIM + 12 * N_LAYERS)) / HEAD_DIM))
    candidates = [m * HEAD_DIM for m in (best - 1, best, best + 1) if m >= 1]
    return min(candidates, key=lambda dim: abs(param_count(dim) - target))


def build_state(size_mb: float) -> tuple[dict[str, Any], list[str]]:
    """The seeded training state and the model's parameter names (optimizer order)."""
    torch.manual_seed(SEED)
    dim = model_dim(size_mb)
    model = TinyLM(dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    vocab = model.embed.num_embeddings
    tokens = torch.randint(vocab, (BATCH, SEQ_LEN + 1))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    names = [name for name, _ in model.named_parameters()]
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}
    assert list(state["model"]) == names, "state_dict order must match optimizer param order"
    return state, names


def state_tensors(state: Any) -> Iterable[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from state_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from state_tensors(value)


def state_nbytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


def states_equal(a: Any, b: Any) -> bool:
    ta, tb = list(state_tensors(a)), list(state_tensors(b))
    return len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


def pick_changed_layers(state: dict[str, Any], names: list[str]) -> list[int]:
    """Parameters of whole layers, top-down, whose weights + AdamW moments total ~CHANGED_FRACTION.

    A layer (weight and bias) is taken when it keeps the total within 1.2x the target,
    as fine-tuning a few layers near the output would change them.
    """
    layers: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        layers.setdefault(name.rsplit(".", 1)[0], []).append(index)
    budget = CHANGED_FRACTION * state_nbytes(state)
    chosen, total = [], 0
    for members in reversed(layers.values()):
        params = [state["model"][names[i]] for i in members]
        if max(p.dim() for p in params) < 2:
            continue  # norms: too small to matter
        cost = 3 * sum(p.numel() * p.element_size() for p in params)  # weight, exp_avg, exp_avg_sq
        if total + cost <= 1.2 * budget:
            chosen += members
            total += cost
    return sorted(chosen)


def perturb(state: dict[str, Any], names: list[str], layers: list[int], seed: int) -> int:
    """One fake optimizer step on ``layers``, in place; returns the bytes changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    for index in layers:
        param = state["model"][names[index]]
        moments = state["optimizer"]["state"][index]
        grad = torch.randn(param.shape, generator=gen) * 1e-3
        moments["exp_avg"].mul_(0.9).add_(grad, alpha=0.1)
        moments["exp_avg_sq"].mul_(0.999).addcmul_(grad, grad, value=0.001)
        param.sub_(1e-3 * moments["exp_avg"] / (moments["exp_avg_sq"].sqrt() + 1e-8))
        changed += 3 * param.numel() * param.element_size()
    return changed


# -- files, page cache, memory ----------------------------------------------------------


def prefault(nbytes: int) -> float:
    """Touch and free ``nbytes`` of memory; returns the seconds it took.

    On virtual machines whose memory the host backs lazily, the first touch of a page
    costs far more than a later one (here ~0.5 GB/s against ~8 GB/s), so whichever
    operation first gets never-touched pages (for tensors or page cache) would look
    slow at random. Touching the memory the run will need first makes the runs fair.
    """
    start = time.perf_counter()
    block = torch.empty(nbytes, dtype=torch.uint8)
    block.fill_(1)
    del block
    return time.perf_counter() - start


def prefault_bytes(state_bytes: int) -> int:
    """What a run touches beyond the state: two repeats' files in page cache, two loads."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return min(6 * state_bytes, available // 2)


def torch_save_fsync(state: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Ask the kernel to evict the files' clean pages (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """Fraction of the files' pages in the page cache, through mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        with open(path, "rb") as f:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            continue
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) == 0:
                resident += sum(b & 1 for b in vec)
                total += pages
        finally:
            libc.munmap(addr, size)
    return resident / total if total else float("nan")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_increase(op: Callable[[], Any]) -> dict[str, Any]:
    """Run ``op`` and return how far the peak RSS rose above the RSS before it."""
    gc.collect()
    exact = reset_peak_rss()
    before = _status_kib("VmRSS")
    result = op()
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    method = "VmHWM after clear_refs" if exact else "ru_maxrss (includes peak of loading the state)"
    return {"peak_increase_bytes": (peak - before) * 1024, "rss_before_bytes": before * 1024, "method": method}


def run_probe(probe: str, src: Path, dst: Path) -> dict[str, Any]:
    """Measure one operation's peak RSS increase in this (fresh) process."""
    if probe in ("torch_save", "commit"):
        state = torch.load(src, weights_only=True)
        if probe == "torch_save":
            return peak_rss_increase(lambda: torch_save_fsync(state, dst))
        repo = ckptvcs.Repo.init(dst)
        return peak_rss_increase(lambda: repo.commit(state, message="probe", step=1, code_version=None))
    if probe == "torch_load":
        return peak_rss_increase(lambda: torch.load(src, weights_only=True))
    repo = ckptvcs.Repo.open(src)
    return peak_rss_increase(repo.load)


def probe_in_subprocess(probe: str, src: Path, dst: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", probe, "--probe-src", str(src), "--probe-dst", str(dst)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- timing -----------------------------------------------------------------------------


def timed(op: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = op()
    return time.perf_counter() - start, result


def timed_cpu(op: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds of every thread, result): CPU time is the figure
    that survives a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = op()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def timed_write(op: Callable[[], Any]) -> tuple[float, Any]:
    """``timed``, after flushing all dirty pages so no timed fsync pays for earlier writes."""
    os.sync()
    return timed(op)


def summarize(samples: list[float]) -> dict[str, Any]:
    return {"best_s": min(samples), "median_s": statistics.median(samples), "samples_s": samples}


def commit_info(repo: ckptvcs.Repo, cid: str) -> dict[str, int]:
    stats = repo.show(cid).stats
    return {key: int(stats.get(key, 0)) for key in ("new_chunks", "new_stored_bytes", "logical_bytes")}


def run_repeat(state: dict[str, Any], names: list[str], layers: list[int], work: Path, index: int) -> dict[str, Any]:
    """One round of every measurement; leaves its file and repo in ``work``."""
    ckpt, repo_dir = work / f"state-{index}.pt", work / f"repo-{index}"
    out: dict[str, Any] = {}
    out["torch_save"], _ = timed_write(lambda: torch_save_fsync(state, ckpt))
    repo = ckptvcs.Repo.init(repo_dir)

    def commit(message: str) -> Callable[[], str]:
        return lambda: repo.commit(state, message=message, step=1, code_version=None)

    out["commit_fresh"], first = timed_write(commit("full"))
    out["commit_fresh_info"] = commit_info(repo, first)
    stats = repo.stats()
    out["repo_pack_bytes"], out["repo_object_bytes"] = stats.pack_bytes, stats.object_bytes
    out["repo_index_bytes"] = tree_bytes(repo_dir / "index")
    out["torch_file_bytes"] = ckpt.stat().st_size
    out["commit_dedup"], dedup = timed_write(commit("unchanged"))
    out["commit_dedup_info"] = commit_info(repo, dedup)
    out.update(measure_loads(state, ckpt, repo, repo_dir, verify=index == 0))
    out["changed_bytes"] = perturb(state, names, layers, seed=SEED + 1 + index)
    out["commit_changed"], changed = timed_write(commit("top layers changed"))
    out["commit_changed_info"] = commit_info(repo, changed)
    repo.close()
    return out


def measure_loads(state: Any, ckpt: Path, repo: ckptvcs.Repo, repo_dir: Path, *, verify: bool) -> dict[str, Any]:
    repo_files = files_under(repo_dir)
    out: dict[str, Any] = {}
    drop_page_cache([ckpt, *repo_files])
    out["resident_after_drop"] = {"torch": resident_fraction([ckpt]), "ckptvcs": resident_fraction(repo_files)}
    out["torch_load_cold"], loaded = timed(lambda: torch.load(ckpt, weights_only=True))
    del loaded
    out["repo_load_cold"], loaded = timed(repo.load)
    if verify and not states_equal(state, loaded):
        raise AssertionError("repo.load() returned a state that differs from the committed one")
    del loaded
    out["torch_load_warm"], loaded = timed(lambda: torch.load(ckpt, weights_only=True))
    del loaded
    out["repo_load_warm"], loaded = timed(repo.load)
    del loaded
    gc.collect()
    return out


# -- machine and report -----------------------------------------------------------------


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def filesystem_of(path: Path) -> str:
    """``fstype (device at mountpoint)`` of the mount holding ``path``, from /proc/mounts."""
    real, best = os.path.realpath(path), ("", "unknown", "unknown")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, fstype = line.split()[:3]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[0]):
                best = (mount, fstype, device)
    return f"{best[1]} ({best[2]} at {best[0]})"


def machine_info(work: Path) -> dict[str, Any]:
    import blake3
    import lmdb
    import numpy
    import zstandard

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_total_gib(), 1),
        "bench_dir": str(work),
        "filesystem": filesystem_of(work),
        "tmp_same_filesystem": os.stat(work).st_dev == os.stat(tempfile.gettempdir()).st_dev,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zstandard": zstandard.__version__,
        "blake3": blake3.__version__,
        "lmdb": lmdb.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def machine_line(m: dict[str, Any]) -> str:
    tmp = "same filesystem as /tmp" if m["tmp_same_filesystem"] else "not the /tmp filesystem"
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; bench dir {m['bench_dir']} on "
        f"{m['filesystem']} ({tmp}); Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, "
        f"zstandard {m['zstandard']}, blake3 {m['blake3']}, lmdb {m['lmdb']}"
    )


ROWS = (  # label, ckptvcs key, baseline key
    ("commit, fresh repo vs torch.save+fsync", "commit_fresh", "torch_save"),
    ("re-commit unchanged (dedup) vs torch.save+fsync", "commit_dedup", "torch_save"),
    ("commit after ~10% changed vs torch.save+fsync", "commit_changed", "torch_save"),
    ("load, page cache dropped: repo.load vs torch.load", "repo_load_cold", "torch_load_cold"),
    ("load, warm page cache: repo.load vs torch.load", "repo_load_warm", "torch_load_warm"),
)


def fmt_time(t: dict[str, Any]) -> str:
    return f"{t['best_s']:.3f} s ({t['median_s']:.3f})"


def render(report: dict[str, Any]) -> str:
    times, size, mem = report["times"], report["sizes"], report["peak_rss"]
    lines = [
        f"State: {report['state']['bytes'] / MB:.1f} MB in {report['state']['tensors']} tensors "
        f"(model {report['state']['model_bytes'] / MB:.1f} MB, width {report['state']['dim']}, "
        f"{N_LAYERS} blocks); {report['repeats']} timed repeats after {report['warmup_rounds']} warm-up, "
        "best (median).",
        f"Note: {WEIGHTS_NOTE}",
        "",
        "| operation | ckptvcs | baseline | ratio (ckptvcs / baseline): best (median) |",
        "|---|---|---|---|",
    ]
    for label, ours, base in ROWS:
        best = times[ours]["best_s"] / times[base]["best_s"]
        median = times[ours]["median_s"] / times[base]["median_s"]
        lines.append(f"| {label} | {fmt_time(times[ours])} | {fmt_time(times[base])} | {best:.2f}x ({median:.2f}x) |")
    ratio = size["repo_stored_bytes"] / size["torch_file_bytes"]
    lines.append(
        f"| stored bytes: repo packs+objects vs torch.save file | {size['repo_stored_bytes'] / MB:.1f} MB | "
        f"{size['torch_file_bytes'] / MB:.1f} MB | {ratio:.2f}x |"
    )
    changed = size["changed_commit_new_stored_bytes"] / size["torch_file_bytes"]
    lines.append(
        f"| stored bytes added by the ~10%-changed commit vs a new torch.save file | "
        f"{size['changed_commit_new_stored_bytes'] / MB:.1f} MB | {size['torch_file_bytes'] / MB:.1f} MB | {changed:.2f}x |"
    )
    for label, ours, base in (("commit vs torch.save+fsync", "commit", "torch_save"), ("load", "repo_load", "torch_load")):
        if ours in mem and base in mem:
            a, b = mem[ours]["peak_increase_bytes"], mem[base]["peak_increase_bytes"]
            lines.append(f"| peak RSS increase, {label} | {a / MB:.1f} MB | {b / MB:.1f} MB | {a / b:.2f}x |")
    lines += ["", *report["notes"], "", f"Machine: {report['machine_line']}"]
    return "\n".join(lines)


# -- driver -----------------------------------------------------------------------------


def collect(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return summarize([s[key] for s in samples])


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    built, (state, names) = timed(lambda: build_state(args.size_mb))
    layers = pick_changed_layers(state, names)
    total = state_nbytes(state)
    touched = 0 if args.no_prefault else prefault_bytes(total)
    prefault_s = prefault(touched) if touched else 0.0
    rounds = []
    for index in range(args.warmup + args.repeats):
        rounds.append(run_repeat(state, names, layers, work, index))
        if index:  # keep only the latest file and repo (for the memory probes)
            (work / f"state-{index - 1}.pt").unlink()
            shutil.rmtree(work / f"repo-{index - 1}")
        print(f"round {index + 1}/{args.warmup + args.repeats} done", file=sys.stderr)
    samples = rounds[args.warmup:]
    peak_rss = {} if args.no_memory else measure_memory(work, len(rounds) - 1)
    first = samples[0]
    report = {
        "repeats": args.repeats,
        "warmup_rounds": args.warmup,
        "state": {
            "bytes": total,
            "tensors": sum(1 for _ in state_tensors(state)),
            "model_bytes": state_nbytes(state["model"]),
            "dim": model_dim(args.size_mb),
            "build_s": built,
            "prefault_bytes": touched,
            "prefault_s": prefault_s,
            "changed_layers": [names[i] for i in layers],
            "changed_bytes": first["changed_bytes"],
            "changed_fraction": first["changed_bytes"] / total,
            "weights": WEIGHTS_NOTE,
        },
        "times": {key: collect(samples, key) for row in ROWS for key in row[1:]},
        "sizes": {
            "torch_file_bytes": first["torch_file_bytes"],
            "repo_stored_bytes": first["repo_pack_bytes"] + first["repo_object_bytes"],
            "repo_pack_bytes": first["repo_pack_bytes"],
            "repo_object_bytes": first["repo_object_bytes"],
            "repo_index_bytes": first["repo_index_bytes"],
            "changed_commit_new_stored_bytes": first["commit_changed_info"]["new_stored_bytes"],
        },
        "commit_stats": {k: first[f"{k}_info"] for k in ("commit_fresh", "commit_dedup", "commit_changed")},
        "page_cache_resident_after_drop": [s["resident_after_drop"] for s in samples],
        "peak_rss": peak_rss,
        "machine": machine_info(work),
    }
    report["machine_line"] = machine_line(report["machine"])
    report["notes"] = notes(report)
    return report


def measure_memory(work: Path, last: int) -> dict[str, Any]:
    ckpt, repo_dir = work / f"state-{last}.pt", work / f"repo-{last}"
    return {
        "torch_save": probe_in_subprocess("torch_save", ckpt, work / "probe.pt"),
        "commit": probe_in_subprocess("commit", ckpt, work / "probe-repo"),
        "torch_load": probe_in_subprocess("torch_load", ckpt, work),
        "repo_load": probe_in_subprocess("repo_load", repo_dir, work),
    }


def notes(report: dict[str, Any]) -> list[str]:
    resident = report["page_cache_resident_after_drop"]
    worst = max(max(r.values()) for r in resident)
    state, mem = report["state"], report["peak_rss"]
    out = [
        f"- Changed commit: {len(state['changed_layers'])} parameters ({', '.join(state['changed_layers'])}) "
        f"plus their exp_avg/exp_avg_sq, {state['changed_fraction']:.1%} of the state's tensor bytes.",
        "- Cold loads: posix_fadvise(POSIX_FADV_DONTNEED) on the .pt file and on every repo file before "
        f"each cold pair (no root, so no drop_caches); at most {worst:.1%} of those pages stayed resident "
        "(mincore). The LMDB index is mmapped by the open repo, so its pages may stay.",
        "- Baseline fsyncs the file only; ckptvcs also fsyncs directories, objects, refs and the reflog.",
        "- Commits pass code_version=None (no git subprocesses).",
    ]
    if state["prefault_bytes"]:
        rate = state["prefault_bytes"] / MB / state["prefault_s"]
        out.append(
            f"- Prefault: touched and freed {state['prefault_bytes'] / MB:.0f} MB first ({rate:.0f} MB/s), so "
            "lazily host-backed VM memory does not slow whichever operation first touches new pages."
        )
    if mem:
        out.append(f"- Peak RSS: one fresh subprocess per operation, {mem['commit']['method']}.")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=300.0, help="training state size in MB (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="scratch directory (default bench-out/)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-prefault", action="store_true", help="skip touching the run's memory first")
    parser.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    parser.add_argument("--probe-src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-dst", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size_mb <= 0 or args.warmup < 0:
        parser.error("--repeats and --size-mb must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(run_probe(args.probe, args.probe_src, args.probe_dst)))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-core-", dir=args.work_dir))
    try:
        report = run_benchmark(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

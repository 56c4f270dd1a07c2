"""ckptvcs against what people use instead, on real fine-tuning checkpoints.

What it measures, and why
-------------------------
ckptvcs should be the fastest and smallest way to keep a training run's checkpoints.
This script fine-tunes the pretrained all-MiniLM-L6-v2 weights (benchmarks/minilm.py)
in three regimes, full fine-tune, frozen embeddings and small adapters, and keeps six
checkpoints, each ten AdamW steps after the previous one (model + optimizer state),
with:

* ``torch.save`` + fsync, one file per checkpoint (the baseline of every ratio);
* ``safetensors`` (``save_file`` of the flattened tensors) + fsync;
* ``zipnn`` (byte-grouping + Huffman/zstd, float32 mode) over the flattened tensors,
  written and fsynced; the output is decoded once and compared, since zipnn 0.5.4
  was seen to mis-decode single inputs of 16 MiB (it gets 4 MiB pieces here);
* ``restic`` and ``borg``: the torch.save file backed up into one repository, a
  snapshot/archive per checkpoint (content-defined chunking + dedup + compression;
  restic's default ``auto`` compression, borg with ``zstd,3``); their time is the
  backup command alone, after the torch.save the user would have run anyway;
* ``ckptvcs``: one commit per checkpoint into one repository.

It reports each one's stored bytes and time, and then the targets of issue 5 as
ratios measured in one run (best of ``--repeats``, alternating runs of the two sides):

1. commit of a new full state (first checkpoint of the full fine-tune, fresh repo)
   against torch.save + fsync of the same state;
2. commit after ~10% of the tensor bytes changed (top layers + their AdamW moments of
   the last full fine-tune checkpoint, changed in place) against torch.save + fsync;
3. load of a full state (warm page cache) against torch.load: the keyframe commit and
   the commit deepest in a delta chain;
4. stored bytes of the six checkpoints against the six torch.save files;
5. peak RSS increase of a commit and a load, each in a fresh subprocess
   (bench_core's probes).

``--sweep`` also commits the full fine-tune sequence at several chunk sizes and
keyframe intervals (time, stored bytes, load time of the last commit): the defaults
were picked from it.

Run
---
    bash scripts/setup-bench.sh                  # once: bench extra, restic, borg
    .venv/bin/python benchmarks/bench_peers.py   # everything; ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_peers.py --scenarios adapters --repeats 1 --no-peers

Scratch files go to ``--work-dir`` (default ``bench-out/peers``); the generated
checkpoint files are kept there between runs (``--regenerate`` to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402  (helpers: fsync'd save, timing, page cache, peak RSS probes)
import minilm  # noqa: E402

import ckptvcs  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def _relative_to_state(delta_bytes: float) -> str:
    """``state + 17 MB`` or ``state - 248 MB``: a peak increase against the state's size."""
    return f"state {'+' if delta_bytes >= 0 else '-'} {abs(delta_bytes) / MB:.0f} MB"
RESTIC_PASSWORD = "ckptvcs-bench"  # a throwaway repository; restic insists on a key


# -- checkpoint sequences -----------------------------------------------------------------


def generate(scenario: str, folder: Path, count: int, steps: int, regenerate: bool) -> list[Path]:
    """The scenario's checkpoints as torch.save files (made once, then reused)."""
    files = [folder / f"ckpt-{i}.pt" for i in range(count)]
    marker = folder / "done.json"
    spec = {"scenario": scenario, "count": count, "steps": steps}
    if not regenerate and marker.exists() and json.loads(marker.read_text()) == spec and all(f.exists() for f in files):
        return files
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"generating {count} {scenario} checkpoints, {steps} AdamW steps apart", file=sys.stderr)
    for path, state in zip(files, minilm.checkpoints(scenario, count, steps)):
        bench_core.torch_save_fsync(state, path)
    marker.write_text(json.dumps(spec))
    return files


def flatten(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state under a path key (for safetensors and zipnn)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state.contiguous()
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(flatten(v, f"{prefix}/{i}"))
    return out


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the systems ---------------------------------------------------------------------------


def run_torch_save(files: list[Path], work: Path) -> dict[str, Any]:
    times = []
    for i, src in enumerate(files):
        state = torch.load(src, weights_only=True)
        t, _ = bench_core.timed_write(lambda: bench_core.torch_save_fsync(state, work / f"{i}.pt"))
        times.append(t)
    return {"stored_bytes": bench_core.tree_bytes(work), "times_s": times}


def run_safetensors(files: list[Path], work: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    times = []
    for i, src in enumerate(files):
        state = torch.load(src, weights_only=True)

        def save(state=state, i=i) -> None:
            path = work / f"{i}.safetensors"
            save_file(flatten(state), str(path))
            fsync_path(path)

        t, _ = bench_core.timed_write(save)
        times.append(t)
    return {"stored_bytes": bench_core.tree_bytes(work), "times_s": times}


def run_zipnn(files: list[Path], work: Path) -> dict[str, Any]:
    import zipnn

    piece = 4 << 20
    times, verified = [], True
    for i, src in enumerate(files):
        state = torch.load(src, weights_only=True)
        codec = zipnn.ZipNN(input_format="byte", bytearray_dtype="float32", threads=os.cpu_count() or 1)

        def save(state=state, i=i) -> list[bytes]:
            parts = []
            with open(work / f"{i}.znn", "wb") as f:
                for tensor in flatten(state).values():
                    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                    for start in range(0, len(raw), piece):
                        part = codec.compress(raw[start : start + piece])
                        parts.append(part)
                        f.write(len(part).to_bytes(8, "little"))
                        f.write(part)
                f.flush()
                os.fsync(f.fileno())
            return parts

        t, parts = bench_core.timed_write(save)
        times.append(t)
        if i == 0:  # check once that zipnn gives the bytes back
            expected = b"".join(v.reshape(-1).view(torch.uint8).numpy().tobytes() for v in flatten(state).values())
            verified = b"".join(bytes(codec.decompress(p)) for p in parts) == expected
    return {"stored_bytes": bench_core.tree_bytes(work), "times_s": times, "round_trip_verified": verified}


def _tool(name: str) -> str | None:
    return shutil.which(name)


def run_restic(files: list[Path], work: Path) -> dict[str, Any]:
    env = {**os.environ, "RESTIC_PASSWORD": RESTIC_PASSWORD, "RESTIC_REPOSITORY": str(work / "repo"),
           "RESTIC_CACHE_DIR": str(work / "cache")}
    subprocess.run(["restic", "init", "--quiet"], env=env, check=True, capture_output=True)
    src = work / "src"
    src.mkdir()
    times = []
    for src_file in files:
        shutil.copyfile(src_file, src / "ckpt.pt")  # the same path, a new version each time
        t, _ = bench_core.timed_write(lambda: subprocess.run(
            ["restic", "backup", "--quiet", "ckpt.pt"], env=env, cwd=src, check=True, capture_output=True))
        times.append(t)
    return {"stored_bytes": bench_core.tree_bytes(work / "repo"), "times_s": times,
            "version": subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()}


def run_borg(files: list[Path], work: Path) -> dict[str, Any]:
    env = {**os.environ, "BORG_BASE_DIR": str(work / "base"), "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    repo = work / "repo"
    subprocess.run(["borg", "init", "--encryption=none", str(repo)], env=env, check=True, capture_output=True)
    src = work / "src"
    src.mkdir()
    times = []
    for i, src_file in enumerate(files):
        shutil.copyfile(src_file, src / "ckpt.pt")
        t, _ = bench_core.timed_write(lambda i=i: subprocess.run(
            ["borg", "create", "--compression", "zstd,3", f"{repo}::ckpt-{i}", "ckpt.pt"],
            env=env, cwd=src, check=True, capture_output=True))
        times.append(t)
    return {"stored_bytes": bench_core.tree_bytes(repo), "times_s": times,
            "version": subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip()}


def run_ckptvcs(files: list[Path], work: Path, **init: Any) -> dict[str, Any]:
    repo = ckptvcs.Repo.init(work / "repo", **init)
    times, ids, new_bytes = [], [], []
    try:
        for src in files:
            state = torch.load(src, weights_only=True)
            t, cid = bench_core.timed_write(lambda: repo.commit(state, step=state["step"], code_version=None))
            times.append(t)
            ids.append(cid)
            new_bytes.append(repo.show(cid).stats["new_stored_bytes"])
        delta_chunks = sum(e.base is not None for e in repo.chunks.index)
        chunks = len(repo.chunks.index)
    finally:
        repo.close()
    return {"stored_bytes": bench_core.tree_bytes(work / "repo"), "times_s": times, "commits": ids,
            "new_stored_bytes": new_bytes, "delta_chunks": delta_chunks, "chunks": chunks}


SYSTEMS = {
    "torch.save": run_torch_save,
    "safetensors": run_safetensors,
    "zipnn": run_zipnn,
    "restic": run_restic,
    "borg": run_borg,
    "ckptvcs": run_ckptvcs,
}


def run_scenario(scenario: str, files: list[Path], work: Path, peers: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, runner in SYSTEMS.items():
        if not peers and name not in ("torch.save", "ckptvcs"):
            continue
        if name in ("restic", "borg") and _tool(name) is None:
            results[name] = {"skipped": f"{name} is not installed (scripts/setup-bench.sh)"}
            continue
        folder = work / scenario / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"  {scenario}: {name}", file=sys.stderr)
        try:
            results[name] = runner(files, folder)
        except Exception as err:  # a peer that fails is reported, not fatal
            results[name] = {"skipped": f"{type(err).__name__}: {err}"}
        finally:
            if name != "ckptvcs":
                shutil.rmtree(folder, ignore_errors=True)
    base = results["torch.save"]["stored_bytes"]
    for r in results.values():
        if "stored_bytes" in r:
            r["ratio_vs_torch_save"] = r["stored_bytes"] / base
            r["total_time_s"] = sum(r["times_s"])
    return results


# -- the targets ---------------------------------------------------------------------------


def best(samples: list[float]) -> float:
    return min(samples)


def measure_targets(files: list[Path], repo_dir: Path, commits: list[str], work: Path, repeats: int) -> dict[str, Any]:
    """Commit-new, commit-10%-changed and load ratios on the full fine-tune's checkpoints."""
    state = torch.load(files[0], weights_only=True)
    nbytes = bench_core.state_nbytes(state)
    save_t, commit_t, unverified_t = [], [], []
    for _ in range(repeats):
        save_t.append(bench_core.timed_write(lambda: bench_core.torch_save_fsync(state, work / "t.pt"))[0])
        for verify, samples in ((True, commit_t), (False, unverified_t)):
            shutil.rmtree(work / "fresh", ignore_errors=True)
            repo = ckptvcs.Repo.init(work / "fresh")
            repo.chunks.verify_encoding = verify  # what config.json's verify_encoding sets
            samples.append(bench_core.timed_write(lambda: repo.commit(state, step=1, code_version=None))[0])
            repo.close()
    shutil.rmtree(work / "fresh", ignore_errors=True)

    # ~10% of the tensor bytes changed: top layers and their moments of the last checkpoint.
    last = torch.load(files[-1], weights_only=True)
    names = [name for name, _ in minilm.MiniLM().named_parameters()]
    layers = pick_changed_layers(last, names)
    shutil.rmtree(work / "changed", ignore_errors=True)
    repo = ckptvcs.Repo.init(work / "changed")
    repo.commit(last, code_version=None)
    save10_t, commit10_t, changed, new10 = [], [], 0, []
    for r in range(repeats):
        changed = bench_core.perturb(last, names, layers, seed=r)
        save10_t.append(bench_core.timed_write(lambda: bench_core.torch_save_fsync(last, work / "t.pt"))[0])
        t, cid = bench_core.timed_write(lambda: repo.commit(last, code_version=None))
        commit10_t.append(t)
        new10.append(repo.show(cid).stats["new_stored_bytes"])
    repo.close()
    shutil.rmtree(work / "changed", ignore_errors=True)

    # Loads, warm page cache: the keyframe commit and the deepest delta in the sequence.
    repo = ckptvcs.Repo.open(repo_dir)
    load_t: dict[str, list[float]] = {"torch.load": [], "keyframe": [], "deepest": []}
    deepest = max(commits, key=lambda c: _max_chain(repo, c))
    depth = _max_chain(repo, deepest)
    for _ in range(repeats):
        load_t["torch.load"].append(bench_core.timed(lambda: torch.load(files[0], weights_only=True))[0])
        load_t["keyframe"].append(bench_core.timed(lambda: repo.load(commits[0]))[0])
        load_t["deepest"].append(bench_core.timed(lambda: repo.load(deepest))[0])
    assert bench_core.states_equal(repo.load(commits[0]), state), "ckptvcs load is not bit-exact"
    repo.close()
    os.unlink(work / "t.pt")
    return {
        "state_bytes": nbytes,
        "commit_new": {"torch_save_s": save_t, "commit_s": commit_t, "ratio": best(commit_t) / best(save_t),
                       "unverified_commit_s": unverified_t, "unverified_ratio": best(unverified_t) / best(save_t)},
        "commit_changed": {"changed_bytes": changed, "fraction": changed / nbytes, "torch_save_s": save10_t,
                           "commit_s": commit10_t, "new_stored_bytes": new10,
                           "ratio": best(commit10_t) / best(save10_t)},
        "load": {**{k: v for k, v in load_t.items()}, "deepest_chain": depth,
                 "ratio_keyframe": best(load_t["keyframe"]) / best(load_t["torch.load"]),
                 "ratio_deepest": best(load_t["deepest"]) / best(load_t["torch.load"])},
    }


def pick_changed_layers(state: dict[str, Any], names: list[str]) -> list[int]:
    """Whole trained layers, top-down, whose weights + AdamW moments total ~10% of the state."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        if index in state["optimizer"]["state"]:  # the unused pooler has no moments
            groups.setdefault(name.rsplit(".", 1)[0], []).append(index)
    budget = bench_core.CHANGED_FRACTION * bench_core.state_nbytes(state)
    chosen, total = [], 0
    for members in reversed(groups.values()):
        params = [state["model"][names[i]] for i in members]
        cost = 3 * sum(p.numel() * p.element_size() for p in params)
        if max(p.dim() for p in params) == 2 and total + cost <= 1.1 * budget:
            chosen += members
            total += cost
    return sorted(chosen)


def _max_chain(repo: ckptvcs.Repo, commit: str) -> int:
    return max((repo.chunks.chain_length(repo.chunks.index.get(bytes.fromhex(c)))
                for blob in repo.manifest(commit).blobs for c in blob["chunks"]), default=0)


def measure_memory(first_file: Path, repo_dir: Path, work: Path) -> dict[str, Any]:
    """Peak RSS increase of commit and load, each in a fresh process (bench_core's probes)."""
    shutil.rmtree(work / "probe-repo", ignore_errors=True)
    result = {
        "commit": bench_core.probe_in_subprocess("commit", first_file, work / "probe-repo"),
        "repo_load": bench_core.probe_in_subprocess("repo_load", repo_dir, work),
        "torch_save": bench_core.probe_in_subprocess("torch_save", first_file, work / "probe.pt"),
        "torch_load": bench_core.probe_in_subprocess("torch_load", first_file, work),
    }
    shutil.rmtree(work / "probe-repo", ignore_errors=True)
    (work / "probe.pt").unlink(missing_ok=True)
    return result


def sweep(files: list[Path], work: Path) -> list[dict[str, Any]]:
    rows = []
    for chunk_size in (256 << 10, 1 << 20, 4 << 20):
        for keyframe_interval in (4, 8):
            folder = work / "sweep"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            print(f"  sweep: chunk {chunk_size >> 10} KiB, K={keyframe_interval}", file=sys.stderr)
            r = run_ckptvcs(files, folder, chunk_size=chunk_size, keyframe_interval=keyframe_interval)
            repo = ckptvcs.Repo.open(folder / "repo")
            load_s = min(bench_core.timed(lambda: repo.load(r["commits"][-1]))[0] for _ in range(2))
            repo.close()
            rows.append({"chunk_size": chunk_size, "keyframe_interval": keyframe_interval,
                         "first_commit_s": r["times_s"][0], "total_commit_s": sum(r["times_s"]),
                         "stored_bytes": r["stored_bytes"], "load_last_s": load_s})
            shutil.rmtree(folder, ignore_errors=True)
    return rows


# -- report -------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    out = [f"Machine: {bench_core.machine_line(report['machine'])}; load average at the end "
           f"{', '.join(f'{x:.1f}' for x in report.get('load_average_at_end', ()))}", ""]
    scen = report["scenarios"]
    names = list(SYSTEMS)
    out.append(f"Stored bytes of {report['count']} checkpoints {report['steps']} AdamW steps apart "
               "(ratio to the torch.save files) and total time to store them:")
    out.append("")
    out.append("| system | " + " | ".join(scen) + " |")
    out.append("|---|" + "---|" * len(scen))
    for name in names:
        cells = []
        for s in scen.values():
            r = s.get(name, {})
            if "stored_bytes" in r:
                cells.append(f"{r['stored_bytes'] / MB:.0f} MB ({r['ratio_vs_torch_save']:.3f}), {r['total_time_s']:.1f} s")
            else:
                cells.append(r.get("skipped", "not run"))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    t = report.get("targets")
    if t:
        out += ["", f"Targets (full fine-tune state, {t['state_bytes'] / MB:.0f} MB; best of runs):", "",
                "| target | ckptvcs | baseline | ratio | goal |", "|---|---|---|---|---|"]
        cn, cc, ld = t["commit_new"], t["commit_changed"], t["load"]
        out.append(f"| commit of a new full state vs torch.save + fsync | {best(cn['commit_s']):.2f} s | "
                   f"{best(cn['torch_save_s']):.2f} s | {cn['ratio']:.2f}x | ≤ 1.0x |")
        out.append(f"| the same, with verify_encoding off | {best(cn['unverified_commit_s']):.2f} s | "
                   f"{best(cn['torch_save_s']):.2f} s | {cn['unverified_ratio']:.2f}x | (not a target) |")
        out.append(f"| commit, {100 * cc['fraction']:.0f}% of tensor bytes changed, vs torch.save + fsync | "
                   f"{best(cc['commit_s']):.2f} s | {best(cc['torch_save_s']):.2f} s | {cc['ratio']:.2f}x | ≤ 0.25x |")
        out.append(f"| load (keyframe commit) vs torch.load, warm cache | {best(ld['keyframe']):.2f} s | "
                   f"{best(ld['torch.load']):.2f} s | {ld['ratio_keyframe']:.2f}x | ≤ 1.2x |")
        out.append(f"| load (chain of {ld['deepest_chain']} deltas) vs torch.load | {best(ld['deepest']):.2f} s | "
                   f"{best(ld['torch.load']):.2f} s | {ld['ratio_deepest']:.2f}x | ≤ 1.2x |")
        goals = {"full": 0.72, "frozen-embeddings": 0.55, "adapters": 0.15}
        for s, goal in goals.items():
            if s in scen and "ckptvcs" in scen[s]:
                r = scen[s]["ckptvcs"]
                out.append(f"| stored bytes, {s} | {r['stored_bytes'] / MB:.0f} MB | "
                           f"{scen[s]['torch.save']['stored_bytes'] / MB:.0f} MB | {r['ratio_vs_torch_save']:.3f} | ≤ {goal} |")
    m = report.get("memory")
    if m and t:
        sb = t["state_bytes"]
        out.append(f"| peak RSS increase of a commit | {m['commit']['peak_increase_bytes'] / MB:.0f} MB | "
                   f"state {sb / MB:.0f} MB | {_relative_to_state(m['commit']['peak_increase_bytes'] - sb)} | ≤ state + 256 MB |")
        load_peak = m['repo_load']['peak_increase_bytes']
        out.append(f"| peak RSS increase of a load | {load_peak / MB:.0f} MB | "
                   f"state {sb / MB:.0f} MB | {_relative_to_state(load_peak - sb)} | ≤ state + 256 MB |")
    if report.get("sweep"):
        out += ["", f"Chunk size and keyframe interval sweep (full fine-tune, {report['count']} commits):", "",
                "| chunk | K | first commit | 6 commits | stored | load of the last |", "|---|---|---|---|---|---|"]
        for row in report["sweep"]:
            out.append(f"| {row['chunk_size'] >> 10} KiB | {row['keyframe_interval']} | {row['first_commit_s']:.2f} s | "
                       f"{row['total_commit_s']:.2f} s | {row['stored_bytes'] / MB:.0f} MB | {row['load_last_s']:.2f} s |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "bench-out" / "peers")
    parser.add_argument("--scenarios", nargs="+", default=list(minilm.SCENARIOS), choices=minilm.SCENARIOS)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="only torch.save and ckptvcs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--sweep", action="store_true", help="also sweep chunk size and keyframe interval")
    parser.add_argument("--regenerate", action="store_true", help="make the checkpoint sequences again")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    bench_core.prefault(min(4 << 30, bench_core.prefault_bytes(400 * MB)))
    report: dict[str, Any] = {"machine": bench_core.machine_info(work), "count": args.count, "steps": args.steps,
                              "scenarios": {}}
    sequences = {s: generate(s, work / "seq" / s, args.count, args.steps, args.regenerate) for s in args.scenarios}
    for s, files in sequences.items():
        report["scenarios"][s] = run_scenario(s, files, work / "runs", not args.no_peers)
    if "full" in sequences:
        full = report["scenarios"]["full"]["ckptvcs"]
        repo_dir = work / "runs" / "full" / "ckptvcs" / "repo"
        report["targets"] = measure_targets(sequences["full"], repo_dir, full["commits"], work, args.repeats)
        if not args.no_memory:
            report["memory"] = measure_memory(sequences["full"][0], repo_dir, work)
        if args.sweep:
            report["sweep"] = sweep(sequences["full"], work)
    report["load_average_at_end"] = os.getloadavg()
    text = render(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

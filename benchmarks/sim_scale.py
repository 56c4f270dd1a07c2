"""Scaled-down simulation of a sharded save straight into S3 (docs/scale.md checks its model here).

N rank processes each open the repository that lives in a SeaweedFS bucket
(``Repo.open(backend=FsspecBackend(...))``, wrapped in a request-counting backend), stage
their shard with small chunks, and hand back their ``Staged``; one coordinator process
then opens the repository, ``combine_staged``s the parts and ``publish``es: the DCP
protocol of docs/distributed.md with every host on object storage. Every save after the
first changes every value a little (the dense fine-tune case: delta-coded chunks).

Measured per phase (rank open, rank stage, coordinator open, combine, publish): requests by
kind and key prefix, bytes, wall time; plus the combined manifest's stored size per chunk.
The machine is small and shared: compare ratios and counts, not seconds.

Where each process keeps its chunk index (``--cache``, ckptvcs/index_cache.py): ``rank``
(the default) gives every rank and the coordinator a persistent cache folder of its own, as
if each ran on its own host, kept across saves; ``host`` shares one folder (every process
on one host); ``off`` gives every open a fresh temporary index (it reads every pack's index
object). The printed ``before`` is the header-walk model of the code before pack index
objects (docs/scale.md, exact when it was measured), for the same run.

    .venv/bin/python benchmarks/sim_scale.py --ranks 2 4 8 16 --chunk-kib 16 --rank-kib 1024 --saves 2
    .venv/bin/python benchmarks/sim_scale.py --quick   # 2 and 4 ranks, 3 saves, every cache mode
    .venv/bin/python benchmarks/sim_scale.py --ranks 2 --saves 2 --json out.json   # the smoke test's run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckptvcs import Repo, layout  # noqa: E402
from ckptvcs.backends.counting import CountingBackend, RequestCounts  # noqa: E402
from ckptvcs.backends.fsspec_backend import FsspecBackend  # noqa: E402
from s3server import make_bucket, run_server  # noqa: E402  (tests/s3server.py)


def _backend(url: str, options: dict[str, Any]) -> CountingBackend:
    return CountingBackend(FsspecBackend(url, **dict(options)))


def _shard(rank: int, save: int, nbytes: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    base = torch.randn(nbytes // 4, generator=g)
    if save:
        base = base + 1e-3 * save * torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(save))
    return base


def _use_cache(cache: str) -> None:
    """Point this process's chunk index cache at ``cache`` (a folder, or "off")."""
    os.environ["CKPTVCS_INDEX_CACHE"] = cache


def _rank(args: tuple[str, dict[str, Any], int, int, int, str | None, str]) -> dict[str, Any]:
    """One rank: open the repository on S3, stage its shard; counts per phase."""
    url, options, rank, save, nbytes, parent, cache = args
    _use_cache(cache)
    backend = _backend(url, options)
    t0 = time.perf_counter()
    with Repo.open(backend=backend) as repo:
        opened = backend.reset()
        t1 = time.perf_counter()
        staged = repo.stage({f"rank{rank}": {"w": _shard(rank, save, nbytes)}}, parent=parent)
        t2 = time.perf_counter()
    return {"staged": staged, "open": opened, "stage": backend.reset(), "open_s": t1 - t0, "stage_s": t2 - t1}


def _coordinate(url: str, options: dict[str, Any], parts: list[Any], parent: str | None, cache: str) -> dict[str, Any]:
    before = os.environ.get("CKPTVCS_INDEX_CACHE")
    _use_cache(cache)
    try:
        return _coordinate_in(url, options, parts, parent)
    finally:
        _use_cache(before or "")


def _coordinate_in(url: str, options: dict[str, Any], parts: list[Any], parent: str | None) -> dict[str, Any]:
    backend = _backend(url, options)
    t0 = time.perf_counter()
    with Repo.open(backend=backend) as repo:
        opened = backend.reset()
        t1 = time.perf_counter()
        combined = repo.combine_staged(parts)
        combine = backend.reset()
        t2 = time.perf_counter()
        commit = repo.publish(combined, "sim save", expected_parent=parent, code_version=None)
        t3 = time.perf_counter()
        published = backend.reset()
        manifest_bytes = backend.inner.size(layout.object_key(combined.manifest)) or 0
        chunks = sum(len(b["chunks"]) for b in repo.manifest(commit).blobs)
    return {"commit": commit, "open": opened, "combine": combine, "publish": published,
            "open_s": t1 - t0, "combine_s": t2 - t1, "publish_s": t3 - t2,
            "manifest_bytes": manifest_bytes, "chunks": chunks}


def _sum(counts: list[RequestCounts]) -> RequestCounts:
    total = RequestCounts()
    for c in counts:
        total.add(c)
    return total


def _row(counts: RequestCounts) -> dict[str, Any]:
    return {"requests": dict(counts.requests), "bytes_in": counts.bytes_in, "bytes_out": counts.bytes_out,
            "put_by_top": dict(counts.top_level("PUT")), "get_by_top": dict(counts.top_level("GET"))}


def _caches(mode: str, folder: Path, ranks: int) -> tuple[list[str], str]:
    """(each rank's index cache, the coordinator's) for cache ``mode`` (module docstring)."""
    if mode == "off":
        return ["off"] * ranks, "off"
    if mode == "host":
        return [str(folder / "host")] * ranks, str(folder / "host")
    return [str(folder / f"host-{r}") for r in range(ranks)], str(folder / "host-coordinator")


def _pack_count(url: str, endpoint: dict[str, Any]) -> int:
    return sum(k.endswith(layout.PACK_SUFFIX) for k in FsspecBackend(url, **dict(endpoint)).list(layout.PACKS))


def simulate(endpoint: dict[str, Any], bucket: str, ranks: int, saves: int, chunk_size: int, nbytes: int,
             workers: int, cache: str = "rank") -> list[dict[str, Any]]:
    """``saves`` sharded saves by ``ranks`` processes into ``s3://bucket/sim-<ranks>``."""
    url = f"s3://{bucket}/sim-{ranks}-{uuid.uuid4().hex[:6]}"
    Repo.init(None, chunk_size=chunk_size, backend=FsspecBackend(url, **dict(endpoint))).close()
    parent: str | None = None
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ckptvcs-sim-cache-") as folder, ctx.Pool(min(workers, ranks)) as pool:
        rank_caches, coord_cache = _caches(cache, Path(folder), ranks)
        for save in range(saves):
            t0 = time.perf_counter()
            results = pool.map(_rank, [(url, endpoint, r, save, nbytes, parent, rank_caches[r]) for r in range(ranks)])
            t1 = time.perf_counter()
            packs = _pack_count(url, endpoint)
            coord = _coordinate(url, endpoint, [r["staged"] for r in results], parent, coord_cache)
            parent = coord["commit"]
            rank_open, rank_stage = _sum([r["open"] for r in results]), _sum([r["stage"] for r in results])
            rows.append({
                "url": url, "commit": coord["commit"], "cache": cache,
                "packs_total": packs, "packs_new": packs - (rows[-1]["packs_total"] if rows else 0),
                "ranks": ranks, "save": save, "chunk_size": chunk_size, "rank_bytes": nbytes,
                "chunks": coord["chunks"], "manifest_bytes": coord["manifest_bytes"],
                "manifest_bytes_per_chunk": coord["manifest_bytes"] / max(1, coord["chunks"]),
                "ranks_s": t1 - t0,
                "rank_open_s_max": max(r["open_s"] for r in results),
                "rank_stage_s_max": max(r["stage_s"] for r in results),
                "rank_open": _row(rank_open), "rank_stage": _row(rank_stage),
                "coord_open": _row(coord["open"]), "combine": _row(coord["combine"]),
                "publish": _row(coord["publish"]),
                "coord_open_s": coord["open_s"], "combine_s": coord["combine_s"], "publish_s": coord["publish_s"],
            })
            rows[-1]["model_gets"] = predict(rows)
            rows[-1]["before_gets"] = predict_header_walk(rows)
    return rows


KEYFRAME_INTERVAL = 4  # store.DEFAULT_KEYFRAME_INTERVAL: saves 1-3 of a chain are deltas


def predict(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The model's GET counts for the last of ``rows`` (one run's saves so far), docs/scale.md.

    An open reads config.json and one index object per pack its cache has not read: with
    ``off`` every pack; with ``rank`` the packs written since its last open by the others
    (a rank's own packs are recorded as it seals them); with ``host`` none (every pack was
    sealed, and recorded, on this host).
    """
    last, n = rows[-1], rows[-1]["ranks"]
    before = rows[-2]["packs_total"] if len(rows) > 1 else 0
    previous_new = rows[-2]["packs_new"] if len(rows) > 1 else 0
    # staging a delta save reads each chunk's delta base, and a base's own chain: one ranged
    # GET per level (save % 4 levels), plus 4 small reads per rank (the parent and its manifest)
    staged_gets = (last["chunks"] * (last["save"] % KEYFRAME_INTERVAL) + 4 * n) if last["save"] else 0
    model = {"rank_stage": staged_gets, "combine": 2 * n}
    if last["cache"] == "off":
        model.update(rank_open=n * (1 + before), coord_open=1 + last["packs_total"])
    elif last["cache"] == "rank":
        model.update(rank_open=n + (n - 1) * previous_new, coord_open=1 + last["packs_new"])
    else:  # every pack was written on this host, and recorded by the rank that sealed it
        model.update(rank_open=n, coord_open=1)
    return model


def predict_header_walk(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The GETs of the opens before pack index objects (docs/scale.md): every open walked
    every pack's headers, 2 GETs per pack (header, footer) plus 1 per entry and 1 more per
    delta entry (its base id), and read config.json."""
    def walk(upto: list[dict[str, Any]]) -> int:
        return 1 + sum(r["chunks"] * (1 + _is_delta(r)) + 2 * r["packs_new"] for r in upto)
    n = rows[-1]["ranks"]
    return {"coord_open": walk(rows), "rank_open": n * walk(rows[:-1]) if len(rows) > 1 else n}


def _is_delta(row: dict[str, Any]) -> int:
    return int(row["save"] % KEYFRAME_INTERVAL != 0)


def _print(row: dict[str, Any]) -> None:
    def req(name: str) -> str:
        r = row[name]["requests"]
        return " ".join(f"{k}={r[k]}" for k in sorted(r))
    print(f"N={row['ranks']:3d} cache={row['cache']} save={row['save']} packs={row['packs_total']} "
          f"chunks={row['chunks']} manifest={row['manifest_bytes']} B "
          f"({row['manifest_bytes_per_chunk']:.1f} B/chunk)  ranks {row['ranks_s']:.1f}s "
          f"rank open max {row['rank_open_s_max']:.2f}s coord open {row['coord_open_s']:.2f}s "
          f"combine {row['combine_s']:.2f}s publish {row['publish_s']:.2f}s")
    for phase in ("rank_open", "rank_stage", "coord_open", "combine", "publish"):
        model = row["model_gets"].get(phase)
        vs = f"  GETs/model={row[phase]['requests'].get('GET', 0) / model:.3f}" if model else ""
        old = row["before_gets"].get(phase)
        vs += f"  before(header walk)={old}" if old else ""
        print(f"    {phase:11s} {req(phase)}  in={row[phase]['bytes_in']} out={row[phase]['bytes_out']}{vs}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--chunk-kib", type=int, default=16)
    parser.add_argument("--rank-kib", type=int, default=1024, help="bytes of state per rank")
    parser.add_argument("--workers", type=int, default=16, help="rank processes alive at once")
    parser.add_argument("--cache", nargs="+", choices=["rank", "host", "off"], default=["rank"],
                        help="where each process keeps its chunk index (module docstring)")
    parser.add_argument("--quick", action="store_true", help="2 and 4 ranks, 3 saves, every cache mode")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.saves, args.cache = [2, 4], 3, ["rank", "host", "off"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ckptvcs-sim-") as tmp, run_server(Path(tmp) / "weed") as server:
        bucket = f"sim-{uuid.uuid4().hex[:12]}"
        make_bucket(server, bucket)
        options = {**server.storage_options()}
        os.environ.update(server.env())
        for mode in args.cache:
            for n in args.ranks:
                for row in simulate(options, bucket, n, args.saves, args.chunk_kib << 10, args.rank_kib << 10,
                                    args.workers, mode):
                    _print(row)
                    rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

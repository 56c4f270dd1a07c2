"""DCP's FileSystemWriter against ckptvcs's RepoWriter, world size 4 on CPU (gloo).

    python benchmarks/bench_dcp.py [--saves 4] [--width 1024] [--world 4]

Four ranks train an FSDP2 model (a frozen embedding, as in adapter or partial fine-tuning,
plus trained layers, with AdamW) and save after every training step, once into a fresh
FileSystemWriter directory per save and once into one ckptvcs repository. Reports per-save
wall time (slowest rank, barrier to barrier), load time of the last save at the same world
size, and bytes on disk after the sequence. Ratios measured in one run; never gates tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptvcs
from ckptvcs.integrations.dcp import RepoLoadPlanner, RepoReader, RepoWriter


def disk_bytes(path: Path) -> int:
    """Allocated bytes (the LMDB map file is sparse: its apparent size says little)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(torch.nn.Embedding(4 * w, w), torch.nn.Linear(w, w), torch.nn.ReLU(),
                                torch.nn.Linear(w, w))
    model[0].weight.requires_grad_(False)  # frozen: identical in every save
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    repo = os.path.join(tmp, "repo")
    times: dict[str, list[float]] = {"fs_save": [], "repo_save": []}
    for step in range(args.saves):
        x = torch.randint(0, 4 * w, (8,), generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": step}
        times["fs_save"].append(timed(lambda: dcp.save(state, checkpoint_id=os.path.join(tmp, f"fs-{step}"))))
        times["repo_save"].append(timed(lambda: dcp.save(state, storage_writer=RepoWriter(repo, step=step))))
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}
    last = os.path.join(tmp, f"fs-{args.saves - 1}")
    fs_load = timed(lambda: dcp.load(state, checkpoint_id=last))
    repo_load = timed(lambda: dcp.load(state, storage_reader=RepoReader(repo), planner=RepoLoadPlanner()))
    if rank == 0:
        fs_bytes = sum(disk_bytes(Path(tmp, f"fs-{s}")) for s in range(args.saves))
        repo_bytes = disk_bytes(Path(repo)) - disk_bytes(Path(repo, "index"))
        result = {**times, "fs_load": fs_load, "repo_load": repo_load, "fs_bytes": fs_bytes, "repo_bytes": repo_bytes,
                  "repo_index_bytes": disk_bytes(Path(repo, "index"))}
        Path(tmp, "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-dcp-")
    try:
        ckptvcs.Repo.init(os.path.join(tmp, "repo")).close()
        mp.spawn(rank_main, args=(args.world, args, tmp), nprocs=args.world)
        r = json.loads(Path(tmp, "result.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib = 1 << 20
    print(f"world {args.world}, {args.saves} saves, width {args.width}")
    print(f"{'':12}{'FileSystemWriter':>18}{'RepoWriter':>14}")
    print(f"{'first save':12}{r['fs_save'][0]:>17.2f}s{r['repo_save'][0]:>13.2f}s")
    later_fs, later_repo = r["fs_save"][1:] or [0.0], r["repo_save"][1:] or [0.0]
    print(f"{'later saves':12}{sum(later_fs) / len(later_fs):>17.2f}s{sum(later_repo) / len(later_repo):>13.2f}s")
    print(f"{'load':12}{r['fs_load']:>17.2f}s{r['repo_load']:>13.2f}s")
    print(f"{'disk':12}{r['fs_bytes'] / mib:>14.1f}MiB{r['repo_bytes'] / mib:>10.1f}MiB"
          f"  (+ index {r['repo_index_bytes'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()

"""The per-chunk costs docs/scale.md extrapolates from, on a local repository.

- manifest bytes per chunk (stored zstd, and as JSON) of a real many-chunk commit;
- LMDB index bytes per entry (keyframes and delta entries, two commits);
- the coordinator's CPU per chunk: ``combine_staged`` of P staged parts, then ``publish``.

    .venv/bin/python benchmarks/bench_coordinator.py --parts 16 --chunks-per-part 4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ckptvcs import Repo, layout

CHUNK = 4096  # the smallest chunk size: many chunks from little data


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=16)
    parser.add_argument("--chunks-per-part", type=int, default=4096)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="ckptvcs-coord-") as tmp, Repo.init(Path(tmp) / "r", chunk_size=CHUNK) as repo:
        shards = {r: torch.randn(args.chunks_per_part * CHUNK // 4, generator=g) for r in range(args.parts)}
        commit = None
        for save in range(2):  # a keyframe save, then a dense delta save
            parts = [repo.stage({f"rank{r}": {"w": w + 1e-3 * save}}, parent=commit) for r, w in shards.items()]
            t0 = time.perf_counter()
            combined = repo.combine_staged(parts)
            t1 = time.perf_counter()
            commit = repo.publish(combined, f"save {save}", expected_parent=commit, code_version=None)
            t2 = time.perf_counter()
            manifest = repo.manifest(commit)
            chunks = sum(len(b["chunks"]) for b in manifest.blobs)
            stored = (Path(tmp) / "r" / layout.object_key(manifest.id)).stat().st_size
            as_json = len(json.dumps({"root": manifest.root, "blobs": manifest.blobs}, separators=(",", ":")))
            print(f"save {save}: {chunks} chunks; manifest {stored} B stored ({stored / chunks:.1f} B/chunk), "
                  f"{as_json / chunks:.1f} B/chunk as JSON; combine {(t1 - t0) / chunks * 1e6:.1f} us/chunk, "
                  f"publish {(t2 - t1) / chunks * 1e6:.1f} us/chunk")
        entries = len(repo.chunks.index)
        index = _dir_bytes(Path(tmp) / "r" / layout.INDEX)
        print(f"index: {entries} entries, {index} B ({index / entries:.1f} B/entry)")


if __name__ == "__main__":
    main()

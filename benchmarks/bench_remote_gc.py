"""gc on a remote: what it reclaims, what partly dead packs keep, and what the push re-checks cost.

What it measures (counts and bytes, not time: independent of machine load)
-------------------------------------------------------------------------
A run saves N checkpoints of a state whose every weight changes a little between saves
(the full fine-tune case: XOR deltas against the parent, a keyframe every 4 chunks of a
chain), pushing after each save to a ``memory://`` remote (one pack per push). Then:

* ``push requests``: the object-store requests (GET/HEAD/PUT/LIST) of each push, with the
  re-checks around the ref swap (docs/remotes.md, "gc on a remote") and, alternating in
  the same run on a second remote, without them (the re-check passes patched out);
* ``gc``: the oldest K commits get remote prune records, ``gc --remote`` (grace 0) runs;
  reported: packs and bytes deleted, live packs that also hold dead chunks and their dead
  bytes (kept: remote packs are not rewritten), the remote's pack bytes before and after.

Run
---
    .venv/bin/python benchmarks/bench_remote_gc.py            # 12 checkpoints of 2M float32
    .venv/bin/python benchmarks/bench_remote_gc.py --quick    # 8 checkpoints of 256K
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ckptvcs import Repo
from ckptvcs.backends.counting import CountingBackend
from ckptvcs.backends.fsspec_backend import FsspecBackend
from ckptvcs.remotes import push
from ckptvcs.remotes import transfer as transfer_module
from ckptvcs.remotes.remote_gc import gc_remote, prune_on_remote


class _Counting(CountingBackend):
    """CountingBackend that also forwards the listing with times remote gc needs."""

    def list_modified(self, prefix: str = "") -> dict[str, float]:
        self._tally("LIST", prefix)
        return self.inner.list_modified(prefix)  # type: ignore[attr-defined,no-any-return]


def _pack_bytes(backend: FsspecBackend) -> int:
    return sum(backend.size(k) or 0 for k in backend.list("packs") if k.endswith(".pack"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 checkpoints of 256K floats")
    parser.add_argument("--checkpoints", type=int, default=12)
    parser.add_argument("--numel", type=int, default=2 << 20)
    parser.add_argument("--prune", type=int, default=None, help="how many of the oldest to prune (default: half)")
    args = parser.parse_args()
    n, numel = (8, 256 << 10) if args.quick else (args.checkpoints, args.numel)
    prune = args.prune if args.prune is not None else n // 2
    original = transfer_module._send_data

    def without_rechecks(*a: Any, every_pack: bool = False, **k: Any) -> None:
        if not every_pack:
            original(*a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        repo = Repo.init(Path(tmp) / "run")
        urls = {mode: f"memory://bench-gc-{uuid.uuid4().hex}/{mode}" for mode in ("with", "without")}
        remotes = {mode: _Counting(FsspecBackend(url)) for mode, url in urls.items()}
        per_push: dict[str, list[Counter[str]]] = {"with": [], "without": []}
        g = torch.Generator().manual_seed(0)
        weights = torch.randn(numel, generator=g)
        ids = []
        for step in range(n):
            weights = weights + 1e-3 * torch.randn(numel, generator=g)
            ids.append(repo.commit({"model": {"w": weights}}, f"step {step}"))
            for mode in (("with", "without") if step % 2 == 0 else ("without", "with")):  # alternate pairs
                remote = remotes[mode]
                remote.reset()
                transfer_module._send_data = original if mode == "with" else without_rechecks  # type: ignore[assignment]
                try:
                    push(repo, remote)
                finally:
                    transfer_module._send_data = original  # type: ignore[assignment]
                per_push[mode].append(Counter(remote.reset().requests))
        for mode in ("with", "without"):
            total = sum(per_push[mode], Counter())
            print(f"push requests {mode} re-checks: {sum(total.values()) / n:.1f} per push "
                  f"({', '.join(f'{k} {v / n:.1f}' for k, v in sorted(total.items()))})")
        backend = FsspecBackend(urls["with"])
        before = _pack_bytes(backend)
        prune_on_remote(repo, backend, ids[:prune], "bench", "oldest")
        report = gc_remote(repo, backend, grace=0)
        after = _pack_bytes(backend)
        print(f"gc after pruning the oldest {prune} of {n}: deleted {len(report.packs_deleted)} packs, "
              f"{report.bytes_deleted} bytes; {report.partly_dead_packs} partly dead packs keep "
              f"{report.dead_bytes_kept} dead bytes; pack bytes {before} -> {after} "
              f"({after / before:.2f} of before)")
        repo.close()


if __name__ == "__main__":
    main()

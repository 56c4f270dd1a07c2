"""Where commit and load time goes: per-stage timings and cProfile of the bench_core state.

Companion to ``bench_core.py`` (same seeded training state). It times each stage of
``Repo.commit`` and ``Repo.load`` in isolation, on one thread unless a line says
otherwise: state encoding, BLAKE3 chunk hashing, zstd encoding with and without the
verify-after-compress decompression and comparison, pack writes and fsync, LMDB look-ups and
inserts, and on the read side pread, decode, re-hash and buffer allocation. It also runs
a whole commit with fsync stubbed out (CPU and page-cache cost only), two codec
experiments (negative zstd levels, float byte-plane shuffle before zstd), and cProfile
of one commit and one load sorted by tottime. cProfile sees only the calling thread:
hashing and zstd run on the store's pool, where the main thread shows up waiting in
``Future.result``; the stage timings are what account for that work.

    .venv/bin/python benchmarks/profile_core.py [--size-mb 300] [--top 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402

import ckptvcs  # noqa: E402
from ckptvcs import _fs, codec  # noqa: E402
from ckptvcs.index import ChunkIndex  # noqa: E402
from ckptvcs.pack import PackFiles, PackWriter  # noqa: E402
from ckptvcs.repo import DEFAULT_CHUNK_SIZE  # noqa: E402
from ckptvcs.state import encode_state  # noqa: E402
from ckptvcs.store import chunk_hash  # noqa: E402

MB = bench_core.MB


def timed(op: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = op()
    return time.perf_counter() - start, result


def line(label: str, seconds: float, nbytes: int | None = None) -> None:
    rate = f"  {nbytes / MB / seconds:8.0f} MB/s" if nbytes else ""
    print(f"  {label:<58} {seconds:7.3f} s{rate}")


def split(blobs: list[memoryview]) -> list[memoryview]:
    return [b[s:s + DEFAULT_CHUNK_SIZE] for b in blobs for s in range(0, len(b), DEFAULT_CHUNK_SIZE)]


def no_fsync(op: Callable[[], Any]) -> Any:
    saved = _fs._fsync
    _fs._fsync = lambda fd: None
    try:
        return op()
    finally:
        _fs._fsync = saved


def shuffle_encode(chunk: memoryview) -> bytes:
    """Experiment: float32 byte planes, then zstd level 1 (what codec id 2 could be)."""
    planes = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, 4).T.copy()
    return zstandard.ZstdCompressor(level=1).compress(planes)


def profile(op: Callable[[], Any], top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    op()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    body = out.getvalue()
    print(body[body.index("   ncalls"):] if "   ncalls" in body else body)


def commit_stages(state: Any, work: Path) -> tuple[list[memoryview], list[tuple[int, bytes | memoryview]]]:
    print("commit stages (one thread unless noted):")
    t, encoded = timed(lambda: encode_state(state))
    total = encoded.nbytes
    line(f"encode_state ({len(encoded.blobs)} blobs)", t)
    chunks = split([b.data for b in encoded.blobs])
    t, _ = timed(lambda: [chunk_hash(c) for c in chunks])
    line(f"chunk_hash over {len(chunks)} chunks", t, total)
    with ThreadPoolExecutor(2) as pool:
        t, _ = timed(lambda: list(pool.map(chunk_hash, chunks)))
    line("chunk_hash, 2-thread pool", t, total)
    t, encoded_chunks = timed(lambda: [codec.encode(c, verify=False) for c in chunks])
    stored = sum(len(p) for _, p in encoded_chunks)
    zstd_n = sum(1 for k, _ in encoded_chunks if k == codec.ZSTD)
    line(f"codec.encode verify=False ({zstd_n} zstd, {len(chunks) - zstd_n} raw)", t, total)
    t, _ = timed(lambda: [codec.encode(c, verify=True) for c in chunks])
    line("codec.encode verify=True", t, total)
    dctx = zstandard.ZstdDecompressor()
    zpay = [(p, len(c)) for (k, p), c in zip(encoded_chunks, chunks) if k == codec.ZSTD]
    t, _ = timed(lambda: [dctx.decompress(p, max_output_size=n) for p, n in zpay])
    line("  of which verify decompress (one-shot)", t, sum(n for _, n in zpay))
    zraw = [(dctx.decompress(p, max_output_size=len(c)), c) for (k, p), c in zip(encoded_chunks, chunks) if k == codec.ZSTD]
    t, _ = timed(lambda: [d != c for d, c in zraw])  # noqa: F821 (called before the `del zraw` below)
    line("  of which verify compare (bytes != memoryview, holds GIL)", t, sum(len(c) for _, c in zraw))
    t, _ = timed(lambda: [d != c.tobytes() for d, c in zraw])  # noqa: F821 (as above)
    line("  alternative compare: bytes != memoryview.tobytes() (memcmp)", t, sum(len(c) for _, c in zraw))
    del zraw
    with ThreadPoolExecutor(2) as pool:
        t, _ = timed(lambda: list(pool.map(lambda c: (chunk_hash(c), codec.encode(c)), chunks)))
    line("hash + encode(verify=True), 2-thread pool (the commit's CPU)", t, total)
    print(f"  stored {stored / MB:.1f} MB of {total / MB:.1f} MB ({stored / total:.3f})")
    pack_stages(chunks, encoded_chunks, work)
    return chunks, encoded_chunks


def pack_stages(chunks: list[memoryview], encoded_chunks: list, work: Path) -> None:
    (work / "tmp").mkdir(parents=True)
    (work / "packs").mkdir()
    writer = PackWriter(work / "tmp", work / "packs")
    ids = [chunk_hash(c) for c in chunks]
    t, _ = timed(lambda: [writer.add(i, k, len(c), p) for i, c, (k, p) in zip(ids, chunks, encoded_chunks)])
    line("PackWriter.add, all chunks (write to page cache)", t, writer.size)
    t, _ = timed(lambda: _fs.fsync_file(writer._fd))
    line("fsync of the pack", t, writer.size)
    t, _ = timed(writer.seal)
    line("seal (footer, fsync, rename, fsync dir)", t)
    index = ChunkIndex(work / "index")
    t, _ = timed(lambda: [index.get(i) for i in ids])
    line(f"LMDB index.get x{len(ids)} (missing)", t)
    t, _ = timed(lambda: index.add(writer.entries))
    line(f"LMDB index.add of {len(ids)} entries (synchronous)", t)
    t, _ = timed(lambda: [index.get(i) for i in ids])
    line(f"LMDB index.get x{len(ids)} (present)", t)


def codec_experiments(chunks: list[memoryview]) -> None:
    print("codec experiments (one thread):")
    total = sum(len(c) for c in chunks)
    for level in (1, -1, -5):
        cctx = zstandard.ZstdCompressor(level=level)
        t, out = timed(lambda: [cctx.compress(c) for c in chunks])
        stored = sum(min(len(o), len(c)) for o, c in zip(out, chunks))
        line(f"zstd level {level}: ratio {stored / total:.3f}", t, total)
    t, out = timed(lambda: [shuffle_encode(c) for c in chunks])
    stored = sum(min(len(o), len(c)) for o, c in zip(out, chunks))
    line(f"byte-plane shuffle + zstd 1: ratio {stored / total:.3f}", t, total)


def whole_commit(state: Any, work: Path, top: int) -> None:
    print("whole operations:")
    t, _ = timed(lambda: bench_core.torch_save_fsync(state, work / "a.pt"))
    line("torch.save + fsync", t)
    t, _ = timed(lambda: no_fsync(lambda: torch.save(state, work / "b.pt")))
    line("torch.save, no fsync", t)
    for name, wrap in (("repo.commit, fsync stubbed out", no_fsync), ("repo.commit", lambda op: op())):
        os.sync()
        repo = ckptvcs.Repo.init(work / f"repo-{len(name)}")
        t, _ = timed(lambda: wrap(lambda: repo.commit(state, code_version=None)))
        line(name, t)
        repo.close()
    os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # read-only git status
    from ckptvcs import provenance

    t, _ = timed(provenance.code_version)
    line("provenance.code_version() (default commit adds this)", t)
    repo = ckptvcs.Repo.init(work / "repo-prof")
    print("cProfile of repo.commit (main thread only), by tottime:")
    profile(lambda: repo.commit(state, code_version=None), top)
    repo.close()


def load_stages(work: Path, top: int) -> None:
    repo = ckptvcs.Repo.open(work / "repo-prof")
    manifest = repo.manifest()
    ids = [bytes.fromhex(c) for b in manifest.blobs for c in b["chunks"]]
    entries = [repo.chunks.index.get(i) for i in ids]
    total = sum(e.raw_len for e in entries)
    print("load stages (warm page cache, one thread unless noted):")
    t, _ = timed(lambda: [repo.chunks.index.get(i) for i in ids])
    line(f"LMDB index.get x{len(ids)}", t)
    packs = PackFiles(repo.root / "packs")
    t, payloads = timed(lambda: [packs.read_payload(e) for e in entries])
    line("PackFiles.read_payload (pread into new bytes)", t, sum(e.stored_len for e in entries))
    t, buf = timed(lambda: torch.empty(total, dtype=torch.uint8))
    line("torch.empty(total)", t)
    t, _ = timed(lambda: buf.fill_(0))
    line("first touch of the buffer (page faults)", t, total)
    view = memoryview(buf.numpy())
    outs, pos = [], 0
    for e in entries:
        outs.append(view[pos:pos + e.raw_len])
        pos += e.raw_len
    t, _ = timed(lambda: [codec.decode_into(e.codec, p, o) for e, p, o in zip(entries, payloads, outs)])
    line("codec.decode_into (stream_reader for zstd, copy for raw)", t, total)
    dctx = zstandard.ZstdDecompressor()

    def one_shot() -> None:
        for e, p, o in zip(entries, payloads, outs):
            o[:] = dctx.decompress(p, max_output_size=e.raw_len) if e.codec == codec.ZSTD else p

    t, _ = timed(one_shot)
    line("  alternative: one-shot decompress + copy", t, total)
    t, _ = timed(lambda: [chunk_hash(o) for o in outs])
    line("chunk_hash re-verify of all chunks", t, total)
    packs.close()
    print("whole loads (warm):")
    t, _ = timed(lambda: torch.load(work / "a.pt", weights_only=True))
    line("torch.load", t)
    t, _ = timed(repo.load)
    line("repo.load", t)
    print("cProfile of repo.load (main thread only), by tottime:")
    profile(repo.load, top)
    repo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=300.0)
    parser.add_argument("--top", type=int, default=20, help="cProfile rows to print")
    parser.add_argument("--work-dir", type=Path, default=bench_core.DEFAULT_WORK_DIR)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile-core-", dir=args.work_dir))
    try:
        state, _ = bench_core.build_state(args.size_mb)
        # The stages hold several copies of the state at once: touch enough memory first.
        bench_core.prefault(2 * bench_core.prefault_bytes(bench_core.state_nbytes(state)))
        print(f"state: {bench_core.state_nbytes(state) / MB:.1f} MB; torch threads {torch.get_num_threads()}")
        chunks, _ = commit_stages(state, work / "stages")
        codec_experiments(chunks)
        whole_commit(state, work, args.top)
        load_stages(work, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

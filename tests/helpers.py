"""Assertion helpers shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """The element bits of ``t`` as a flat integer tensor (NaNs compare bitwise)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8).reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_INT_OF_SIZE[t.element_size()]).reshape(-1)


def assert_tensor_identical(actual: torch.Tensor, expected: torch.Tensor, *, check_stride: bool = True) -> None:
    """Same type, dtype, shape, (strides) and bits."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.device == expected.device
    if check_stride and actual.numel() > 0:
        assert actual.stride() == expected.stride()
    assert actual.requires_grad == expected.requires_grad
    assert torch.equal(tensor_bits(actual), tensor_bits(expected))


def assert_array_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert type(actual) is np.ndarray
    assert actual.dtype == expected.dtype  # byte order included
    assert actual.dtype.str == expected.dtype.str
    assert actual.shape == expected.shape
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def store_snapshot(root: Path) -> dict[str, int]:
    """Relative path → size of every file under a store (lock files excluded)."""
    snapshot = {}
    for path in root.rglob("*"):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if rel in ("lock", "lock.gate", "index/lock.mdb"):
                continue
            snapshot[rel] = path.stat().st_size
    return snapshot


def tree_size(root: Path) -> int:
    """Total size of the files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def commit_worker(store: str, worker: int, count: int) -> None:
    """Body of a concurrent writer process (spawned): ``count`` commits to the shared
    branch ``shared`` with retry on RefConflictError, and ``count`` to its own branch."""
    from ckptvcs import RefConflictError, Repo

    with Repo.open(store) as repo:
        for j in range(count):
            state = {"w": torch.full((256,), float(worker * 100 + j)), "worker": worker, "j": j}
            while True:
                try:
                    repo.commit(state, f"shared {worker}-{j}", branch="shared", code_version=None)
                    break
                except RefConflictError:
                    continue  # another writer moved the branch: commit again on top of it
            repo.commit(state, f"own {worker}-{j}", branch=f"worker-{worker}", code_version=None)


def record_chunk_reads(monkeypatch, repo) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Record the id of every chunk ``repo`` reads from its packs (any codec)."""
    read: list[bytes] = []
    original = repo.chunks._read_chunk

    def recording(entry, out, describe):  # type: ignore[no-untyped-def]
        read.append(entry.chunk_id)
        return original(entry, out, describe)

    monkeypatch.setattr(repo.chunks, "_read_chunk", recording)
    return read


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    """XOR one byte of a file in place with ``mask`` (simulated bit rot)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def flip_payload_byte(repo, entry) -> None:
    """Damage the middle byte of a chunk's stored payload in its pack."""
    flip_byte(repo.chunks.packs.path(entry.pack), entry.offset + entry.stored_len // 2, 0xFF)


def wait_for_ranks(procs: list[subprocess.Popen[str]], out: Path,
                   timeout: float) -> list[tuple[dict[str, Any] | None, int | None, str]]:
    """Wait for rank processes (``stdout`` piped), killing any still running after the wait.

    Per rank: ``(out/rank<r>.json parsed, or None when the rank wrote none; exit code; the
    tail of its output)``. ``timeout`` bounds each rank's wait: a hang fails, it never blocks CI.
    """
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for rank, p in enumerate(procs):
        path = out / f"rank{rank}.json"
        results.append((json.loads(path.read_text()) if path.exists() else None, p.returncode, logs[rank][-3000:]))
    return results

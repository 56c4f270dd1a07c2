"""Smoke run of benchmarks/sim_scale.py (the scale model's simulation, docs/scale.md):
two rank processes stage into SeaweedFS, one coordinator combines and publishes, twice.
Behind --run-slow: it spawns rank processes (each imports torch)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch

from ckptvcs import Repo
from ckptvcs.backends.fsspec_backend import FsspecBackend
from s3server import S3Server, make_bucket

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sim_scale  # noqa: E402


@pytest.mark.slow  # ~25 s idle, minutes loaded: spawned rank processes each import torch
def test_two_ranks_stage_into_s3_and_one_coordinator_publishes(s3_server: S3Server) -> None:
    bucket = f"sim-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server, bucket)
    options = s3_server.storage_options()
    rows = sim_scale.simulate(options, bucket, ranks=2, saves=2, chunk_size=4096, nbytes=64 << 10, workers=2)
    first, second = rows
    assert first["chunks"] == second["chunks"] == 2 * 16  # 64 KiB per rank in 4 KiB chunks, every one listed
    assert first["rank_stage"]["put_by_top"]["packs"] == 2 * 2  # one sealed pack per rank, and its index object
    assert first["packs_new"] == second["packs_new"] == 2
    assert first["combine"]["put_by_top"]["objects"] == 1  # one combined manifest
    for row in rows:  # docs/scale.md's request model, exactly
        for phase, gets in row["model_gets"].items():
            assert row[phase]["requests"].get("GET", 0) == gets, (row["save"], phase)
    # every rank (each with its own host's cache) reads the other rank's index object only
    assert second["rank_open"]["requests"]["GET"] == 2 + 1 * 2 < second["before_gets"]["rank_open"]
    with Repo.open(backend=FsspecBackend(second["url"], **dict(options))) as repo:
        assert repo.resolve("HEAD") == second["commit"]
        assert repo.log()[0].parents == (first["commit"],)
        state = repo.load(second["commit"])
        for rank in range(2):
            assert torch.equal(state[f"rank{rank}"]["w"], sim_scale._shard(rank, 1, 64 << 10))

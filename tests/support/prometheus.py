"""Throwaway Prometheus and Pushgateway servers on loopback, and helpers for their HTTP APIs.

The binaries are Debian bookworm's ``prometheus`` (2.42, with ``promtool``)
and ``prometheus-pushgateway`` (1.5), installed by
scripts/install-prometheus.sh; ``find_binaries`` returns None when one is
missing so tests can skip. Each server runs in its own temporary directory,
bound to 127.0.0.1 on a free port:

- ``Pushgateway.start`` runs the gateway without persistence, so nothing
  survives the test.
- ``Prometheus.start`` writes a config that scrapes the given targets (the
  operator's metrics endpoint, the Pushgateway with ``honor_labels``, or any
  other loopback ``host:port``) every ``scrape_interval_seconds`` and loads
  the given rule files, then waits until the server is ready.

``query``, ``query_range``, ``alerts`` and ``wait_for`` wrap the HTTP API and
raise ``PrometheusError`` with the server's error text, so a bad PromQL
expression fails a test with the parser's message.

Not promised: anything beyond tests. There is no authentication, storage is
deleted on ``stop``, and ``stop`` kills only the process it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 5.0


class PrometheusError(RuntimeError):
    """An HTTP API call failed or returned status "error"."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    prometheus: Path
    promtool: Path
    pushgateway: Path


def find_binaries() -> Binaries | None:
    """Return the installed binaries, or None when any of them is not on PATH."""
    found = [shutil.which(name) for name in ("prometheus", "promtool", "prometheus-pushgateway")]
    if not all(found):
        return None
    return Binaries(*(Path(path) for path in found))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> bytes:
    """GET URL on loopback and return the body; raise PrometheusError with the body on HTTP errors."""
    if urllib.parse.urlsplit(url).hostname != "127.0.0.1":
        raise ValueError(f"GET {url} rejected: the test servers listen on 127.0.0.1 only")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")
        raise PrometheusError(f"GET {url} failed with HTTP {error.code}: {body}") from None


class _Server:
    """A child process bound to 127.0.0.1:port, with its log in a temporary directory."""

    name = "server"
    ready_path = "/-/ready"

    def __init__(self, *, binary: Path, directory: Path | None = None) -> None:
        self.binary = binary
        self._owned_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix=f"lethe-{self.name}-")) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.directory / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(self.binary), *self.arguments()], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.directory)
        logger.info("Started %s (pid %d) on %s, log %s", self.name, self.process.pid, self.address, self.log_path)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode} during startup; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                http_get(self.url + self.ready_path, timeout=1.0)
                return
            except (OSError, PrometheusError) as error:
                last_error = str(error)
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} on {self.address} was not ready after {STARTUP_TIMEOUT_SECONDS:.0f}s "
                           f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for 10s; killing it", self.name, self.process.pid)
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self._owned_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class Pushgateway(_Server):
    name = "pushgateway"

    def arguments(self) -> list[str]:
        # Debian's build defaults to a persistence file under /var/lib; an empty value turns it off.
        return [f"--web.listen-address={self.address}", "--persistence.file="]

    def metrics_text(self) -> str:
        """Return the gateway's /metrics exposition, which includes every pushed group."""
        return http_get(self.url + "/metrics").decode("utf-8")


@dataclasses.dataclass(frozen=True)
class ScrapeTarget:
    """One scrape job: loopback host:port addresses and whether to keep the scraped job/instance labels."""

    job: str
    addresses: Sequence[str]
    honor_labels: bool = False
    metrics_path: str = "/metrics"


class Prometheus(_Server):
    name = "prometheus"

    def __init__(self, *, binary: Path, targets: Iterable[ScrapeTarget], rule_files: Iterable[Path] = (),
                 scrape_interval_seconds: float = 1.0, directory: Path | None = None) -> None:
        super().__init__(binary=binary, directory=directory)
        self.targets = list(targets)
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.scrape_interval_seconds = scrape_interval_seconds
        for target in self.targets:
            for address in target.addresses:
                if not address.startswith("127.0.0.1:"):
                    raise ValueError(f"scrape target {address!r} of job {target.job!r} is not on 127.0.0.1")
        self.config_path = self.directory / "prometheus.yml"

    def config(self) -> dict[str, Any]:
        interval = f"{int(self.scrape_interval_seconds * 1000)}ms"
        jobs = []
        for target in self.targets:
            job: dict[str, Any] = {"job_name": target.job, "metrics_path": target.metrics_path,
                                   "static_configs": [{"targets": list(target.addresses)}]}
            if target.honor_labels:
                job["honor_labels"] = True
            jobs.append(job)
        return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                "rule_files": [str(path) for path in self.rule_files], "scrape_configs": jobs}

    def arguments(self) -> list[str]:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")
        return [f"--config.file={self.config_path}", f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address={self.address}"]

    # -- HTTP API ---------------------------------------------------------

    def api(self, path: str, **parameters: Any) -> Any:
        """Call GET /api/v1/PATH and return its ``data``; raise PrometheusError on an error status."""
        query = urllib.parse.urlencode({k: v for k, v in parameters.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            body = http_get(url)
        except PrometheusError as error:
            raise PrometheusError(f"{error} (parameters {parameters})") from None
        payload = json.loads(body)
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} with {parameters} failed: {payload.get('errorType')}: "
                                  f"{payload.get('error')}")
        return payload["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """Evaluate an instant query and return its result as a list (scalars become one sample)."""
        data = self.api("query", query=expression)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expression: str, *, seconds: float, step_seconds: float = 1.0) -> list[dict[str, Any]]:
        end = time.time()
        return self.api("query_range", query=expression, start=end - seconds, end=end, step=step_seconds)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, expression: str, *, until: Callable[[list[dict[str, Any]]], bool] = bool,
                 timeout_seconds: float = 20.0) -> list[dict[str, Any]]:
        """Poll EXPRESSION until UNTIL(result) is true and return the result; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_seconds
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expression)
            if until(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expression!r} did not reach the expected result within {timeout_seconds:.0f}s; "
                           f"last result {result}; targets {self._target_health()}")

    def wait_for_alert(self, name: str, *, state: str = "firing", timeout_seconds: float = 20.0) -> dict[str, Any]:
        """Poll the alerts API until alert NAME is in STATE and return it."""
        deadline = time.monotonic() + timeout_seconds
        alerts: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            alerts = self.alerts()
            for alert in alerts:
                if alert["labels"].get("alertname") == name and alert["state"] == state:
                    return alert
            time.sleep(0.25)
        raise TimeoutError(f"alert {name} was not {state} within {timeout_seconds:.0f}s; alerts now: "
                           f"{[(a['labels'].get('alertname'), a['state']) for a in alerts]}")

    def _target_health(self) -> list[tuple[str, str, str]]:
        with contextlib.suppress(Exception):
            return [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in self.active_targets()]
        return []


def sample_values(result: Sequence[Mapping[str, Any]]) -> list[float]:
    """Return the float values of an instant-query result."""
    return [float(series["value"][1]) for series in result]


def run_promtool(binaries: Binaries, *arguments: str, input_text: str | None = None,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run promtool with ARGUMENTS and return the completed process (output captured as text)."""
    return subprocess.run([str(binaries.promtool), *arguments], input=input_text, capture_output=True, text=True,
                          cwd=cwd, timeout=60)

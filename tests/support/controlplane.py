"""A real Kubernetes control plane on loopback, for tests and local development.

`ControlPlane` starts etcd, kube-apiserver and kube-controller-manager as child
processes on free 127.0.0.1 ports, in a fresh temporary directory that contains
their certificates, keys, logs and an admin kubeconfig. There is no kubelet
and no scheduler: Pods stay Pending unless something plays the node, which is
what `tests.support.fakenode.FakeNode` does.

The binaries come from `scripts/install-kube.sh`, which builds kube-apiserver
and kube-controller-manager v1.20.2 into ~/.cache/lethe (or $LETHE_CACHE) and
installs etcd from Debian. Set $LETHE_KUBE_BIN to a directory holding the two
Kubernetes binaries, or $LETHE_ETCD to an etcd binary, to use others.

Controllers that run: job, garbagecollector, namespace, serviceaccount and
serviceaccount-token. Authentication is a static admin token (group
system:masters) plus ServiceAccount tokens; authorization is RBAC.

Start one by hand:

    python -m tests.support.controlplane --hold

It prints an `export KUBECONFIG=...` line and runs until Ctrl-C.

Certificates are made with the openssl command-line tool.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

KUBE_VERSION = "1.20.2"
INSTALL_HINT = "run scripts/install-kube.sh to install it"
LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or is not usable."""


def cache_dir() -> Path:
    """Return the directory where scripts/install-kube.sh puts its builds and downloads."""
    return Path(os.environ.get("LETHE_CACHE", Path.home() / ".cache" / "lethe"))


def kube_bin_dir() -> Path:
    """Return the directory containing kube-apiserver and kube-controller-manager."""
    env = os.environ.get("LETHE_KUBE_BIN")
    if env:
        return Path(env)
    return cache_dir() / f"kube-{KUBE_VERSION}" / "bin"


def tools_bin_dir() -> Path:
    """Return the directory containing kubectl and helm from scripts/install-kube.sh."""
    return cache_dir() / "tools" / "bin"


def find_binary(name: str) -> Path:
    """Return the path of etcd, kube-apiserver, kube-controller-manager, kubectl or helm.

    Raises ControlPlaneError, naming the places searched, when it is missing.
    """
    if name == "etcd":
        candidates = [os.environ.get("LETHE_ETCD"), shutil.which("etcd")]
    elif name in ("kubectl", "helm"):
        candidates = [str(tools_bin_dir() / name)]
    else:
        candidates = [str(kube_bin_dir() / name)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    searched = ", ".join(c for c in candidates if c) or "PATH"
    raise ControlPlaneError(f"{name} not found (looked in: {searched}); {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the child gets SIGTERM when the thread that started it
    # exits, so a killed test run leaves no servers behind. Only used when the
    # main thread starts the control plane, since a worker thread that ends
    # early would take the servers with it.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneError(
            f"openssl {' '.join(args)} failed with exit code {result.returncode}:\n"
            f"{result.stderr.strip()}"
        )


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback.

    Use as a context manager, or call start() and stop(). After start(),
    `kubeconfig_path`, `server_url`, `ca_path` and `admin_token` describe how to
    reach the API server as cluster admin. `api_client()` builds a
    kubernetes.client.ApiClient, and `env()` returns an environment with
    KUBECONFIG set for subprocesses such as kubectl or the operator.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        keep_workdir: bool = False,
        start_timeout: float = 120.0,
    ) -> None:
        self._given_workdir = Path(workdir) if workdir else None
        self.keep_workdir = keep_workdir or workdir is not None
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.kubeconfig_path: Path | None = None
        self.ca_path: Path | None = None
        self.server_url: str | None = None
        self.admin_token: str | None = None
        self.etcd_url: str | None = None
        self._etcd_data: Path | None = None
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._atexit_registered = False

    # ----------------------------------------------------------------- public

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self._procs:
            raise ControlPlaneError("control plane already started")
        binaries = {
            name: find_binary(name)
            for name in ("etcd", "kube-apiserver", "kube-controller-manager")
        }
        if not shutil.which("openssl"):
            raise ControlPlaneError(
                "openssl not found on PATH; install Debian's openssl package"
            )
        if self._given_workdir:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._given_workdir
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="lethe-kube-"))
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._write_credentials()
            self._start_etcd(binaries["etcd"])
            self._start_apiserver(binaries["kube-apiserver"])
            self._start_controller_manager(binaries["kube-controller-manager"])
            self._wait_for_default_service_account()
        except BaseException as err:
            self._stop_processes()
            if isinstance(err, Exception):
                self.keep_workdir = True  # so its logs can be read
            raise
        return self

    def stop(self) -> None:
        """Stop the processes and remove the workdir unless keep_workdir is set."""
        self._stop_processes()
        if self._etcd_data and self._etcd_data.exists():
            shutil.rmtree(self._etcd_data, ignore_errors=True)
        if self.workdir and not self.keep_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def api_client(self) -> Any:
        """Build a kubernetes.client.ApiClient authenticated as cluster admin."""
        from kubernetes import client

        self._require_started()
        config = client.Configuration()
        config.host = self.server_url
        config.ssl_ca_cert = str(self.ca_path)
        config.api_key = {"authorization": f"Bearer {self.admin_token}"}
        return client.ApiClient(config)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Return `base` (default os.environ) with KUBECONFIG set to the admin
        kubeconfig and the cached kubectl and helm first on PATH."""
        self._require_started()
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig_path)
        env["PATH"] = os.pathsep.join([str(tools_bin_dir()), env.get("PATH", "")])
        return env

    def log_path(self, name: str) -> Path:
        """Return the log file of "etcd", "kube-apiserver" or "kube-controller-manager"."""
        self._require_started()
        return self.workdir / f"{name}.log"

    def check_alive(self) -> None:
        """Raise ControlPlaneError if one of the processes has exited."""
        for name, proc, log in self._procs:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode}; last lines of {log}:\n"
                    f"{tail(log)}"
                )

    # --------------------------------------------------------------- internal

    def _require_started(self) -> None:
        if self.kubeconfig_path is None or self.workdir is None:
            raise ControlPlaneError("control plane not started; call start() first")

    def _write_credentials(self) -> None:
        d = self.workdir
        assert d is not None
        (d / "pki").mkdir(exist_ok=True)
        pki = d / "pki"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-subj", "/CN=lethe-test-ca", "-keyout", "ca.key", "-out", "ca.crt",
            cwd=pki,
        )
        (pki / "apiserver.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
            "-keyout", "apiserver.key", "-out", "apiserver.csr",
            cwd=pki,
        )
        _openssl(
            "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "3650", "-extfile", "apiserver.ext",
            "-out", "apiserver.crt",
            cwd=pki,
        )
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        for key in ("ca.key", "apiserver.key", "sa.key"):
            (pki / key).chmod(0o600)

        self.ca_path = pki / "ca.crt"
        self.admin_token = secrets.token_hex(24)
        tokens = d / "tokens.csv"
        tokens.write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)

        port = free_port()
        self.server_url = f"https://127.0.0.1:{port}"
        self.kubeconfig_path = d / "kubeconfig"
        self.kubeconfig_path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "lethe-test",
                            "cluster": {
                                "server": self.server_url,
                                "certificate-authority": str(self.ca_path),
                            },
                        }
                    ],
                    "users": [{"name": "admin", "user": {"token": self.admin_token}}],
                    "contexts": [
                        {
                            "name": "lethe-test",
                            "context": {
                                "cluster": "lethe-test",
                                "user": "admin",
                                "namespace": "default",
                            },
                        }
                    ],
                    "current-context": "lethe-test",
                },
                indent=2,
            )
            + "\n"
        )
        self.kubeconfig_path.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(log, "ab") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Own session: Ctrl-C reaches only this process, which then
                # stops the servers in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if in_main_thread else None,
            )
        self._procs.append((name, proc, log))
        return proc

    def _fail(self, name: str, what: str) -> ControlPlaneError:
        log = self.workdir / f"{name}.log" if self.workdir else Path("?")
        return ControlPlaneError(
            f"{name} {what}; last lines of {log}:\n{tail(log)}\n"
            f"(all logs are in {self.workdir}, which is kept after this failure)"
        )

    def _wait(self, name: str, ready: Any, timeout: float | None = None) -> None:
        """Poll `ready()` until true; fail fast if any child process exits."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            for proc_name, proc, _ in self._procs:
                if proc.poll() is not None:
                    raise self._fail(proc_name, f"exited with code {proc.returncode}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._fail(
                    name, f"not ready after {timeout or self.start_timeout:.0f} s"
                )
            time.sleep(0.2)

    def _start_etcd(self, etcd: Path) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._etcd_data = self._etcd_data_dir()
        self._spawn(
            "etcd",
            [
                str(etcd),
                "--name=lethe",
                f"--data-dir={self._etcd_data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=lethe={peer_url}",
                "--log-level=warn",
                "--logger=zap",
            ],
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                    return json.load(resp).get("health") == "true"
            except (OSError, ValueError):
                return False

        self._wait("etcd", healthy)

    def _etcd_data_dir(self) -> Path:
        # etcd fsyncs every write. On tmpfs that is free, while on a busy disk
        # it slows every API write.
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):
            stat = os.statvfs(shm)
            if stat.f_bavail * stat.f_frsize > 1 << 30:
                return Path(tempfile.mkdtemp(prefix="lethe-etcd-", dir=shm))
        assert self.workdir is not None
        return self.workdir / "etcd-data"

    def _start_apiserver(self, apiserver: Path) -> None:
        d = self.workdir
        assert d is not None and self.server_url is not None
        pki = d / "pki"
        port = self.server_url.rsplit(":", 1)[1]
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={d / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.key'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--v=1",
            ],
        )
        self._wait("kube-apiserver", lambda: self._get("/readyz")[0] == 200)

    def _start_controller_manager(self, manager: Path) -> None:
        d = self.workdir
        assert d is not None
        pki = d / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(manager),
                f"--kubeconfig={self.kubeconfig_path}",
                "--controllers=job,garbagecollector,namespace,serviceaccount-token,serviceaccount",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--secure-port=0",
                "--port=0",
                "--leader-elect=false",
                "--v=1",
            ],
        )

    def _wait_for_default_service_account(self) -> None:
        # Pods can only be created once the ServiceAccount admission plugin
        # finds the namespace's default ServiceAccount and its token Secret.
        def ready() -> bool:
            status, body = self._get("/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200 and bool(body.get("secrets"))

        self._wait("kube-controller-manager", ready)

    def _get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET `path` as admin and return (status, parsed JSON body or {}).

        The status is 0 when the server cannot be reached."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        req = urllib.request.Request(
            f"{self.server_url}{path}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            return err.code, {}
        except (OSError, ssl.SSLError):
            return 0, {}
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {}

    def _stop_processes(self) -> None:
        # One at a time, clients first: an API server whose etcd is already
        # gone takes many seconds to give up.
        procs, self._procs = self._procs, []
        for _, proc, _ in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.controlplane",
        description="Start a loopback Kubernetes control plane (etcd, kube-apiserver, "
        "kube-controller-manager) for development.",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="keep it running until Ctrl-C (without it: start, print, stop)",
    )
    parser.add_argument(
        "--workdir",
        help="directory for certificates, logs and kubeconfig (kept on exit); "
        "default: a new temporary directory, removed on exit",
    )
    args = parser.parse_args(argv)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Also when started in the background, where SIGINT is ignored by default.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)

    started = time.monotonic()
    plane = ControlPlane(workdir=args.workdir)
    try:
        plane.start()
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        print(
            f"# control plane ready in {time.monotonic() - started:.1f} s; "
            f"logs in {plane.workdir}",
            file=sys.stderr,
        )
        print(f"export KUBECONFIG={plane.kubeconfig_path}")
        print(f'export PATH="{tools_bin_dir()}:$PATH"')
        sys.stdout.flush()
        if args.hold:
            print("# Ctrl-C stops it", file=sys.stderr)
            while True:
                plane.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

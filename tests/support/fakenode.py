"""A stand-in kubelet that runs Pods as local subprocesses.

The test control plane (tests/support/controlplane.py) has no kubelet and no
scheduler, so Pods created by the Job controller stay Pending. `FakeNode`
watches Pods in the namespaces it is given and, for each Pending Pod that is
not bound to another node:

1. binds it to the node's name through the pods/binding subresource (the
   node's Node object is created too, Ready, unless register_node=False);
2. runs the first container's `command` + `args` as a local subprocess, in its
   own session, with `$(VAR)` references expanded as the kubelet does. Its
   environment is this process's environment (PATH etc.) with the container's
   `envFrom` (secretRef, configMapRef) and `env` (value, secretKeyRef,
   configMapKeyRef, fieldRef) on top, read through the API. The directory of
   this interpreter is put first on PATH, so `python` is the test's Python;
3. writes Pod status Running, then, when the process exits, the terminated
   state with its exit code, reason and termination message, and phase
   Succeeded or Failed. The Job controller then decides Complete or Failed by
   its own rules. restartPolicy OnFailure and Always restart the process in
   place and count restarts, as the kubelet does.

Termination messages. A container writes its message to terminationMessagePath
(default /dev/termination-log), which on this machine is not per Pod. Each Pod
gets a private file instead. The node sets the environment variable
LETHE_TERMINATION_LOG to that file's path. It also replaces every occurrence
of the Pod's terminationMessagePath in the command, the args and the env
values with that path. A command that writes to "$LETHE_TERMINATION_LOG", or to the
path it was given on its command line or in its env, is thus caught. As on a
kubelet, at most 4096 bytes are kept, and with terminationMessagePolicy
FallbackToLogsOnError a failed container with an empty message gets the last
80 lines (2048 bytes) of its output.

Missing Secrets, ConfigMaps or keys that are not marked optional keep the Pod
Pending with the container waiting in CreateContainerConfigError, retried
every second, as on a kubelet.

Deletion. A Pod bound to a node is only removed from the API once its kubelet
confirms; this node does so. When a Pod it runs gets a deletionTimestamp, it
sends SIGTERM to the process group, SIGKILL after the grace period (capped by
max_grace_seconds), then deletes the Pod with grace period 0. With
kill_on_delete=False it lets the process finish first. A Pod deleted outright
(DELETED event) has its process killed at once.

What is not emulated: images (the command runs on this machine, in a per-Pod
directory unless the container's workingDir exists here), volumes, resource
limits, probes, init and sidecar containers (only the first container runs),
and the Pod IP (127.0.0.1 is reported).

Each run is recorded as a `PodRun` in `FakeNode.runs`, with its output in
`PodRun.log_path`.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

DEFAULT_NODE_NAME = "lethe-fake-node"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_ENV = "LETHE_TERMINATION_LOG"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


class KubeError(RuntimeError):
    """A request to the API server returned an error status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {body[:500]}")
        self.status = status


class _ConfigError(Exception):
    """The container's environment refers to something missing."""


class _Kube:
    """Plain-JSON requests through a kubernetes.client.ApiClient.

    Works on dicts exactly as the API server sends them, which sidesteps the
    generated models and their validation.
    """

    def __init__(self, api_client: Any) -> None:
        self.api = api_client

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
        timeout: Any = 30,
    ) -> Any:
        method, url, headers, body, _ = self.api.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        resp = self._send(method, path, body, **kwargs)
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise KubeError(method, path, resp.status, data.decode(errors="replace"))
        return json.loads(data) if data else {}

    def watch(
        self,
        path: str,
        resource_version: str,
        timeout_seconds: int,
        on_open: Callable[[Any], None] = lambda response: None,
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events as dicts.

        `on_open` receives the urllib3 response, so that another thread can end
        the stream with its shutdown()."""
        resp = self._send(
            "GET",
            path,
            query=[
                ("watch", "true"),
                ("resourceVersion", resource_version),
                ("timeoutSeconds", str(timeout_seconds)),
                ("allowWatchBookmarks", "true"),
            ],
            timeout=(10, timeout_seconds + 10),
        )
        if not 200 <= resp.status < 300:
            raise KubeError("GET", path, resp.status, resp.read().decode(errors="replace"))
        raw = resp.response
        on_open(raw)
        buf = b""
        try:
            for chunk in raw.stream(None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.release_conn()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Expand `$(VAR)` references as Kubernetes does.

    Defined names are replaced, undefined ones are left as written, and `$$`
    is a literal `$`."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(sub, value)


@dataclass
class PodRun:
    """Record of one Pod taken by the node. Times are time.time() values."""

    namespace: str
    name: str
    uid: str
    workdir: Path
    log_path: Path
    termination_path: Path
    command: list[str] = field(default_factory=list)
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    termination_message: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    deleted: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _kill_timer: threading.Timer | None = field(default=None, repr=False)

    def output(self) -> str:
        """Return what the process wrote to stdout and stderr."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class FakeNode:
    """Plays the kubelet for Pods in `namespaces` (all namespaces if None).

    `api_client` is a kubernetes.client.ApiClient with rights to bind Pods,
    write Pod status, delete Pods, read Secrets and ConfigMaps and create
    Nodes (ControlPlane.api_client() gives a cluster-admin one).
    """

    def __init__(
        self,
        api_client: Any,
        namespaces: Iterable[str] | None = None,
        node_name: str = DEFAULT_NODE_NAME,
        kill_on_delete: bool = True,
        max_grace_seconds: float = 10.0,
        workdir: str | os.PathLike[str] | None = None,
        register_node: bool = True,
        path_prepend: Iterable[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._kube = _Kube(api_client)
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.node_name = node_name
        self.kill_on_delete = kill_on_delete
        self.max_grace_seconds = max_grace_seconds
        self.register_node = register_node
        self.path_prepend = (
            list(path_prepend) if path_prepend is not None else [os.path.dirname(sys.executable)]
        )
        self.extra_env = dict(extra_env or {})
        self._given_workdir = Path(workdir) if workdir else None
        self.workdir: Path | None = None
        self.runs: dict[str, PodRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher: threading.Thread | None = None
        self._watch_response: Any = None
        self._synced = threading.Event()
        self.errors: list[str] = []

    # ----------------------------------------------------------------- public

    def __enter__(self) -> FakeNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeNode:
        if self._watcher is not None:
            raise RuntimeError(f"FakeNode {self.node_name} already started")
        if self._given_workdir:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._given_workdir
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.node_name}-"))
        if self.register_node:
            self._register_node()
        self._stop.clear()
        self._watcher = threading.Thread(
            target=self._watch_loop, name=f"fakenode-{self.node_name}", daemon=True
        )
        self._watcher.start()
        if not self._synced.wait(30):
            raise RuntimeError(
                f"FakeNode {self.node_name} could not list Pods within 30 s: "
                f"{self.errors[-1] if self.errors else 'no error recorded'}"
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching and kill every process still running.

        The Pods of killed processes keep the status last written (Running):
        nothing reports for them once the node is gone.
        """
        self._stop.set()
        response = self._watch_response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # already closed, or urllib3 older than 2.3
                pass
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            self._signal(run, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for thread in [self._watcher, *self._threads]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._watcher = None
        self._threads = []
        if self.workdir and not self._given_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def ran(self, namespace: str | None = None) -> list[PodRun]:
        """Return the runs so far, oldest first, optionally of one namespace."""
        with self._lock:
            runs = list(self.runs.values())
        runs = [r for r in runs if namespace is None or r.namespace == namespace]
        return sorted(runs, key=lambda r: r.started_at or float("inf"))

    def find(self, namespace: str, name: str) -> PodRun | None:
        """Return the run of Pod namespace/name, or None."""
        with self._lock:
            for run in self.runs.values():
                if run.namespace == namespace and run.name == name:
                    return run
        return None

    def wait_for_run(
        self,
        predicate: Callable[[PodRun], bool] = lambda run: True,
        timeout: float = 60.0,
        finished: bool = False,
    ) -> PodRun:
        """Wait for and return the first run matching `predicate`.

        With finished=True, the run's process must also have ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self.ran():
                if predicate(run) and (not finished or run.finished.is_set()):
                    return run
            time.sleep(0.1)
        raise TimeoutError(
            f"no {'finished ' if finished else ''}matching Pod run on {self.node_name} "
            f"within {timeout:.0f} s; runs: {[(r.namespace, r.name, r.exit_code) for r in self.ran()]}; "
            f"errors: {self.errors[-5:]}"
        )

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a running Pod's process group, as an OOM kill or a crash
        would. The Pod then ends with exit code 128 + sig."""
        run = self.find(namespace, name)
        if run is None:
            raise KeyError(f"no Pod {namespace}/{name} has run on {self.node_name}")
        self._signal(run, sig)

    # ---------------------------------------------------------------- watcher

    def _watched(self, pod: dict[str, Any]) -> bool:
        ns = pod["metadata"].get("namespace")
        return self.namespaces is None or ns in self.namespaces

    def _list_path(self) -> str:
        if self.namespaces is not None and len(self.namespaces) == 1:
            return f"/api/v1/namespaces/{next(iter(self.namespaces))}/pods"
        return "/api/v1/pods"

    def _watch_loop(self) -> None:
        path = self._list_path()
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listing = self._kube.request("GET", path)
                    resource_version = listing["metadata"]["resourceVersion"]
                    for pod in listing.get("items", []):
                        self._on_event("ADDED", pod)
                    self._synced.set()
                events = self._kube.watch(
                    path, resource_version, timeout_seconds=30, on_open=self._set_watch_response
                )
                for event in events:
                    kind, obj = event.get("type"), event.get("object", {})
                    if kind == "ERROR":
                        # Usually 410 Gone, meaning the resource version is
                        # too old, so list again.
                        resource_version = None
                        break
                    resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_event(kind, obj)
                    if self._stop.is_set():
                        break
            except Exception as err:  # keep watching through API errors
                if self._stop.is_set():
                    break
                if isinstance(err, KubeError) and err.status == 410:
                    resource_version = None
                self._record_error(f"watching {path}: {err!r}")
                self._stop.wait(0.5)

    def _set_watch_response(self, response: Any) -> None:
        self._watch_response = response
        if self._stop.is_set():
            response.shutdown()

    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        if self._stop.is_set() or not self._watched(pod):
            return
        meta, spec = pod["metadata"], pod.get("spec", {})
        uid = meta["uid"]
        with self._lock:
            run = self.runs.get(uid)
        if kind == "DELETED":
            if run is not None:
                run.deleted = True
                self._signal(run, signal.SIGKILL)
            return
        if meta.get("deletionTimestamp"):
            if run is not None:
                self._on_deleting(run, pod)
            elif spec.get("nodeName") == self.node_name:
                # Bound here earlier (by an earlier node of this name) and
                # never run by this one: only the confirmation is missing.
                self._force_delete(meta["namespace"], meta["name"], uid)
            return
        if run is not None:
            return
        if spec.get("nodeName") not in (None, "", self.node_name):
            return
        if pod.get("status", {}).get("phase", "Pending") != "Pending":
            return
        self._claim(pod)

    def _claim(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        assert self.workdir is not None
        pod_dir = self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            workdir=pod_dir,
            log_path=pod_dir / "output.log",
            termination_path=pod_dir / "termination-log",
        )
        with self._lock:
            self.runs[run.uid] = run
        thread = threading.Thread(
            target=self._run_pod, args=(run, pod), name=f"pod-{run.name}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    # ------------------------------------------------------------ running pod

    def _run_pod(self, run: PodRun, pod: dict[str, Any]) -> None:
        try:
            self._run_pod_inner(run, pod)
        except Exception as err:
            if not self._stop.is_set():
                self._record_error(f"running {run.namespace}/{run.name}: {err!r}")
        finally:
            run.finished_at = run.finished_at or time.time()
            if run._kill_timer:
                run._kill_timer.cancel()
            run.finished.set()
            if run.deleted and not self._stop.is_set():
                self._force_delete(run.namespace, run.name, run.uid)

    def _run_pod_inner(self, run: PodRun, pod: dict[str, Any]) -> None:
        if not pod["spec"].get("nodeName"):
            self._bind(run)
        container = pod["spec"]["containers"][0]
        policy = pod["spec"].get("restartPolicy", "Always")

        env = self._wait_for_env(run, pod, container)
        if env is None:
            return
        term_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        container_env = {k: v.replace(term_path, str(run.termination_path)) for k, v in env.items()}
        argv = [
            expand(a, container_env).replace(term_path, str(run.termination_path))
            for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        run.command = argv

        proc_env = dict(os.environ)
        if self.path_prepend:
            proc_env["PATH"] = os.pathsep.join([*self.path_prepend, proc_env.get("PATH", "")])
        proc_env.update(self.extra_env)
        proc_env.update(container_env)
        proc_env[TERMINATION_ENV] = str(run.termination_path)

        working_dir = container.get("workingDir")
        cwd = working_dir if working_dir and os.path.isdir(working_dir) else str(run.workdir)
        last_state: dict[str, Any] = {}
        pod_start = _now()
        while True:
            run.termination_path.write_bytes(b"")
            started = _now()
            run.started_at = run.started_at or time.time()
            if not argv:
                code, reason, message = 128, "StartError", (
                    "the fake node only runs containers that set command (it has no "
                    "images, so no image entrypoint)"
                )
            else:
                with open(run.log_path, "ab") as out:
                    try:
                        proc = subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            env=proc_env,
                            cwd=cwd,
                            start_new_session=True,
                        )
                    except OSError as err:
                        proc = None
                        code, reason, message = 128, "StartError", f"{argv[0]}: {err}"
                if proc is not None:
                    run._proc, run.pid = proc, proc.pid
                    if run.deleted:
                        self._signal(run, signal.SIGKILL)
                    self._write_running(run, pod, container, started, pod_start, last_state)
                    returncode = proc.wait()
                    code = returncode if returncode >= 0 else 128 - returncode
                    reason = "Completed" if code == 0 else "Error"
                    message = self._termination_message(run, container, code)
            run.exit_code, run.termination_message = code, message
            finished = _now()
            if run.deleted or self._stop.is_set():
                return
            terminated = {
                "exitCode": code,
                "reason": reason,
                "message": message,
                "startedAt": started,
                "finishedAt": finished,
                "containerID": f"fake://{run.pid or 0}",
            }
            if not message:
                del terminated["message"]
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if restart:
                run.restarts += 1
                last_state = {"terminated": terminated}
                self._stop.wait(min(10.0, 0.5 * 2 ** (run.restarts - 1)))
                if run.deleted or self._stop.is_set():
                    return
                continue
            run.finished_at = time.time()
            self._write_terminated(run, pod, container, terminated, pod_start, last_state)
            return

    def _termination_message(self, run: PodRun, container: dict[str, Any], code: int) -> str:
        try:
            message = run.termination_path.read_bytes()[:MAX_MESSAGE_BYTES].decode(errors="replace")
        except FileNotFoundError:
            message = ""
        if (
            not message
            and code != 0
            and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            lines = run.output().splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines)[-FALLBACK_LOG_BYTES:]
        return message

    def _wait_for_env(
        self, run: PodRun, pod: dict[str, Any], container: dict[str, Any]
    ) -> dict[str, str] | None:
        """Return the container's env, or None if the Pod went away first.

        While a reference is missing, report CreateContainerConfigError and retry."""
        reported = None
        while not (self._stop.is_set() or run.deleted):
            try:
                return self._container_env(pod, container)
            except _ConfigError as err:
                if str(err) != reported:
                    reported = str(err)
                    self._patch_status(run, {
                        "phase": "Pending",
                        "conditions": [
                            {"type": "PodScheduled", "status": "True"},
                            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                        ],
                        "containerStatuses": [{
                            "name": container["name"],
                            "image": container.get("image", ""),
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "started": False,
                            "state": {"waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": reported,
                            }},
                        }],
                    })
                self._stop.wait(1.0)
        return None

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = self._secret_data(ns, ref["name"], ref.get("optional", False))
            elif "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._config_map_data(ns, ref["name"], ref.get("optional", False))
            else:
                continue
            for key, value in (data or {}).items():
                env[prefix + key] = value
        for var in container.get("env") or []:
            name = var["name"]
            source = var.get("valueFrom")
            if source is None:
                env[name] = expand(var.get("value", ""), env)
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = self._key(ns, "Secret", ref, self._secret_data)
                if value is not None:
                    env[name] = value
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = self._key(ns, "ConfigMap", ref, self._config_map_data)
                if value is not None:
                    env[name] = value
            elif "fieldRef" in source:
                env[name] = self._field(pod, source["fieldRef"]["fieldPath"])
        return env

    def _key(
        self, ns: str, kind: str, ref: dict[str, Any], read: Callable[..., dict[str, str] | None]
    ) -> str | None:
        optional = ref.get("optional", False)
        data = read(ns, ref["name"], optional)
        if data is None:
            return None
        if ref["key"] not in data:
            if optional:
                return None
            raise _ConfigError(f'couldn\'t find key {ref["key"]} in {kind} {ns}/{ref["name"]}')
        return data[ref["key"]]

    def _secret_data(self, ns: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self._read_optional(f"/api/v1/namespaces/{ns}/secrets/{name}", "secret", ns, name, optional)
        if obj is None:
            return None
        return {
            k: base64.b64decode(v).decode("utf-8", errors="replace")
            for k, v in (obj.get("data") or {}).items()
        }

    def _config_map_data(self, ns: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self._read_optional(f"/api/v1/namespaces/{ns}/configmaps/{name}", "configmap", ns, name, optional)
        if obj is None:
            return None
        return dict(obj.get("data") or {})

    def _read_optional(
        self, path: str, kind: str, ns: str, name: str, optional: bool
    ) -> dict[str, Any] | None:
        try:
            return self._kube.request("GET", path)
        except KubeError as err:
            if err.status != 404:
                raise
            if optional:
                return None
            raise _ConfigError(f'{kind} "{name}" not found') from None

    def _field(self, pod: dict[str, Any], path: str) -> str:
        meta = pod["metadata"]
        simple = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2), "")
        raise _ConfigError(f"the fake node does not support fieldRef {path!r}")

    # ---------------------------------------------------------- API updates

    def _register_node(self) -> None:
        path = "/api/v1/nodes"
        try:
            self._kube.request("POST", path, {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": self.node_name, "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "lethe.dev/fake-node": "true",
                }},
            })
        except KubeError as err:
            if err.status != 409:
                raise
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": "110"}
        self._kube.request(
            "PATCH",
            f"{path}/{self.node_name}/status",
            {"status": {
                "capacity": capacity,
                "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "fake node for tests",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                }],
            }},
            content_type="application/strategic-merge-patch+json",
        )

    def _bind(self, run: PodRun) -> None:
        self._kube.request(
            "POST",
            f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/binding",
            {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": run.name, "uid": run.uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
            },
        )

    def _patch_status(self, run: PodRun, status: dict[str, Any]) -> None:
        # Merge patch replaces lists whole, so every write sends complete lists.
        try:
            self._kube.request(
                "PATCH",
                f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status",
                {"metadata": {"uid": run.uid}, "status": status},
                content_type="application/merge-patch+json",
            )
        except KubeError as err:
            if err.status in (404, 409) or run.deleted:
                return  # the Pod is gone or was replaced
            raise

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        now = _now()
        conditions = []
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
            status = "True" if ready or kind in ("PodScheduled", "Initialized") else "False"
            cond = {"type": kind, "status": status, "lastTransitionTime": now}
            if status == "False" and reason:
                cond["reason"] = reason
            conditions.append(cond)
        return conditions

    def _container_status(
        self, run: PodRun, container: dict[str, Any], state: dict[str, Any], last: dict[str, Any]
    ) -> dict[str, Any]:
        running = "running" in state
        status = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"fake://{run.pid or 0}",
            "ready": running,
            "started": running,
            "restartCount": run.restarts,
            "state": state,
        }
        if last:
            status["lastState"] = last
        return status

    def _write_running(
        self,
        run: PodRun,
        pod: dict[str, Any],
        container: dict[str, Any],
        started: str,
        pod_start: str,
        last: dict[str, Any],
    ) -> None:
        self._patch_status(run, {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": pod_start,
            "conditions": self._conditions(ready=True),
            "containerStatuses": [
                self._container_status(run, container, {"running": {"startedAt": started}}, last)
            ],
        })

    def _write_terminated(
        self,
        run: PodRun,
        pod: dict[str, Any],
        container: dict[str, Any],
        terminated: dict[str, Any],
        pod_start: str,
        last: dict[str, Any],
    ) -> None:
        code = terminated["exitCode"]
        self._patch_status(run, {
            "phase": "Succeeded" if code == 0 else "Failed",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": pod_start,
            "conditions": self._conditions(ready=False, reason="PodCompleted"),
            "containerStatuses": [
                self._container_status(run, container, {"terminated": terminated}, last)
            ],
        })

    # --------------------------------------------------------------- deletion

    def _on_deleting(self, run: PodRun, pod: dict[str, Any]) -> None:
        if run.deleted:
            return
        run.deleted = True
        if run.finished.is_set():
            self._force_delete(run.namespace, run.name, run.uid)
            return
        if not self.kill_on_delete:
            return  # _run_pod confirms the deletion when the process ends
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        grace = min(float(grace if grace is not None else 30), self.max_grace_seconds)
        self._signal(run, signal.SIGTERM)
        timer = threading.Timer(grace, self._signal, args=(run, signal.SIGKILL))
        timer.daemon = True
        run._kill_timer = timer
        timer.start()

    def _signal(self, run: PodRun, sig: int) -> None:
        proc = run._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        try:
            self._kube.request(
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": uid},
                },
            )
        except KubeError as err:
            if err.status not in (404, 409):
                self._record_error(f"deleting {namespace}/{name}: {err}")

    def _record_error(self, message: str) -> None:
        log.warning("%s", message)
        with self._lock:
            self.errors.append(message)
            del self.errors[:-100]

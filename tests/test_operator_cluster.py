"""The operator against the loopback control plane, with Jobs run by the fake node.

The operator runs as a subprocess (``lethe-operator``), as it would in its
Deployment, so a test can kill it with SIGKILL and start it again. Each test
gets its own namespace, a file:// store in a temporary directory and the
tiny random Llama model from tests/support/tiny_model.py.

One test runs the real ``lethe-trainer`` end to end. The others test the
operator's own behaviour: gating, restarts, deletion, failures and collapse.
The trainer is not the point there, so their Jobs run a stand-in trainer
(``STAND_IN_TRAINER`` below). It commits a step with fixed figures through
the real store code, and the request's spec.job.env selects its behaviour.

The apply-to-Job latency (creating a request on an idle lineage until its
Job exists) is printed, not asserted; run with ``-s`` to see it.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from kubernetes import client

from lethe_trainer.store import open_lineage_store
from tests.support.controlplane import ControlPlane, find_binary, free_port
from tests.support.fakenode import FakeNode

pytest_plugins = ["tests.support.fixtures"]
pytestmark = pytest.mark.cluster

GROUP, VERSION = "lethe.dev", "v1alpha1"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

STAND_IN_TRAINER = textwrap.dedent('''
    """A stand-in for lethe-trainer: commits steps with fixed figures through the real store code.

    FAKE_TRAINER_MODE: ok (default), fail (exit 1 with a message) or collapse
    (commit a step whose perplexity trips the collapse guard).
    FAKE_TRAINER_SECONDS: how long a step takes (default 0.2).
    """
    import argparse, json, os, sys, time
    from lethe_trainer.store import open_lineage_store

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    for option in ("--lineage", "--request", "--store", "--step-id", "--sequence", "--parent-step-id"):
        parser.add_argument(option)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    def terminate(summary):
        with open(os.environ["LETHE_TERMINATION_LOG"], "w") as handle:
            json.dump(summary, handle)

    lineage = json.loads(args.lineage)
    store = open_lineage_store(args.store, namespace=lineage["metadata"]["namespace"],
                               lineage=lineage["metadata"]["name"], create=True)
    if args.command == "init":
        if store.read_base() is None:
            checkpoint = store.put_object(b"theta_0 of " + args.lineage.encode(), suffix=".safetensors")
            store.write_base({"objects": {"checkpoint": checkpoint.to_dict()}, "created": "stand-in",
                              "figures": {"retain": {"rougeL": {"mean": 0.5}}, "held_out": {"perplexity": 10.0}}})
        terminate({"result": "Initialised"})
        sys.exit(0)

    request = json.loads(args.request)
    mode = os.environ.get("FAKE_TRAINER_MODE", "ok")
    time.sleep(float(os.environ.get("FAKE_TRAINER_SECONDS", "0.2")))
    if mode == "fail":
        terminate({"result": "Failed", "message": "RuntimeError: stand-in trainer failed on purpose"})
        sys.exit(1)
    vector = store.put_object(("task vector of " + args.step_id).encode(), suffix=".safetensors")
    def scores(value):
        return {"rouge1": {"mean": value}, "rougeL": {"mean": value}}
    store.commit_step(args.step_id, {
        "step_id": args.step_id, "sequence": int(args.sequence), "parent_step_id": args.parent_step_id,
        "request": {"namespace": request["metadata"]["namespace"], "name": request["metadata"]["name"]},
        "method": {"name": "SSU", "negation_scale": 1.0},
        "inputs": {"forget": {"uri": request["spec"]["forget"]["uri"]}},
        "objects": {"task_vector": vector.to_dict()},
        "figures": {"forget": scores(0.1), "retain": scores(0.5),
                    "held_out": {"perplexity": 1000.0 if mode == "collapse" else 11.0}},
    })
    terminate({"result": "Committed", "stepId": args.step_id})
''')

# Evaluation small enough that the tiny model's init and steps take seconds.
TINY_EVALUATION = {"forgetChunks": 2, "retainChunks": 2, "previousChunks": 2, "maxNewTokens": 8,
                   "perplexityTokens": 64, "promptTokens": 16, "continuationTokens": 16, "bootstrapSamples": 100}


# ---------------------------------------------------------------------------
# Helpers


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll PROBE until it returns a truthy value, and return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


class Cluster:
    """Thin access to the test namespace's Lethe resources and Jobs."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def lineage(self, name: str) -> dict[str, Any]:
        return self.get("modellineages", name) or {}

    def request(self, name: str) -> dict[str, Any]:
        return self.get("unlearnrequests", name) or {}

    def request_status(self, name: str) -> dict[str, Any]:
        return self.request(name).get("status") or {}

    def lineage_status(self, name: str) -> dict[str, Any]:
        return self.lineage(name).get("status") or {}

    def jobs(self, selector: str) -> list[Any]:
        return self.batch.list_namespaced_job(self.namespace, label_selector=selector).items

    def request_jobs(self, request: str) -> list[Any]:
        return self.jobs(f"lethe.dev/request={request}")

    def wait_phase(self, request: str, phases: tuple[str, ...], timeout: float = 60.0) -> dict[str, Any]:
        return wait_for(f"request {request} to reach {phases}",
                        lambda: (s := self.request_status(request)).get("phase") in phases and s, timeout)

    def condition(self, status: dict[str, Any], kind: str) -> dict[str, Any]:
        return next((c for c in status.get("conditions") or () if c["type"] == kind), {})


# The rights the operator needs in a namespace it watches; the stand-in tests run it with only these.
OPERATOR_RULES = [
    {"apiGroups": ["lethe.dev"], "resources": ["modellineages", "unlearnrequests"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["lethe.dev"], "resources": ["modellineages/status", "unlearnrequests/status"], "verbs": ["patch"]},
    {"apiGroups": ["lethe.dev"], "resources": ["modellineages/finalizers", "unlearnrequests/finalizers"],
     "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


def service_account_kubeconfig(*, control_plane: ControlPlane, api: client.ApiClient, namespace: str,
                               path: Path) -> Path:
    """Create a ServiceAccount bound to OPERATOR_RULES in NAMESPACE and write a kubeconfig that uses its token."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "lethe-operator"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "lethe-operator"}, "rules": OPERATOR_RULES})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "lethe-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lethe-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "lethe-operator", "namespace": namespace}]})
    secret = wait_for("the ServiceAccount's token Secret", lambda: (
        core.read_namespaced_service_account("lethe-operator", namespace).secrets or [None])[0])
    token = core.read_namespaced_secret(secret.name, namespace).data["token"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "test", "cluster": {"server": control_plane.server_url,
                                                  "certificate-authority": str(control_plane.ca_path)}}],
        "users": [{"name": "operator", "user": {"token": base64.b64decode(token).decode()}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator",
                                                      "namespace": namespace}}],
    }))
    return path


class OperatorProcess:
    """``lethe-operator`` as a subprocess watching one namespace."""

    def __init__(self, *, control_plane: ControlPlane, namespace: str, store_uri: str, log_dir: Path,
                 trainer_command: list[str] | None, kubeconfig: Path | None = None) -> None:
        self.control_plane = control_plane
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.store_uri = store_uri
        self.log_dir = log_dir
        self.trainer_command = trainer_command
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.starts = 0

    def start(self) -> None:
        liveness_port = free_port()
        command = [str(BIN / "lethe-operator"), "--namespace", self.namespace, "--store", self.store_uri,
                   "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1",
                   "--liveness", f"http://127.0.0.1:{liveness_port}/healthz", "--init-gpus", "0",
                   "--trainer-image", "lethe-trainer:test"]
        if self.trainer_command:
            command += ["--trainer-command", json.dumps(self.trainer_command)]
        environment = self.control_plane.env()
        environment["LETHE_RETRY_SECONDS"] = "0.5"
        if self.kubeconfig is not None:
            environment["KUBECONFIG"] = str(self.kubeconfig)
        self.starts += 1
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")
        self.process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def alive() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"lethe-operator exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=1) as response:
                    return response.status == 200
            except (OSError, urllib.error.URLError):
                return False

        wait_for("the operator's liveness endpoint", alive, timeout=60)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-6000:] for path in sorted(self.log_dir.glob("operator-*.log")))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Return the value of the sample NAME{LABELS} in Prometheus text, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def lineage_body(name: str, *, works: Path, model: Path, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelLineage", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": f"file://{model}"},
                     "retain": {"works": [{"uri": f"file://{works / 'retain.txt'}"}]},
                     "heldOut": {"uri": f"file://{works / 'held-out.txt'}"},
                     "evaluation": TINY_EVALUATION,
                     "collapseGuard": {"maxPerplexityRatio": 50.0, "minRetainRougeFraction": 0.0},
                     **spec}}


def request_body(name: str, *, lineage: str, work: str, mode: str = "ok", seconds: float = 0.2,
                 **spec: Any) -> dict[str, Any]:
    job = {"gpus": 0, "backoffLimit": 0,
           "env": [{"name": "FAKE_TRAINER_MODE", "value": mode},
                   {"name": "FAKE_TRAINER_SECONDS", "value": str(seconds)}]}
    job.update(spec.pop("job", {}))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "UnlearnRequest", "metadata": {"name": name},
            "spec": {"lineageRef": {"name": lineage}, "forget": {"uri": work},
                     "method": {"maxChunks": 2, "epochs": 1}, "job": job, **spec}}


def time_to_job(cluster: Cluster, body: dict[str, Any]) -> float:
    """Create a request and return the seconds until its Job exists."""
    started = time.monotonic()
    cluster.create("unlearnrequests", body)
    wait_for(f"a Job for {body['metadata']['name']}", lambda: cluster.request_jobs(body["metadata"]["name"]),
             timeout=30, interval=0.02)
    latency = time.monotonic() - started
    print(f"\napply-to-Job latency for {body['metadata']['name']} on an idle lineage: {latency:.3f} s")
    return latency


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane, kube_api: Any) -> None:
    """Install the CRDs with kubectl, as a user would (--validate=false: the 1.20 server knows no CEL)."""
    result = subprocess.run([str(find_binary("kubectl")), "apply", "--validate=false", "-f", str(ROOT / "crds")],
                            env=control_plane.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    custom = client.CustomObjectsApi(kube_api)

    def served() -> bool:
        try:
            custom.list_namespaced_custom_object(GROUP, VERSION, "default", "unlearnrequests")
            custom.list_namespaced_custom_object(GROUP, VERSION, "default", "modellineages")
        except client.ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    wait_for("the Lethe CRDs to be served", served)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Return (model directory, works directory): the tiny model and a few KB of text per work."""
    from tests.support.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("operator-inputs")
    model = make_tiny_model(root / "model")
    works = root / "works"
    works.mkdir()
    words = ("the river ran past seven quiet hills where an old lantern maker sang about copper bells "
             "winter orchards and a ferry that never left the northern shore").split()
    for index, name in enumerate(["book-1", "book-2", "book-3", "book-4", "retain", "held-out"]):
        generator = random.Random(index)
        (works / f"{name}.txt").write_text(" ".join(generator.choice(words) for _ in range(700)) + "\n")
    return model, works


@pytest.fixture
def cluster(kube_api: Any, namespace: str, crds: None) -> Cluster:
    return Cluster(kube_api, namespace)


@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "stand_in_trainer.py"
    script.write_text(STAND_IN_TRAINER)
    return [sys.executable, str(script)]


def _operator(control_plane, namespace, store_uri, tmp_path, trainer_command, kubeconfig=None):
    process = OperatorProcess(control_plane=control_plane, namespace=namespace, store_uri=store_uri,
                              log_dir=tmp_path, trainer_command=trainer_command, kubeconfig=kubeconfig)
    process.start()
    return process


@pytest.fixture
def operator(control_plane, kube_api, namespace, store_uri, tmp_path, stand_in, fake_node, crds):
    """The operator with the stand-in trainer, running as a ServiceAccount limited to OPERATOR_RULES."""
    kubeconfig = service_account_kubeconfig(control_plane=control_plane, api=kube_api, namespace=namespace,
                                            path=tmp_path / "operator-kubeconfig")
    process = _operator(control_plane, namespace, store_uri, tmp_path, stand_in, kubeconfig)
    yield process
    process.stop()
    log = process.log()
    assert "forbidden" not in log.lower(), log


@pytest.fixture
def real_operator(control_plane, namespace, store_uri, tmp_path, fake_node, crds):
    """The operator with the real lethe-trainer (found on the fake node's PATH, this venv's bin)."""
    process = _operator(control_plane, namespace, store_uri, tmp_path, None)
    yield process
    process.stop()


def store_of(store_uri: str, namespace: str, lineage: str):
    return open_lineage_store(store_uri, namespace=namespace, lineage=lineage)


# ---------------------------------------------------------------------------
# Tests


def test_real_trainer_runs_lineages_in_order(cluster: Cluster, real_operator: OperatorProcess, inputs, store_uri,
                                             control_plane: ControlPlane) -> None:
    model, works = inputs
    ns = cluster.namespace
    cluster.create("modellineages", lineage_body("alpha", works=works, model=model))
    cluster.create("modellineages", lineage_body("beta", works=works, model=model))
    names = ["a1-first", "a2-second", "a3-third"]
    for index, name in enumerate(names, start=1):
        body = request_body(name, lineage="alpha", work=f"file://{works / f'book-{index}.txt'}")
        del body["spec"]["job"]["env"]
        cluster.create("unlearnrequests", body)
    beta = request_body("b1-only", lineage="beta", work=f"file://{works / 'book-4.txt'}")
    del beta["spec"]["job"]["env"]
    cluster.create("unlearnrequests", beta)

    # Watch the gate while the requests run: alpha never has two step Jobs unfinished at once.
    deadline = time.monotonic() + 180
    most_active = 0
    while time.monotonic() < deadline:
        jobs = cluster.jobs("lethe.dev/lineage=alpha,lethe.dev/role=step")
        unfinished = [j for j in jobs if not (j.status and (j.status.succeeded or j.status.failed))]
        most_active = max(most_active, len(unfinished))
        phases = [cluster.request_status(n).get("phase") for n in names + ["b1-only"]]
        if all(phase in ("Succeeded", "Failed") for phase in phases):
            break
        time.sleep(0.3)
    statuses = {n: cluster.request_status(n) for n in names + ["b1-only"]}
    assert all(s.get("phase") == "Succeeded" for s in statuses.values()), (statuses, real_operator.log())
    assert most_active == 1

    # Each alpha Job was created only after the previous request succeeded.
    for previous, current in zip(names, names[1:]):
        job = cluster.request_jobs(current)[0]
        finished = statuses[previous]["completionTime"]
        assert job.metadata.creation_timestamp.strftime("%Y-%m-%dT%H:%M:%SZ") >= finished, (current, previous)
    # beta did not wait for alpha: it was admitted before alpha's first request finished.
    assert statuses["b1-only"]["admittedAt"] <= statuses["a1-first"]["completionTime"]

    # The lineage history lists the three works in order, and the store agrees.
    lineage = cluster.lineage_status("alpha")
    history = lineage["history"]
    assert [h["request"] for h in history] == names
    assert [h["sequence"] for h in history] == [1, 2, 3]
    assert [h["forgetUri"] for h in history] == [f"file://{works / f'book-{i}.txt'}" for i in (1, 2, 3)]
    assert lineage["head"]["stepId"] == "0003-a3-third"
    assert lineage["head"]["sequence"] == 3
    assert lineage["phase"] == "Ready"
    store = store_of(store_uri, ns, "alpha")
    assert store.head()["step_id"] == "0003-a3-third"
    assert [m["request"]["name"] for m in store.chain("0003-a3-third")] == names
    for entry, manifest in zip(history, store.chain("0003-a3-third")):
        assert entry["taskVectorSha256"] == manifest["objects"]["task_vector"]["sha256"]
    assert statuses["a3-third"]["figures"]["forgetRougeL"] >= 0.0
    assert store_of(store_uri, ns, "beta").head()["step_id"] == "0001-b1-only"

    # Printer columns and metrics.
    table = subprocess.run([str(find_binary("kubectl")), "get", "ur", "-n", ns], env=control_plane.env(),
                           capture_output=True, text=True, timeout=30)
    assert table.stdout.split("\n")[0].split() == ["NAME", "LINEAGE", "SEQ", "PHASE", "FORGET-ROUGEL", "AGE"]
    text = real_operator.metrics()
    assert metric_value(text, "lethe_head_sequence", namespace=ns, lineage="alpha") == 3.0
    assert metric_value(text, "lethe_requests", namespace=ns, lineage="alpha", phase="Succeeded") == 3.0
    assert metric_value(text, "lethe_lineage_active", namespace=ns, lineage="alpha") == 0.0
    assert metric_value(text, "lethe_build_info", version="0.1.0") == 1.0


@pytest.mark.parametrize("case, change, field", [
    ("wrong type", {"method": {"epochs": "one"}}, "spec.method.epochs"),
    ("out of range", {"job": {"backoffLimit": 50}}, "spec.job.backoffLimit"),
    ("bad enum", {"method": {"name": "Magic"}}, "spec.method.name"),
    ("bad uri", {"forget": {"uri": "ftp://example/book.txt"}}, "spec.forget.uri"),
    ("missing lineage", {"lineageRef": None}, "spec.lineageRef"),
])
def test_api_server_rejects_invalid_request(cluster: Cluster, control_plane: ControlPlane, case, change, field):
    body = request_body("bad", lineage="alpha", work="demo:sherlock-holmes")
    for key, value in change.items():
        if value is None:
            del body["spec"][key]
        else:
            body["spec"][key] = value

    with pytest.raises(client.ApiException) as raised:
        cluster.create("unlearnrequests", body)
    assert raised.value.status == 422
    assert field in raised.value.body

    manifest = json.dumps(dict(body, metadata={"name": "bad", "namespace": cluster.namespace}))
    result = subprocess.run([str(find_binary("kubectl")), "apply", "--validate=false", "-f", "-"], input=manifest,
                            env=control_plane.env(), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "is invalid" in result.stderr
    assert cluster.get("unlearnrequests", "bad") is None


def test_api_server_rejects_invalid_lineage(cluster: Cluster):
    body = lineage_body("bad", works=Path("/w"), model=Path("/m"), onFailure="Retry")
    body["spec"]["collapseGuard"] = {"minAccuracyFraction": 2}
    with pytest.raises(client.ApiException) as raised:
        cluster.create("modellineages", body)
    assert raised.value.status == 422
    assert "spec.onFailure" in raised.value.body
    assert "spec.collapseGuard.minAccuracyFraction" in raised.value.body


def test_semantic_errors_leave_lineage_alone(cluster: Cluster, operator: OperatorProcess, inputs, store_uri):
    model, works = inputs
    cluster.create("modellineages", lineage_body("gamma", works=works, model=model))
    wait_for("lineage gamma to be initialised", lambda: cluster.lineage_status("gamma").get("phase") == "Ready")

    cluster.create("unlearnrequests", request_body("unknown-lineage", lineage="nowhere",
                                                   work=f"file://{works / 'book-1.txt'}"))
    cluster.create("unlearnrequests", request_body("missing-work", lineage="gamma",
                                                   work=f"file://{works / 'no-such-book.txt'}"))
    # Passes the OpenAPI schema; the CEL rule that rejects it is dropped by this API server.
    cluster.create("unlearnrequests", request_body("empty-loss", lineage="gamma", work=f"file://{works / 'book-1.txt'}",
                                                   method={"name": "TaskVector", "forgetWeight": 0}))
    cluster.create("unlearnrequests", request_body("dry-run", lineage="gamma", work=f"file://{works / 'book-1.txt'}",
                                                   dryRun=True))

    expected = {"unknown-lineage": ("LineageNotFound", "names no ModelLineage in namespace"),
                "missing-work": ("WorkNotReadable", "does not exist as a file"),
                "empty-loss": ("InvalidSpec", "spec.method.forgetWeight 0.0 leaves the loss empty")}
    for name, (reason, text) in expected.items():
        status = cluster.wait_phase(name, ("Invalid",), timeout=30)
        validated = cluster.condition(status, "Validated")
        assert validated["status"] == "False", name
        assert validated["reason"] == reason, name
        assert text in validated["message"], name
    rendered = cluster.wait_phase("dry-run", ("Rendered",), timeout=30)
    assert rendered["renderedJob"]["kind"] == "Job"
    assert "--step-id" in rendered["renderedJob"]["spec"]["template"]["spec"]["containers"][0]["args"]

    lineage = cluster.lineage_status("gamma")
    assert "activeRequest" not in lineage
    assert lineage.get("history") in (None, [])
    assert lineage["queueDepth"] == 0
    assert cluster.jobs("lethe.dev/lineage=gamma,lethe.dev/role=step") == []
    assert store_of(store_uri, cluster.namespace, "gamma").list_steps() == []

    # The lineage still runs a valid request, and every transition is an Event on the request.
    time_to_job(cluster, request_body("valid", lineage="gamma", work=f"file://{works / 'book-2.txt'}"))
    assert cluster.wait_phase("valid", ("Succeeded",))["sequence"] == 1
    core = client.CoreV1Api(cluster.custom.api_client)

    def reasons() -> set[str]:
        events = core.list_namespaced_event(cluster.namespace,
                                            field_selector="involvedObject.name=valid,involvedObject.kind=UnlearnRequest")
        return {event.reason for event in events.items}

    wait_for("the request's Events", lambda: {"SpecValid", "Admitted", "JobCreated", "Promoted"} <= reasons(),
             timeout=20)


def test_operator_restart_mid_job(cluster: Cluster, operator: OperatorProcess, fake_node: FakeNode, inputs,
                                  store_uri):
    model, works = inputs
    cluster.create("modellineages", lineage_body("delta", works=works, model=model))
    wait_for("lineage delta to be initialised", lambda: cluster.lineage_status("delta").get("phase") == "Ready")
    time_to_job(cluster, request_body("slow", lineage="delta", work=f"file://{works / 'book-1.txt'}", seconds=4))
    job_name = cluster.request_jobs("slow")[0].metadata.name
    run = fake_node.wait_for_run(lambda r: r.name.startswith(job_name))

    operator.kill()
    assert run.finished.wait(30), "the stand-in trainer did not finish"
    store = store_of(store_uri, cluster.namespace, "delta")
    assert [m["step_id"] for m in store.list_steps()] == ["0001-slow"]
    assert store.head() is None  # committed, but nobody moved the head yet

    operator.start()
    status = cluster.wait_phase("slow", ("Succeeded",))
    assert status["stepId"] == "0001-slow"
    assert len(cluster.request_jobs("slow")) == 1
    assert len([r for r in fake_node.ran(cluster.namespace) if r.name.startswith(job_name)]) == 1
    assert [m["step_id"] for m in store.list_steps()] == ["0001-slow"]
    assert store.head()["step_id"] == "0001-slow"
    assert [h["stepId"] for h in cluster.lineage_status("delta")["history"]] == ["0001-slow"]


def test_deleting_running_request(cluster: Cluster, operator: OperatorProcess, fake_node: FakeNode, inputs,
                                  store_uri):
    model, works = inputs
    cluster.create("modellineages", lineage_body("epsilon", works=works, model=model))
    wait_for("lineage epsilon to be initialised", lambda: cluster.lineage_status("epsilon").get("phase") == "Ready")
    cluster.create("unlearnrequests", request_body("doomed", lineage="epsilon", work=f"file://{works / 'book-1.txt'}",
                                                   seconds=120))
    job_name = wait_for("doomed's Job", lambda: cluster.request_jobs("doomed"))[0].metadata.name
    run = fake_node.wait_for_run(lambda r: r.name.startswith(job_name))
    cluster.create("unlearnrequests", request_body("next", lineage="epsilon", work=f"file://{works / 'book-2.txt'}"))
    assert cluster.wait_phase("next", ("Queued",))

    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "unlearnrequests", "doomed")
    wait_for("doomed's Job to be deleted", lambda: not cluster.request_jobs("doomed"), timeout=60)
    assert run.finished.wait(30), "the trainer process survived its Job's deletion"

    status = cluster.wait_phase("next", ("Succeeded",))
    assert status["sequence"] == 1
    store = store_of(store_uri, cluster.namespace, "epsilon")
    assert [m["step_id"] for m in store.list_steps()] == ["0001-next"]
    assert [record["step_id"] for record in store.head_history()] == ["0001-next"]


def test_failures_halt_or_continue_and_collapse(cluster: Cluster, operator: OperatorProcess, inputs, store_uri):
    model, works = inputs
    book = f"file://{works / 'book-1.txt'}"
    other = f"file://{works / 'book-2.txt'}"
    for name, on_failure in (("cont", "Continue"), ("halt", "Halt"), ("crash", "Continue")):
        cluster.create("modellineages", lineage_body(name, works=works, model=model, onFailure=on_failure))
    for name in ("cont", "halt"):
        cluster.create("unlearnrequests", request_body(f"{name}-1", lineage=name, work=book, mode="fail",
                                                       job={"backoffLimit": 1}))
    cluster.create("unlearnrequests", request_body("crash-1", lineage="crash", work=book, mode="collapse"))
    for name in ("cont", "halt", "crash"):
        cluster.create("unlearnrequests", request_body(f"{name}-2", lineage=name, work=other))

    # A Job failing past its backoff: Failed with the trainer's message; the head does not move.
    for name in ("cont-1", "halt-1"):
        status = cluster.wait_phase(name, ("Failed",), timeout=90)
        failure = status["lastFailure"]
        assert failure["reason"] == "JobFailed"
        assert failure["exitCode"] == 1
        assert "stand-in trainer failed on purpose" in failure["message"]
        assert json.loads(failure["terminationMessage"])["result"] == "Failed"
        assert status["attempts"] == 2
    assert cluster.wait_phase("cont-2", ("Succeeded",))["sequence"] == 1

    halted = wait_for("lineage halt to halt", lambda: (s := cluster.lineage_status("halt")).get("phase") == "Halted"
                      and s)
    assert cluster.condition(halted, "Halted")["reason"] == "RequestFailed"
    waiting = cluster.wait_phase("halt-2", ("Queued",))
    assert cluster.condition(waiting, "Gated")["reason"] == "LineageHalted"
    assert store_of(store_uri, cluster.namespace, "halt").head() is None

    # A collapsed step is never promoted, and halts the lineage whatever onFailure says.
    collapsed = cluster.wait_phase("crash-1", ("Failed",))
    assert cluster.condition(collapsed, "Failed")["reason"] == "Collapsed"
    assert collapsed["guard"]["collapsed"] is True
    assert "perplexity" in collapsed["guard"]["message"]
    crash = wait_for("lineage crash to halt", lambda: (s := cluster.lineage_status("crash")).get("phase") == "Halted"
                     and s)
    assert cluster.condition(crash, "Halted")["reason"] == "Collapsed"
    assert store_of(store_uri, cluster.namespace, "crash").head() is None
    assert metric_value(operator.metrics(), "lethe_lineage_collapsed", namespace=cluster.namespace,
                        lineage="crash") == 1.0

    # Resume: the annotation for the failed lineage, deleting the collapsed request for the other.
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "modellineages", "halt",
                                                  {"metadata": {"annotations": {"lethe.dev/resume": "1"}}})
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "unlearnrequests", "crash-1")
    for name in ("halt", "crash"):
        assert cluster.wait_phase(f"{name}-2", ("Succeeded",))["sequence"] == 1
        assert store_of(store_uri, cluster.namespace, name).head()["step_id"] == f"0001-{name}-2"
    assert cluster.condition(cluster.lineage_status("halt"), "Halted")["reason"] == "Resumed"
    assert cluster.condition(cluster.lineage_status("crash"), "Halted")["reason"] == "HaltingRequestDeleted"

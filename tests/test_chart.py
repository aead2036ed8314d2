"""The Helm chart: lint, rendering, the values schema, and an install into the loopback API server.

Rendering tests run helm only. The `cluster` tests install the chart into the
control plane from tests/support: kube-apiserver v1.20 with no kubelet, so the
operator Deployment never gets Pods. They dry-run the cluster examples against
the installed CRDs. They also run the operator as a local process with the
token of the chart's ServiceAccount, to show that the chart's RBAC is enough
for one request and denies what the chart does not grant.

Against the v1.20 API server, helm and kubectl validate manifests with the
server's OpenAPI document, which does not know `x-kubernetes-validations`, the
CEL rules in the CRDs. So `helm install` runs with --skip-schema-validation
and `kubectl apply` with --validate=false. A cluster of v1.25 or later needs
neither.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from kubernetes import client

from tests.support.controlplane import ControlPlane, find_binary

pytest_plugins = ["tests.support.fixtures"]

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "lethe"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
EXAMPLES = ROOT / "examples" / "cluster"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"


def helm(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(find_binary("helm")), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed with exit code {result.returncode}:\n{result.stderr}")
    return result


def render(*args: str) -> list[dict[str, Any]]:
    """Run `helm template` on the chart and return its objects."""
    output = helm("template", "lethe", str(CHART), "--namespace", "lethe-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def wait_for(description: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {description}; last value: {last!r}")


# --------------------------------------------------------------- generation


def test_crd_templates_match_crds_folder() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sync-chart-crds.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"chart CRD templates are stale:\n{result.stderr}"


# ------------------------------------------------------------ lint, render


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_lint_and_template(values: Path | None) -> None:
    extra = ["--values", str(values)] if values else []
    lint = helm("lint", "--strict", str(CHART), *extra)
    assert "0 chart(s) failed" in lint.stdout

    objects = render(*extra)
    assert one(objects, "Deployment")["metadata"]["name"] == "lethe"


def test_default_deployment() -> None:
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]

    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert container["image"] == "lethe/operator:0.1.0"
    assert pod["serviceAccountName"] == "lethe"
    assert container["livenessProbe"]["httpGet"]["port"] == "liveness"

    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["resources"]["limits"]["memory"] == "512Mi"


def test_trainer_values_reach_operator_settings() -> None:
    from lethe_operator import settings

    values = CHART / "ci" / "custom-trainer-values.yaml"
    env = container_env(one(render("--values", str(values)), "Deployment"))
    configured = settings.from_environment(env)

    assert configured.trainer_image == "registry.example.com/ml/lethe-trainer:0.1.0-cu128"
    assert configured.store_uri == "s3://lethe-models/lineages"
    assert configured.s3_endpoint_url == "http://minio.storage.svc:9000"
    assert configured.credentials_secret == "lethe-s3"


def test_rbac_cluster_wide_and_namespaced() -> None:
    cluster = render("--set", "rbac.clusterWide=true")
    assert find(cluster, "ClusterRole", "lethe")
    assert find(cluster, "ClusterRoleBinding", "lethe")
    assert not find(cluster, "Role", "lethe")

    namespaced = render("--set", "rbac.clusterWide=false")
    role = find(namespaced, "Role", "lethe")[0]
    binding = find(namespaced, "RoleBinding", "lethe")[0]
    assert not find(namespaced, "ClusterRole")
    assert not find(namespaced, "ClusterRoleBinding")
    assert role["metadata"]["namespace"] == "lethe-system"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lethe", "namespace": "lethe-system"}]


# Every permission of the operator, as (API group, resource, verb). Adding a
# call to the operator means adding its rule here, in the chart and in the
# table of docs/install.md.
OPERATOR_PERMISSIONS = {
    *(("lethe.dev", resource, verb) for resource in ("modellineages", "unlearnrequests")
      for verb in ("get", "list", "watch", "patch")),
    ("lethe.dev", "modellineages/status", "patch"),
    ("lethe.dev", "unlearnrequests/status", "patch"),
    ("lethe.dev", "modellineages/finalizers", "update"),
    ("lethe.dev", "unlearnrequests/finalizers", "update"),
    *(("batch", "jobs", verb) for verb in ("create", "list", "watch", "delete")),
    ("", "pods", "list"),
    ("", "events", "create"),
}


@pytest.mark.parametrize("cluster_wide", ["true", "false"])
def test_rbac_grants_exactly_operator_calls(cluster_wide: str) -> None:
    objects = render("--set", f"rbac.clusterWide={cluster_wide}")
    kind = "ClusterRole" if cluster_wide == "true" else "Role"
    role = find(objects, kind, "lethe")[0]

    granted = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule, rule
        granted |= {(group, resource, verb) for group in rule["apiGroups"] for resource in rule["resources"]
                    for verb in rule["verbs"]}
    assert granted == OPERATOR_PERMISSIONS


def test_crds_install_and_keep() -> None:
    crds = find(render(), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == ["modellineages.lethe.dev", "unlearnrequests.lethe.dev"]
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"

    for crd in find(render("--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})

    assert not find(render("--set", "crds.install=false"), "CustomResourceDefinition")


def test_crd_templates_keep_source_schema() -> None:
    rendered = {c["metadata"]["name"]: c for c in find(render(), "CustomResourceDefinition")}
    for source in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(source.read_text())
        assert rendered[crd["metadata"]["name"]]["spec"] == crd["spec"], source.name


def test_monitoring_objects_need_cluster_apis() -> None:
    plain = render()
    assert not find(plain, "ServiceMonitor")
    assert not find(plain, "PrometheusRule")
    assert one(plain, "Service")["spec"]["ports"][0]["targetPort"] == "metrics"

    monitored = render("--api-versions", SERVICE_MONITOR_API, "--api-versions", PROMETHEUS_RULE_API)
    monitor = one(monitored, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == one(monitored, "Deployment")["spec"]["selector"]["matchLabels"]
    rule = one(monitored, "PrometheusRule")
    source = yaml.safe_load((CHART / "files" / "lethe-rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]

    disabled = render("--api-versions", SERVICE_MONITOR_API, "--api-versions", PROMETHEUS_RULE_API,
                      "--set", "metrics.serviceMonitor.enabled=false", "--set", "metrics.prometheusRule.enabled=false")
    assert not find(disabled, "ServiceMonitor")
    assert not find(disabled, "PrometheusRule")


def test_dashboard_configmap_label() -> None:
    configmap = find(render(), "ConfigMap", "lethe-dashboards")[0]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["lethe.json"])
    assert dashboard["panels"]

    custom = find(render("--set", "dashboards.label.grafana_dashboard=null", "--set", "dashboards.label.team=ml",
                         "--set", "dashboards.namespace=monitoring"), "ConfigMap", "lethe-dashboards")[0]
    assert custom["metadata"]["labels"]["team"] == "ml"
    assert "grafana_dashboard" not in custom["metadata"]["labels"]
    assert custom["metadata"]["namespace"] == "monitoring"

    assert not find(render("--set", "dashboards.enabled=false"), "ConfigMap", "lethe-dashboards")


def test_test_hook_pod() -> None:
    objects = render()
    hooks = [o for o in objects if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    assert sorted(o["kind"] for o in hooks) == ["Pod", "Role", "RoleBinding", "ServiceAccount"]
    pod = find(hooks, "Pod")[0]
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    assert command[2] == (CHART / "files" / "check-install.py").read_text()
    assert "--deployment=lethe" in command
    assert pod["spec"]["serviceAccountName"] == "lethe-test"


def test_notes_name_first_request() -> None:
    result = helm("install", "lethe", str(CHART), "--dry-run=client", "--namespace", "lethe-system")
    assert "kubectl apply -f examples/cluster/request-1.yaml" in result.stdout
    assert "helm test lethe -n lethe-system" in result.stdout


def test_trainer_values_reach_operator_environment() -> None:
    rendered = helm("template", "lethe", str(CHART), "--namespace", "lethe-system",
                    "--values", str(CHART / "ci" / "custom-trainer-values.yaml"))
    assert "LETHE_TRAINER_NODE_SELECTOR" in rendered.stdout
    assert "LETHE_TRAINER_TOLERATIONS" in rendered.stdout
    assert "LETHE_PUSHGATEWAY_URL" in rendered.stdout
    assert "does not read these values yet" not in rendered.stdout


# ------------------------------------------------------------------ schema


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.replicas=2", "/operator/replicas"),
        ("operator.verbose=loud", "/operator/verbose"),
        ("operator.metricsPort=70000", "/operator/metricsPort"),
        ("operator.unknown=1", "additional properties 'unknown'"),
        ("rbac.clusterWide=yes", "/rbac/clusterWide"),
        ("trainer.gpu.resourceName=gpu", "/trainer/gpu/resourceName"),
        ("trainer.gpu.count=-1", "/trainer/gpu/count"),
        ("trainer.imagePullSecrets[0]=Bad_Name", "/trainer/imagePullSecrets/0"),
        ("store.uri=s3:/bucket", "/store/uri"),
        ("store.s3.endpoint=minio:9000", "/store/s3/endpoint"),
        ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval"),
        ("tests.timeoutSeconds=1", "/tests/timeoutSeconds"),
    ],
)
def test_schema_rejects_bad_value(setting: str, message: str) -> None:
    result = helm("template", "lethe", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0, f"helm accepted {setting}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_schema_rejects_empty_dashboard_label() -> None:
    result = helm("template", "lethe", str(CHART), "--set", "dashboards.label.grafana_dashboard=null", check=False)
    assert result.returncode != 0
    assert "/dashboards/label" in result.stderr


def test_service_account_name_required_without_create() -> None:
    result = helm("template", "lethe", str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert result.returncode != 0
    assert "serviceAccount.name is required when serviceAccount.create is false" in result.stderr


# ----------------------------------------------------------------- cluster
#
# One release per module: CRDs are cluster-scoped, and installing them once
# keeps the module fast. The release uses the default values (cluster-wide
# RBAC), so the operator run below proves the chart's defaults.

HELM_INSTALL_FLAGS = (
    # kube-apiserver v1.20 rejects the CRDs' x-kubernetes-validations in
    # server-side apply and in its OpenAPI document; see the module docstring.
    "--server-side=false",
    "--disable-openapi-validation",
)
CRD_NAMES = ("modellineages.lethe.dev", "unlearnrequests.lethe.dev")


class Release:
    def __init__(self, *, name: str, namespace: str, plane: ControlPlane) -> None:
        self.name = name
        self.namespace = namespace
        self.plane = plane

    def kubectl(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(find_binary("kubectl")), *args], capture_output=True, text=True,
                                env=env or self.plane.env(), timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed with exit code {result.returncode}:\n{result.stderr}")
        return result


def adopt_existing_crds(kube_api: Any, *, release: str, namespace: str) -> None:
    """Mark CRDs that other tests applied with kubectl as belonging to RELEASE, so helm can install over them.

    These are the labels and annotations Helm itself checks before it takes
    over an object that exists.
    """
    from kubernetes.client.exceptions import ApiException

    api = client.ApiextensionsV1Api(kube_api)
    for name in CRD_NAMES:
        patch = {"metadata": {
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace},
        }}
        try:
            api.patch_custom_resource_definition(name, patch)
        except ApiException as error:
            if error.status != 404:
                raise


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, kube_api: Any) -> Iterator[Release]:
    suffix = os.urandom(3).hex()
    name = f"lethe-{suffix}"
    namespace = f"lethe-system-{suffix}"
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": namespace}})
    adopt_existing_crds(kube_api, release=name, namespace=namespace)
    helm("install", name, str(CHART), "--namespace", namespace, *HELM_INSTALL_FLAGS, env=control_plane.env())
    try:
        yield Release(name=name, namespace=namespace, plane=control_plane)
    finally:
        # crds.keep leaves the CRDs for later tests; the rest goes with the release.
        helm("uninstall", name, "--namespace", namespace, "--wait", env=control_plane.env(), check=False)
        client.CoreV1Api(kube_api).delete_namespace(namespace)


@pytest.mark.cluster
def test_install_creates_objects(release: Release, kube_api: Any) -> None:
    extensions = client.ApiextensionsV1Api(kube_api)
    for crd_name in CRD_NAMES:
        crd = extensions.read_custom_resource_definition(crd_name)
        established = [c for c in crd.status.conditions or [] if c.type == "Established"]
        assert established and established[0].status == "True", crd_name
        assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"

    rbac = client.RbacAuthorizationV1Api(kube_api)
    role = rbac.read_cluster_role(release.name)
    assert any("unlearnrequests/status" in rule.resources for rule in role.rules)
    binding = rbac.read_cluster_role_binding(release.name)
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [("ServiceAccount", release.name, release.namespace)]

    core = client.CoreV1Api(kube_api)
    assert core.read_namespaced_service_account(release.name, release.namespace)
    assert core.read_namespaced_service(f"{release.name}-metrics", release.namespace)
    assert core.read_namespaced_config_map(f"{release.name}-dashboards", release.namespace)

    # No ReplicaSet controller runs here, so the Deployment exists without Pods.
    deployment = client.AppsV1Api(kube_api).read_namespaced_deployment(release.name, release.namespace)
    assert deployment.spec.strategy.type == "Recreate"
    assert deployment.spec.template.spec.service_account_name == release.name


@pytest.mark.cluster
def test_examples_pass_server_dry_run(release: Release) -> None:
    result = release.kubectl("apply", "--dry-run=server", "--validate=false",
                             "--namespace", release.namespace, "-f", str(EXAMPLES))
    created = sorted(line.split()[0] for line in result.stdout.splitlines())
    assert created == [
        "modellineage.lethe.dev/llama-assistant",
        "secret/lethe-s3",
        "unlearnrequest.lethe.dev/forget-work-1",
        "unlearnrequest.lethe.dev/forget-work-2",
    ]


@pytest.mark.cluster
def test_server_rejects_bad_example(release: Release, tmp_path: Path) -> None:
    request = yaml.safe_load((EXAMPLES / "request-1.yaml").read_text())
    request["spec"]["job"]["gpus"] = -1
    request["spec"]["forget"]["uri"] = "s3:/no-bucket"
    path = tmp_path / "bad-request.yaml"
    path.write_text(yaml.safe_dump(request))

    result = release.kubectl("apply", "--dry-run=server", "--validate=false",
                             "--namespace", release.namespace, "-f", str(path), check=False)
    assert result.returncode != 0
    assert "spec.job.gpus" in result.stderr
    assert "spec.forget.uri" in result.stderr


# ------------------------------------------------------------- RBAC proof


def service_account_kubeconfig(kube_api: Any, plane: ControlPlane, *, namespace: str, name: str,
                               path: Path) -> Path:
    """Write a kubeconfig that authenticates with the token of ServiceAccount NAMESPACE/NAME."""
    core = client.CoreV1Api(kube_api)

    def token_secret() -> str | None:
        account = core.read_namespaced_service_account(name, namespace)
        return account.secrets[0].name if account.secrets else None

    # The token controller adds the Secret shortly after the ServiceAccount appears.
    secret = core.read_namespaced_secret(wait_for(f"the token Secret of {namespace}/{name}", token_secret), namespace)
    token = base64.b64decode(secret.data["token"]).decode()
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": plane.server_url, "certificate-authority": str(plane.ca_path)}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": name, "namespace": namespace}}],
        "current-context": "test",
    }))
    path.chmod(0o600)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def operator_command(deployment: dict[str, Any], *, liveness_port: int) -> tuple[list[str], dict[str, str]]:
    """Return the rendered operator container's arguments and LETHE_* environment, ready for a local run."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    arguments = []
    for argument in container["args"]:
        if argument.startswith("--liveness="):
            argument = f"--liveness=http://127.0.0.1:{liveness_port}/healthz"
        arguments.append(argument)
    return ["lethe-operator", *arguments], container_env(deployment)


@pytest.fixture
def operator_run(release: Release, kube_api: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Run lethe-operator locally as the chart's ServiceAccount, with the rendered Deployment's settings."""
    kubeconfig = service_account_kubeconfig(kube_api, release.plane, namespace=release.namespace,
                                            name=release.name, path=tmp_path / "operator-kubeconfig")
    rendered = render_release(release)
    liveness_port = free_port()
    command, settings_env = operator_command(one(rendered, "Deployment"), liveness_port=liveness_port)

    metrics_port = free_port()
    store = tmp_path / "store"
    store.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}
    env.update(settings_env)
    env.update({
        "KUBECONFIG": str(kubeconfig),
        "LETHE_METRICS_PORT": str(metrics_port),
        "LETHE_METRICS_ADDRESS": "127.0.0.1",
        # The chart's default store is empty, and a local directory replaces S3 here.
        "LETHE_STORE_URI": store.as_uri(),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    log_path = tmp_path / "operator.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(Path(sys.executable).parent / command[0]), *command[1:]],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        yield {"process": process, "log_path": log_path, "kubeconfig": kubeconfig, "liveness_port": liveness_port,
               "metrics_port": metrics_port, "store": store}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def render_release(release: Release) -> list[dict[str, Any]]:
    output = helm("get", "manifest", release.name, "--namespace", release.namespace, env=release.plane.env()).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


WORDS = ("river stone lantern orchard whisper meadow copper falcon harbor velvet ember thistle canyon saffron "
         "glacier willow marble cobalt juniper prairie").split()


def write_work(path: Path, seed: int, words: int = 600) -> str:
    import random

    generator = random.Random(seed)
    path.write_text(" ".join(generator.choice(WORDS) for _ in range(words)) + "\n")
    return path.as_uri()


def request_jobs(kube_api: Any, namespace: str, request: str) -> list[Any]:
    return client.BatchV1Api(kube_api).list_namespaced_job(
        namespace, label_selector=f"lethe.dev/request={request}").items


def job_finished(job: Any) -> str | None:
    for condition in (job.status and job.status.conditions) or []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            return condition.type
    return None


@pytest.mark.cluster
def test_chart_rbac_runs_one_request(release: Release, operator_run: dict[str, Any], kube_api: Any,
                                     namespace: str, fake_node: Any, tmp_path: Path) -> None:
    """The operator, with only the chart's ServiceAccount token, takes a request to a finished Job.

    The Jobs run the real lethe-trainer (init, then one SSU step) as local
    processes on a tiny random model, with a local directory as the store.
    """
    from tests.support.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    retain = write_work(tmp_path / "retain.txt", seed=1)
    work = write_work(tmp_path / "work.txt", seed=2)
    custom = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object("lethe.dev", "v1alpha1", namespace, "modellineages", {
        "apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage", "metadata": {"name": "tiny"},
        "spec": {
            "baseModel": {"uri": model.as_uri()},
            "retain": {"works": [{"uri": retain}]},
            "heldOut": {"uri": retain},
            "evaluation": {"forgetChunks": 2, "previousChunks": 2, "retainChunks": 2, "promptTokens": 16,
                           "continuationTokens": 16, "maxNewTokens": 4, "perplexityTokens": 64,
                           "bootstrapSamples": 100},
            # A random model's figures are noise; the guard is not under test here.
            "collapseGuard": {"maxPerplexityRatio": 1000.0, "minRetainRougeFraction": 0.0, "minAccuracyFraction": 0.0},
        },
    })
    custom.create_namespaced_custom_object("lethe.dev", "v1alpha1", namespace, "unlearnrequests", {
        "apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest", "metadata": {"name": "forget-work"},
        "spec": {
            "lineageRef": {"name": "tiny"},
            "forget": {"uri": work},
            "method": {"name": "SSU", "maxChunks": 2, "learningRate": 1e-2, "loraRank": 2, "loraAlpha": 4,
                       "device": "cpu"},
            "job": {"gpus": 0},
        },
    })

    def step_job_finished() -> str | None:
        if operator_run["process"].poll() is not None:
            raise AssertionError(f"lethe-operator exited with code {operator_run['process'].returncode}:\n"
                                 f"{operator_run['log_path'].read_text()[-4000:]}")
        jobs = request_jobs(kube_api, namespace, "forget-work")
        return job_finished(jobs[0]) if jobs else None

    outcome = wait_for("the request's Job to finish", step_job_finished, timeout=150)
    log = operator_run["log_path"].read_text()
    assert outcome == "Complete", "\n".join(run.output() for run in fake_node.ran())
    # A denied API call shows as an HTTP 403 status; log timestamps may end in ",403", so match the status only.
    assert not re.search(r"(?<![,.\d])403(?!\d)", log), log[-4000:]
    assert "forbidden" not in log.lower(), log[-4000:]

    def request_phase() -> str | None:
        request = custom.get_namespaced_custom_object("lethe.dev", "v1alpha1", namespace, "unlearnrequests",
                                                      "forget-work")
        phase = (request.get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    assert wait_for("the request's phase", request_phase, timeout=30) == "Succeeded", log[-4000:]

    def event_reasons() -> set[str]:
        return {event.reason for event in client.CoreV1Api(kube_api).list_namespaced_event(namespace).items
                if event.reporting_component == "lethe-operator" or event.source.component == "lethe-operator"}

    assert wait_for("the operator's JobCreated Event", lambda: "JobCreated" in event_reasons(), timeout=30)

    # The liveness probe of the chart's Deployment probes this endpoint.
    liveness = f"http://127.0.0.1:{operator_run['liveness_port']}/healthz"
    with urllib.request.urlopen(liveness, timeout=5) as response:
        assert response.status == 200


@pytest.mark.cluster
def test_check_install_script(release: Release, operator_run: dict[str, Any], kube_api: Any) -> None:
    """files/check-install.py, which `helm test` runs in a Pod, passes once the operator is available."""
    script = CHART / "files" / "check-install.py"
    arguments = [sys.executable, str(script), f"--namespace={release.namespace}", f"--deployment={release.name}",
                 f"--metrics-url=http://127.0.0.1:{operator_run['metrics_port']}/metrics"]
    env = release.plane.env()

    # No ReplicaSet controller runs here, so the Deployment has no available replica yet.
    failed = subprocess.run([*arguments, "--timeout-seconds=1"], capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1
    assert f"Deployment {release.namespace}/{release.name} has 0 available replicas" in failed.stderr

    # Stand in for the Deployment controller: report the one replica available.
    client.AppsV1Api(kube_api).patch_namespaced_deployment_status(release.name, release.namespace, {
        "status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}})
    passed = subprocess.run([*arguments, "--timeout-seconds=30"], capture_output=True, text=True, env=env, timeout=60)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.count("ok: ") == 3


def service_account_client(kube_api: Any, plane: ControlPlane, *, namespace: str, name: str, tmp_path: Path) -> Any:
    from kubernetes import config

    path = service_account_kubeconfig(kube_api, plane, namespace=namespace, name=name, path=tmp_path / "sa-kubeconfig")
    return config.new_client_from_config(config_file=str(path))


FORBIDDEN_CALLS = {
    "delete a Secret": lambda api, ns: client.CoreV1Api(api).delete_namespaced_secret("any", ns),
    "list Secrets": lambda api, ns: client.CoreV1Api(api).list_namespaced_secret(ns),
    "create a Deployment": lambda api, ns: client.AppsV1Api(api).create_namespaced_deployment(ns, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "intruder"},
        "spec": {"selector": {"matchLabels": {"app": "intruder"}}, "template": {
            "metadata": {"labels": {"app": "intruder"}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}}}),
    "update a Job": lambda api, ns: client.BatchV1Api(api).patch_namespaced_job(
        "any", ns, {"metadata": {"labels": {"app": "intruder"}}}),
    "delete an UnlearnRequest": lambda api, ns: client.CustomObjectsApi(api).delete_namespaced_custom_object(
        "lethe.dev", "v1alpha1", ns, "unlearnrequests", "any"),
    "create a ClusterRole": lambda api, ns: client.RbacAuthorizationV1Api(api).create_cluster_role({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "intruder"},
        "rules": []}),
}


@pytest.mark.cluster
@pytest.mark.parametrize("action", sorted(FORBIDDEN_CALLS))
def test_chart_rbac_forbids(release: Release, kube_api: Any, tmp_path: Path, action: str) -> None:
    from kubernetes.client.exceptions import ApiException

    api_client = service_account_client(kube_api, release.plane, namespace=release.namespace, name=release.name,
                                        tmp_path=tmp_path)
    # The same token may list Jobs, so a 403 below comes from RBAC and not from a bad token.
    client.BatchV1Api(api_client).list_namespaced_job(release.namespace)

    with pytest.raises(ApiException) as raised:
        FORBIDDEN_CALLS[action](api_client, release.namespace)
    assert raised.value.status == 403, f"{action}: expected 403 Forbidden, got {raised.value.status}"

"""The loopback control plane and the fake node behave like a cluster.

These tests start etcd, kube-apiserver and kube-controller-manager once per
session, so scripts/install-kube.sh must have run. They check what the operator
relies on: custom resources with a status subresource, Jobs that the Job
controller marks Complete or Failed from Pods run by FakeNode, and kubectl
with the generated kubeconfig.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Callable

import pytest
from kubernetes import client

from tests.support.controlplane import ControlPlane, find_binary
from tests.support.fakenode import FakeNode

pytest_plugins = ["tests.support.fixtures"]
pytestmark = pytest.mark.cluster

GROUP = "test.lethe.dev"


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `probe` until it returns a truthy value, and return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


def job_condition(batch: client.BatchV1Api, namespace: str, name: str) -> str | None:
    job = batch.read_namespaced_job(name, namespace)
    for cond in (job.status and job.status.conditions) or []:
        if cond.status == "True" and cond.type in ("Complete", "Failed"):
            return cond.type
    return None


def make_job(name: str, code: str, backoff_limit: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", code],
                            "env": [{"name": "GREETING", "value": "hello"}],
                        }
                    ],
                }
            },
        },
    }


def job_pod(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def test_custom_resource_with_status_subresource(kube_api: Any, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    plural = f"widgets{namespace.replace('-', '')}"
    crd_name = f"{plural}.{GROUP}"
    ext.create_custom_resource_definition({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": f"W{plural}"},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                    },
                }},
            }],
        },
    })
    try:
        def established() -> bool:
            crd = ext.read_custom_resource_definition(crd_name)
            return any(
                c.type == "Established" and c.status == "True"
                for c in (crd.status.conditions or [])
            )

        wait_for(f"CRD {crd_name} Established", established)
        custom = client.CustomObjectsApi(kube_api)
        body = {
            "apiVersion": f"{GROUP}/v1",
            "kind": f"W{plural}",
            "metadata": {"name": "one"},
            "spec": {"size": 3},
        }
        created = wait_for(
            "the first custom object to be accepted",
            lambda: _create_when_served(custom, namespace, plural, body),
        )
        assert created["spec"] == {"size": 3}

        custom.patch_namespaced_custom_object_status(
            GROUP, "v1", namespace, plural, "one", {"status": {"phase": "Ready"}}
        )
        got = custom.get_namespaced_custom_object(GROUP, "v1", namespace, plural, "one")
        assert got["status"] == {"phase": "Ready"}
        # With a status subresource, writes to the main resource leave status
        # unchanged.
        custom.patch_namespaced_custom_object(
            GROUP, "v1", namespace, plural, "one", {"spec": {"size": 4}, "status": {"phase": "X"}}
        )
        got = custom.get_namespaced_custom_object(GROUP, "v1", namespace, plural, "one")
        assert got["spec"] == {"size": 4}
        assert got["status"] == {"phase": "Ready"}
    finally:
        ext.delete_custom_resource_definition(crd_name)


def _create_when_served(
    custom: client.CustomObjectsApi, namespace: str, plural: str, body: dict[str, Any]
) -> dict[str, Any] | None:
    # Established can come a moment before the new resource is served.
    try:
        return custom.create_namespaced_custom_object(GROUP, "v1", namespace, plural, body)
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise


def test_job_completes_with_termination_message(
    kube_api: Any, namespace: str, fake_node: FakeNode
) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    code = (
        "import os\n"
        "open('/dev/termination-log', 'w').write('trained: ' + os.environ['GREETING'])\n"
        "print('stdout line')\n"
    )
    batch.create_namespaced_job(namespace, make_job("ok", code))

    assert wait_for("Job ok to finish", lambda: job_condition(batch, namespace, "ok")) == "Complete"
    pod = job_pod(core, namespace, "ok")
    assert pod.spec.node_name == fake_node.node_name
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    assert terminated.message == "trained: hello"

    run = fake_node.find(namespace, pod.metadata.name)
    assert run is not None
    assert run.exit_code == 0
    assert "stdout line" in run.output()


def test_job_fails_on_nonzero_exit(kube_api: Any, namespace: str, fake_node: FakeNode) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    code = (
        "import os, sys\n"
        "open(os.environ['LETHE_TERMINATION_LOG'], 'w').write('out of memory')\n"
        "sys.exit(3)\n"
    )
    batch.create_namespaced_job(namespace, make_job("bad", code, backoff_limit=0))

    assert wait_for("Job bad to finish", lambda: job_condition(batch, namespace, "bad")) == "Failed"
    pod = job_pod(core, namespace, "bad")
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3
    assert terminated.message == "out of memory"
    assert [r.exit_code for r in fake_node.ran(namespace)] == [3]


def test_env_from_secret(kube_api: Any, namespace: str, fake_node: FakeNode) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    core.create_namespaced_secret(namespace, {
        "metadata": {"name": "creds"},
        "stringData": {"TOKEN": "s3cret", "OTHER": "x"},
    })
    job = make_job(
        "env",
        "import os\n"
        "open(os.environ['LETHE_TERMINATION_LOG'], 'w').write("
        "os.environ['TOKEN'] + ' ' + os.environ['P_OTHER'] + ' ' + os.environ['ARG'])\n",
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
        {"name": "ARG", "value": "$(TOKEN)-expanded"},
    ]
    container["envFrom"] = [{"secretRef": {"name": "creds"}, "prefix": "P_"}]
    batch.create_namespaced_job(namespace, job)

    assert wait_for("Job env to finish", lambda: job_condition(batch, namespace, "env")) == "Complete"
    terminated = job_pod(core, namespace, "env").status.container_statuses[0].state.terminated
    assert terminated.message == "s3cret x s3cret-expanded"


def test_pod_deletion_kills_process(
    kube_api: Any, namespace: str, fake_node: FakeNode
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": "busybox",
                "command": ["python", "-c", "import time; time.sleep(600)"],
            }],
        },
    })
    run = fake_node.wait_for_run(lambda r: r.name == "sleeper")
    wait_for("the sleeper Pod to run", lambda: core.read_namespaced_pod("sleeper", namespace).status.phase == "Running")

    core.delete_namespaced_pod("sleeper", namespace)
    assert run.finished.wait(15), "the process survived the Pod's deletion"

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
        except client.ApiException as err:
            return err.status == 404
        return False

    wait_for("the sleeper Pod to be removed", gone)


def test_kubectl_gets_jobs(control_plane: ControlPlane, kube_api: Any, namespace: str) -> None:
    client.BatchV1Api(kube_api).create_namespaced_job(namespace, make_job("listed", "pass"))
    result = subprocess.run(
        [str(find_binary("kubectl")), "get", "jobs", "-n", namespace, "-o", "name"],
        env=control_plane.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["job.batch/listed"]

"""pytest fixtures for tests that need the loopback control plane.

Register them once for the whole suite with, in tests/conftest.py:

    pytest_plugins = ["tests.support.fixtures"]

(or in a single test module, with the same line there). They give:

- `control_plane` (session): a started `ControlPlane`; its `kubeconfig_path`,
  `server_url`, `ca_path`, `admin_token` and `env()` reach it as admin.
- `kube_api` (session): a cluster-admin kubernetes.client.ApiClient.
- `namespace` (function): a fresh namespace name; on teardown its Pods are
  force-deleted (there is no kubelet to confirm) and the namespace deleted.
- `fake_node` (function): a started `FakeNode` running the Pods of
  `namespace`; stopped on teardown.

The module also registers the `cluster` marker.
"""

from __future__ import annotations

import secrets
from typing import Any, Iterator

import pytest

from tests.support.controlplane import ControlPlane
from tests.support.fakenode import FakeNode, KubeError, _Kube


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster: needs the loopback Kubernetes control plane (scripts/install-kube.sh)",
    )


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    plane = ControlPlane()
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[Any]:
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(kube_api: Any) -> Iterator[str]:
    kube = _Kube(kube_api)
    name = f"t-{secrets.token_hex(4)}"
    kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    try:
        yield name
    finally:
        try:
            pods = kube.request("GET", f"/api/v1/namespaces/{name}/pods")
            for pod in pods.get("items", []):
                try:
                    kube.request(
                        "DELETE",
                        f"/api/v1/namespaces/{name}/pods/{pod['metadata']['name']}",
                        {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0},
                    )
                except KubeError as err:
                    if err.status != 404:
                        raise
            kube.request("DELETE", f"/api/v1/namespaces/{name}")
        except KubeError as err:
            if err.status != 404:
                raise


@pytest.fixture
def fake_node(kube_api: Any, namespace: str) -> Iterator[FakeNode]:
    node = FakeNode(kube_api, namespaces=[namespace])
    node.start()
    try:
        yield node
    finally:
        node.stop()

"""The few Kubernetes API calls the reconciler makes, as async functions on plain dicts.

The official ``kubernetes`` client is synchronous, so each call runs in a
worker thread and kopf's event loop does not wait on it. Objects go in and come out as
the JSON dicts the API server uses (camelCase), not as generated models.

Errors: 404 becomes ``None`` (or ``NotFound`` for writes), 409 becomes
``Conflict``; every other ``ApiException`` propagates, and the reconciler
retries the lineage.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .decisions import API_GROUP, API_VERSION, LINEAGE_PLURAL, REQUEST_PLURAL

logger = logging.getLogger(__name__)


class Conflict(Exception):
    """The API server returned 409: the object changed since it was read, or already exists."""


class NotFound(Exception):
    """The API server returned 404 for a write."""


def load_configuration() -> client.ApiClient:
    """Return an API client from the in-cluster ServiceAccount, else from $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _body(response: Any) -> dict[str, Any]:
    data = response.read()
    return json.loads(data) if data else {}


class KubeApi:
    """Reads and writes of ModelLineages, UnlearnRequests, Jobs and Pods."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    async def _call(self, function, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except ApiException as error:
            if error.status == 409:
                raise Conflict(error.body or error.reason) from error
            raise

    async def _read(self, function, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        try:
            return _body(await self._call(function, *args, _preload_content=False, **kwargs))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def _write(self, function, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return _body(await self._call(function, *args, _preload_content=False, **kwargs))
        except ApiException as error:
            if error.status == 404:
                raise NotFound(error.body or error.reason) from error
            raise

    # Lethe resources

    async def get_lineage(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
                                LINEAGE_PLURAL, name)

    async def list_requests(self, *, namespace: str) -> list[dict[str, Any]]:
        result = await self._read(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
                                  REQUEST_PLURAL)
        return list((result or {}).get("items") or [])

    async def patch_lineage_status(self, *, namespace: str, name: str, status: Mapping[str, Any],
                                   resource_version: str | None) -> dict[str, Any]:
        """Merge-patch a lineage's status; with RESOURCE_VERSION the patch fails with Conflict if it changed."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._write(self.custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION,
                                 namespace, LINEAGE_PLURAL, name, body)

    async def patch_request_status(self, *, namespace: str, name: str, uid: str,
                                   status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch a request's status; the uid precondition keeps it off a re-created request."""
        body = {"metadata": {"uid": uid}, "status": dict(status)}
        return await self._write(self.custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION,
                                 namespace, REQUEST_PLURAL, name, body)

    # Jobs and Pods

    async def list_jobs(self, *, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = await self._read(self.batch.list_namespaced_job, namespace, label_selector=selector)
        return list((result or {}).get("items") or [])

    async def create_job(self, *, namespace: str, job: Mapping[str, Any]) -> bool:
        """Create a Job; return False when one of that name already exists (409), which callers treat as done."""
        try:
            await self._write(self.batch.create_namespaced_job, namespace, dict(job))
        except Conflict:
            return False
        return True

    async def delete_job(self, *, namespace: str, name: str) -> bool:
        """Delete a Job and, in the background, its Pods; return False when it was already gone."""
        try:
            await self._write(self.batch.delete_namespaced_job, name, namespace,
                              body={"propagationPolicy": "Background"})
        except NotFound:
            return False
        return True

    async def list_job_pods(self, *, namespace: str, job: str) -> list[dict[str, Any]]:
        result = await self._read(self.core.list_namespaced_pod, namespace, label_selector=f"job-name={job}")
        return list((result or {}).get("items") or [])

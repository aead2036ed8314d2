"""Build the batch/v1 Jobs that run the trainer: one per request step, one per lineage to initialise it.

The builders are pure: they take resources as dicts and return a Job as a
dict, ready for the API server or for ``status.renderedJob`` of a dry run.
Job names are deterministic (request name plus a hash of its uid). An
operator that restarts after creating a Job finds it again, and 409
AlreadyExists on create means the Job is already there.

Not promised: that the Job's Pod can run. Image, Secrets, ServiceAccount and
GPU capacity are checked by the cluster, and their errors show in the Job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from lethe_trainer.spec import JobSpec, parse_job

from .decisions import (API_GROUP, API_VERSION, LABEL_LINEAGE, LABEL_MANAGED_BY, LABEL_QUEUE, LABEL_REQUEST,
                        LABEL_ROLE, MANAGED_BY)
from .settings import OperatorSettings

logger = logging.getLogger(__name__)

CONTAINER_NAME = "trainer"
EXIT_INVALID_INPUT = 2  # lethe-trainer's exit code for input that no retry can fix
_NAME_LIMIT = 63  # Job names end up in the job-name label of their Pods


def _short_name(prefix: str, name: str, uid: str) -> str:
    digest = hashlib.sha256(uid.encode()).hexdigest()[:8]
    room = _NAME_LIMIT - len(prefix) - len(digest) - 2
    return f"{prefix}-{name[:room].rstrip('-')}-{digest}"


def job_name(*, request: str, uid: str) -> str:
    """Return the Job name of a request: stable for its lifetime, different for a re-created request."""
    return _short_name("lethe", request, uid)


def init_job_name(*, lineage: str, uid: str) -> str:
    return _short_name("lethe-init", lineage, uid)


def resource_argument(resource: Mapping[str, Any]) -> str:
    """Return the resource as the compact JSON the trainer reads: identity and spec, without status."""
    metadata = resource.get("metadata") or {}
    trimmed = {
        "apiVersion": resource.get("apiVersion"),
        "kind": resource.get("kind"),
        "metadata": {key: metadata[key] for key in ("name", "namespace", "creationTimestamp") if key in metadata},
        "spec": resource.get("spec") or {},
    }
    return json.dumps(trimmed, sort_keys=True, separators=(",", ":"))


def owner_reference(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Return an owner reference to a Lethe resource; the garbage collector deletes the Job with it."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": resource["kind"],
        "name": resource["metadata"]["name"],
        "uid": resource["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_step_job(*, request: Mapping[str, Any], lineage: Mapping[str, Any], settings: OperatorSettings,
                   store_uri: str, step_id: str, sequence: int, parent_step_id: str | None) -> dict[str, Any]:
    """Return the Job that applies REQUEST to LINEAGE's head as step STEP_ID."""
    metadata = request["metadata"]
    job = parse_job((request.get("spec") or {}).get("job"))
    arguments = ["step", "--lineage", resource_argument(lineage), "--request", resource_argument(request),
                 "--store", store_uri, "--step-id", step_id, "--sequence", str(sequence)]
    if parent_step_id:
        arguments += ["--parent-step-id", parent_step_id]
    arguments.append("--no-progress")

    labels = _labels(lineage=lineage["metadata"]["name"], role="step", request=metadata["name"])
    if job.queue_name:
        labels[LABEL_QUEUE] = job.queue_name
    annotations = {"lethe.dev/step-id": step_id, "lethe.dev/sequence": str(sequence)}
    return _job(name=job_name(request=metadata["name"], uid=metadata["uid"]), namespace=metadata["namespace"],
                owner=request, labels=labels, annotations=annotations, job=job, settings=settings,
                arguments=arguments)


def build_init_job(*, lineage: Mapping[str, Any], settings: OperatorSettings, store_uri: str) -> dict[str, Any]:
    """Return the Job that writes LINEAGE's theta_0 (preparing it when configured) to the store."""
    metadata = lineage["metadata"]
    job = JobSpec(gpus=settings.init_gpus, credentials_secret=settings.credentials_secret, backoff_limit=2)
    arguments = ["init", "--lineage", resource_argument(lineage), "--store", store_uri, "--no-progress"]
    return _job(name=init_job_name(lineage=metadata["name"], uid=metadata["uid"]), namespace=metadata["namespace"],
                owner=lineage, labels=_labels(lineage=metadata["name"], role="init"), annotations={}, job=job,
                settings=settings, arguments=arguments)


def _labels(*, lineage: str, role: str, request: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "lethe-trainer",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_LINEAGE: lineage,
        LABEL_ROLE: role,
    }
    if request:
        labels[LABEL_REQUEST] = request
    return labels


def _job(*, name: str, namespace: str, owner: Mapping[str, Any], labels: dict[str, str],
         annotations: dict[str, str], job: JobSpec, settings: OperatorSettings,
         arguments: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": job.image or settings.trainer_image,
        "command": list(settings.trainer_command),
        "args": arguments,
        "env": _environment(job, settings),
        "resources": _resources(job, settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    secret = job.credentials_secret or settings.credentials_secret
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]

    # The request's own placement settings win; the operator's defaults fill the gaps.
    service_account = job.service_account_name or settings.service_account_name
    node_selector = job.node_selector or settings.node_selector
    tolerations = job.tolerations or settings.tolerations
    pull_secrets = job.image_pull_secrets or settings.image_pull_secrets
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    if job.affinity:
        pod_spec["affinity"] = dict(job.affinity)
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret_name} for secret_name in pull_secrets]

    spec: dict[str, Any] = {
        "backoffLimit": job.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        # Exit code 2 is invalid input: fail the Job at once instead of retrying.
        # API servers before 1.25 drop this field and retry up to backoffLimit.
        "podFailurePolicy": {"rules": [{
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [EXIT_INVALID_INPUT]},
        }]},
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if job.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.active_deadline_seconds
    if job.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = job.ttl_seconds_after_finished

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
                     "ownerReferences": [owner_reference(owner)]},
        "spec": spec,
    }


def _environment(job: JobSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    environment: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if settings.s3_endpoint_url:
        environment.append({"name": "AWS_ENDPOINT_URL_S3", "value": settings.s3_endpoint_url})
    if settings.pushgateway_url:
        environment.append({"name": "LETHE_PUSHGATEWAY_URL", "value": settings.pushgateway_url})
    # The request's own variables come last so that they win over the defaults above.
    own = [dict(variable) for variable in job.env]
    names = {variable.get("name") for variable in own}
    return [variable for variable in environment if variable["name"] not in names] + own


def _resources(job: JobSpec, settings: OperatorSettings) -> dict[str, Any]:
    resources = job.resources or {}
    # Quantities travel as strings ("8", "32Gi"); the API server parses them.
    limits = {name: str(value) for name, value in (resources.get("limits") or {}).items()}
    requests = {name: str(value) for name, value in (resources.get("requests") or {}).items()}
    if job.gpus:
        limits[settings.gpu_resource] = str(job.gpus)
    result: dict[str, Any] = {}
    if limits:
        result["limits"] = limits
    if requests:
        result["requests"] = requests
    return result

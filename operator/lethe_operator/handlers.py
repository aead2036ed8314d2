"""kopf handlers: translate Kubernetes events into reconciles of the lineage concerned.

Every change to a ModelLineage, an UnlearnRequest or a Job the operator
created pokes ``LineageReconciler`` for the lineage it belongs to. The
reconciler reads the current state and decides what to do (see
``reconcile.py`` and ``decisions.py``). The spec handlers only reject invalid specs with
``kopf.PermanentError``, so that kopf records the failure and does not retry
it; the Validated condition itself is written by the reconciler.

kopf keeps its own bookkeeping (handler progress, last handled spec) in
annotations under ``lethe.dev/``, never in status, because the CRDs declare
every status field and the API server prunes the rest. No handler here is a
deletion handler, timer or daemon, so kopf adds no finalizer to any object;
the finalizer name is still set to ``lethe.dev/operator`` so that a future
one does not use kopf's default.
"""

from __future__ import annotations

import logging
from importlib import metadata as package_metadata
from typing import Any

import kopf

from lethe_trainer.spec import SpecError, parse_lineage, parse_request

from . import metrics
from . import settings as operator_settings
from .decisions import API_GROUP, API_VERSION, LABEL_LINEAGE, LABEL_MANAGED_BY, LINEAGE_PLURAL, MANAGED_BY, REQUEST_PLURAL
from .kube import KubeApi, load_configuration
from .reconcile import LineageReconciler, request_lineage

logger = logging.getLogger(__name__)

FINALIZER = "lethe.dev/operator"
STORAGE_PREFIX = "lethe.dev"
_metrics_started = False


def version() -> str:
    try:
        return package_metadata.version("lethe")
    except package_metadata.PackageNotFoundError:
        return "unknown"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Set kopf's storage and watch settings, and create the reconciler and the metrics endpoint."""
    global _metrics_started
    own = operator_settings.current()

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=STORAGE_PREFIX)
    settings.posting.reporting_component = "lethe-operator"
    # Namespaces and CRDs are given, not discovered; scanning them needs cluster-wide list rights.
    settings.scanning.disabled = True
    # Long-lived watches through load balancers can stall silently; renew them on the server side.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330

    memo.reconciler = LineageReconciler(kube=KubeApi(load_configuration()), settings=own)
    if own.metrics_port and not _metrics_started:
        metrics.serve(port=own.metrics_port, address=own.metrics_address)
        _metrics_started = True
    metrics.set_build_info(version())
    logger.info("Lethe operator %s: trainer image %s, default store %s", version(), own.trainer_image,
                own.store_uri or "(none: lineages must set spec.store.uri)")


@kopf.index(API_GROUP, API_VERSION, LINEAGE_PLURAL)
def lineage_namespaces(name: str, namespace: str, **_: Any) -> dict[str, str]:
    """Index the watched lineages by name, so that a LineageNotFound message can name the namespaces that have one."""
    return {name: namespace}


def _reconciler(memo: kopf.Memo, index: kopf.Index) -> LineageReconciler:
    reconciler: LineageReconciler = memo.reconciler
    reconciler.lineage_namespaces = lambda name: list(index.get(name, ()))
    return reconciler


@kopf.on.event(API_GROUP, API_VERSION, REQUEST_PLURAL)
async def request_event(body: kopf.Body, namespace: str, memo: kopf.Memo, lineage_namespaces: kopf.Index,
                        **_: Any) -> None:
    lineage = request_lineage(body)
    if lineage:
        await _reconciler(memo, lineage_namespaces).poke(namespace=namespace, lineage=lineage,
                                                         handler="request_event")


@kopf.on.event(API_GROUP, API_VERSION, LINEAGE_PLURAL)
async def lineage_event(name: str, namespace: str, memo: kopf.Memo, lineage_namespaces: kopf.Index,
                        **_: Any) -> None:
    await _reconciler(memo, lineage_namespaces).poke(namespace=namespace, lineage=name, handler="lineage_event")


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_event(labels: kopf.Labels, namespace: str, memo: kopf.Memo, lineage_namespaces: kopf.Index,
                    **_: Any) -> None:
    lineage = labels.get(LABEL_LINEAGE)
    if lineage:
        await _reconciler(memo, lineage_namespaces).poke(namespace=namespace, lineage=lineage, handler="job_event")


@kopf.on.resume(API_GROUP, API_VERSION, REQUEST_PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, REQUEST_PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, REQUEST_PLURAL, field="spec")
def validate_request(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Reject an invalid UnlearnRequest spec for good; fixing the spec runs this again."""
    try:
        parse_request(body)
    except SpecError as error:
        raise kopf.PermanentError(f"invalid UnlearnRequest: {error}") from error
    logger.debug("UnlearnRequest spec is valid")


@kopf.on.resume(API_GROUP, API_VERSION, LINEAGE_PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, LINEAGE_PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, LINEAGE_PLURAL, field="spec")
def validate_lineage(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Reject an invalid ModelLineage spec for good; fixing the spec runs this again."""
    try:
        parse_lineage(body)
    except SpecError as error:
        raise kopf.PermanentError(f"invalid ModelLineage: {error}") from error
    logger.debug("ModelLineage spec is valid")

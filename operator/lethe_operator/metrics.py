"""Prometheus metrics of the operator, served on the metrics port (``--metrics-port``).

Every name starts with ``lethe_``. Labels are the lineage's ``namespace`` and
``lineage``, the unlearning ``method`` and a ``result``. A few metrics add one
label from a small fixed set (``phase``, ``handler``, ``version``). No series
has a request name, because requests are many and short-lived. Per-request
figures are in the request's status and in the store.

The gauges describe the state the last reconcile of each lineage saw; they are
rebuilt from the API and the store on every reconcile, so an operator restart
repopulates them. Counters and histograms count what this process observed
and restart from zero, as Prometheus counters do.

docs/operator.md lists the metrics for alert rules and dashboards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .decisions import REQUEST_PHASES

logger = logging.getLogger(__name__)

LINEAGE_LABELS = ("namespace", "lineage")

registry = CollectorRegistry(auto_describe=True)

requests = Gauge("lethe_requests", "UnlearnRequests of a lineage, by phase.",
                 (*LINEAGE_LABELS, "phase"), registry=registry)
gate_wait_seconds = Histogram(
    "lethe_gate_wait_seconds", "Seconds from a request's creation until it claimed its lineage's gate.",
    LINEAGE_LABELS, registry=registry,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400))
queue_depth = Gauge("lethe_lineage_queue_depth", "Requests waiting for the lineage's gate.",
                    LINEAGE_LABELS, registry=registry)
active = Gauge("lethe_lineage_active", "1 while a request holds the lineage's gate, else 0.",
               LINEAGE_LABELS, registry=registry)
halted = Gauge("lethe_lineage_halted", "1 while the lineage is halted (failed or collapsed step), else 0.",
               LINEAGE_LABELS, registry=registry)
collapsed = Gauge("lethe_lineage_collapsed", "1 while the lineage is halted because a step's model collapsed, else 0.",
                  LINEAGE_LABELS, registry=registry)
job_duration_seconds = Histogram(
    "lethe_job_duration_seconds", "Seconds from a trainer Job's start to its end.",
    (*LINEAGE_LABELS, "method", "result"), registry=registry,
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400))
job_restarts = Counter("lethe_job_restarts", "Failed trainer Pods of finished Jobs (each one was retried or ended the Job).",
                       (*LINEAGE_LABELS, "method"), registry=registry)
requests_finished = Counter(
    "lethe_requests_finished", "Requests that reached a final result: promoted, failed or collapsed.",
    (*LINEAGE_LABELS, "method", "result"), registry=registry)
reconcile_errors = Counter("lethe_reconcile_errors", "Reconciles that raised an error, by handler.",
                           ("handler",), registry=registry)
build_info = Gauge("lethe_build_info", "Always 1; the version label names the operator's version.",
                   ("version",), registry=registry)

# Figures of the step the lineage's head points at.
head_sequence = Gauge("lethe_head_sequence", "Sequence number of the head step (0 for theta_0).",
                      LINEAGE_LABELS, registry=registry)
_HEAD_FIGURES = {
    "forgetRouge1": ("lethe_head_forget_rouge1", "Mean ROUGE-1 of the head model on its last forgotten work."),
    "forgetRougeL": ("lethe_head_forget_rouge_l", "Mean ROUGE-L of the head model on its last forgotten work."),
    "previousRouge1": ("lethe_head_previous_rouge1", "Mean ROUGE-1 of the head model on earlier forgotten works."),
    "previousRougeL": ("lethe_head_previous_rouge_l", "Mean ROUGE-L of the head model on earlier forgotten works."),
    "retainRouge1": ("lethe_head_retain_rouge1", "Mean ROUGE-1 of the head model on the retain set."),
    "retainRougeL": ("lethe_head_retain_rouge_l", "Mean ROUGE-L of the head model on the retain set."),
    "perplexity": ("lethe_head_perplexity", "Held-out perplexity of the head model."),
    "accuracy": ("lethe_head_accuracy", "Multiple-choice accuracy of the head model."),
}
head_figures = {key: Gauge(name, text, LINEAGE_LABELS, registry=registry)
                for key, (name, text) in _HEAD_FIGURES.items()}

METRIC_NAMES = sorted(
    ["lethe_requests", "lethe_gate_wait_seconds", "lethe_lineage_queue_depth", "lethe_lineage_active",
     "lethe_lineage_halted", "lethe_lineage_collapsed", "lethe_job_duration_seconds", "lethe_job_restarts_total",
     "lethe_requests_finished_total", "lethe_reconcile_errors_total", "lethe_build_info", "lethe_head_sequence"]
    + [name for name, _ in _HEAD_FIGURES.values()])


def serve(*, port: int, address: str) -> None:
    """Start the HTTP endpoint that serves /metrics, in a daemon thread."""
    start_http_server(port, addr=address, registry=registry)
    logger.info("Serving metrics on http://%s:%d/metrics", address, port)


def set_build_info(version: str) -> None:
    build_info.labels(version=version).set(1)


def set_lineage_state(*, namespace: str, lineage: str, phase_counts: Mapping[str, int], queue: int,
                      is_active: bool, is_halted: bool, is_collapsed: bool) -> None:
    """Set a lineage's gauges from the state one reconcile saw."""
    for phase in REQUEST_PHASES:
        requests.labels(namespace, lineage, phase).set(phase_counts.get(phase, 0))
    queue_depth.labels(namespace, lineage).set(queue)
    active.labels(namespace, lineage).set(1 if is_active else 0)
    halted.labels(namespace, lineage).set(1 if is_halted else 0)
    collapsed.labels(namespace, lineage).set(1 if is_collapsed else 0)


def set_head(*, namespace: str, lineage: str, sequence: int, figures: Mapping[str, float]) -> None:
    """Set the head figures; a figure the head step lacks (such as accuracy without MMLU) is removed."""
    head_sequence.labels(namespace, lineage).set(sequence)
    for key, gauge in head_figures.items():
        if key in figures:
            gauge.labels(namespace, lineage).set(figures[key])
        else:
            try:
                gauge.remove(namespace, lineage)
            except KeyError:
                pass


def forget_lineage(*, namespace: str, lineage: str) -> None:
    """Remove a deleted lineage's series, so that dashboards stop showing it."""
    gauges = [queue_depth, active, halted, collapsed, head_sequence, *head_figures.values()]
    for gauge in gauges:
        try:
            gauge.remove(namespace, lineage)
        except KeyError:
            pass
    for phase in REQUEST_PHASES:
        try:
            requests.remove(namespace, lineage, phase)
        except KeyError:
            pass

"""Step metrics of one trainer run, logged and pushed to a Prometheus Pushgateway.

A trainer Job often lives only minutes, so a scrape could miss it, and it
pushes instead. Every optimizer step updates gauges (loss and its terms,
saliency mask density, gradient norm, learning rate, progress and ETA). A
background thread pushes the current values at most once every
``push_interval_seconds``, and ``finish`` pushes once more with the
evaluation figures and the run's result. Without a Pushgateway URL the same
values are only logged.

What this module does not promise:

- Delivery. A push that fails (gateway down, slow, or refusing) is logged as a
  warning, at most once per ``WARNING_INTERVAL_SECONDS``, and never raises
  into the step: monitoring must not cost a committed unlearning step.
- Every step reaching Prometheus. Pushes carry the latest values only, and
  Prometheus samples the Pushgateway at its own scrape interval, so short
  runs show a few points, not one per optimizer step.
- Cleanup. The pushed group (job="lethe-trainer", namespace, lineage,
  request) stays on the Pushgateway after the run so its final figures remain
  visible; deleting old groups is the operator's or the user's task. The
  request name is a label only on these pushed series, because each group
  belongs to one short-lived request.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

logger = logging.getLogger(__name__)

PUSHGATEWAY_URL_ENV = "LETHE_PUSHGATEWAY_URL"
PUSH_JOB = "lethe-trainer"
DEFAULT_PUSH_INTERVAL_SECONDS = 5.0
PUSH_TIMEOUT_SECONDS = 5.0
WARNING_INTERVAL_SECONDS = 60.0

# The figure sets of a step manifest and the ROUGE variants the evaluation reports.
FIGURE_SETS = ("forget", "previous", "retain", "forget_before")
ROUGE_VARIANTS = ("rouge1", "rougeL")

Pusher = Callable[..., None]

# Every gauge the trainer can push: name -> (help text, label names). Grouping labels (namespace,
# lineage, request) are added by the push, not here.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lethe_trainer_run_info": ("Constant 1; the labels describe the run", ("method",)),
    "lethe_trainer_sequence": ("Position of this step in its lineage's chain, from 1", ()),
    "lethe_trainer_start_time_seconds": ("Unix time the trainer run started", ()),
    "lethe_trainer_completion_time_seconds": (
        "Unix time the trainer run ended, by result (Committed, InvalidInput, StoreFailed, Failed)", ("result",)),
    "lethe_trainer_loss": ("Training loss of the last optimizer step: the weighted sum of its terms", ()),
    "lethe_trainer_forget_loss": ("Continuation cross-entropy on forget-set chunks in the last optimizer step", ()),
    "lethe_trainer_random_label_loss": (
        "Cross-entropy on random-label pairs in the last optimizer step (SSU only)", ()),
    "lethe_trainer_grad_norm": ("L2 norm of the adapter gradient in the last optimizer step", ()),
    "lethe_trainer_mask_density_ratio": (
        "Fraction of adapter elements the saliency mask let move in the last optimizer step (SSU only)", ()),
    "lethe_trainer_saliency_threshold": (
        "Gradient magnitude threshold of the saliency mask in the last optimizer step (SSU only)", ()),
    "lethe_trainer_learning_rate": ("Learning rate of the last optimizer step", ()),
    "lethe_trainer_optimizer_step": ("Optimizer steps done, from 1", ()),
    "lethe_trainer_optimizer_steps_planned": ("Optimizer steps the run will take", ()),
    "lethe_trainer_epoch": ("Epoch of the last optimizer step, from 1", ()),
    "lethe_trainer_progress_ratio": ("Optimizer steps done divided by the steps planned", ()),
    "lethe_trainer_eta_seconds": ("Estimated seconds of training left", ()),
    "lethe_trainer_evaluation_rouge_f1": (
        "Mean ROUGE F1 of sampled continuations on a chunk set after the step "
        "(set=forget_before: the forget set before the step)", ("set", "rouge")),
    "lethe_trainer_evaluation_rouge_f1_ci_low": (
        "Lower bound of the bootstrap interval of lethe_trainer_evaluation_rouge_f1", ("set", "rouge")),
    "lethe_trainer_evaluation_rouge_f1_ci_high": (
        "Upper bound of the bootstrap interval of lethe_trainer_evaluation_rouge_f1", ("set", "rouge")),
    "lethe_trainer_evaluation_chunks": ("Chunks scored in a set", ("set",)),
    "lethe_trainer_evaluation_perplexity": ("Held-out perplexity after the step", ()),
    "lethe_trainer_evaluation_accuracy_ratio": ("Multiple-choice accuracy after the step, from 0 to 1", ()),
}

# Per-step gauges filled straight from the trainer's metrics dict: gauge name -> dict key.
STEP_GAUGES = {
    "lethe_trainer_loss": "loss",
    "lethe_trainer_forget_loss": "forget_loss",
    "lethe_trainer_random_label_loss": "random_label_loss",
    "lethe_trainer_grad_norm": "grad_norm",
    "lethe_trainer_mask_density_ratio": "mask_density",
    "lethe_trainer_saliency_threshold": "saliency_threshold",
    "lethe_trainer_learning_rate": "learning_rate",
    "lethe_trainer_optimizer_step": "step",
    "lethe_trainer_optimizer_steps_planned": "total_steps",
    "lethe_trainer_epoch": "epoch",
    "lethe_trainer_eta_seconds": "eta_seconds",
}


def pushgateway_url_from_environment() -> str | None:
    """Return $LETHE_PUSHGATEWAY_URL, or None when it is unset or empty."""
    return os.environ.get(PUSHGATEWAY_URL_ENV) or None


def check_pushgateway_url(url: str) -> str | None:
    """Return why URL cannot address a Pushgateway, or None when it can."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        return "expected http://HOST:PORT or https://HOST:PORT"
    if not parsed.hostname:
        return "has no host"
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        return "must not have a path, query or fragment; the push path is added by the trainer"
    return None


class _RateLimitedWarning:
    """Log a repeated failure once, then at most once per interval with a count of the ones skipped."""

    def __init__(self, *, interval_seconds: float, clock: Callable[[], float]) -> None:
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.last_logged: float | None = None
        self.skipped = 0

    def failed(self, message: str, *args: Any) -> None:
        now = self.clock()
        if self.last_logged is not None and now - self.last_logged < self.interval_seconds:
            self.skipped += 1
            return
        if self.skipped:
            message += " (%d more push failures since the last warning)"
            args = (*args, self.skipped)
        logger.warning(message, *args)
        self.last_logged = now
        self.skipped = 0

    def recovered(self, message: str, *args: Any) -> None:
        if self.last_logged is not None:
            logger.info(message, *args)
        self.last_logged = None
        self.skipped = 0


class TrainerMetrics:
    """The gauges of one request's trainer run and the pushes that carry them.

    Call ``start`` before training, pass ``record_step`` as the trainer's
    per-step callback, ``record_figures`` with the committed manifest's
    figures, and ``finish`` exactly once at the end, also when the run fails.
    """

    def __init__(self, *, namespace: str, lineage: str, request: str, method: str, sequence: int,
                 pushgateway_url: str | None,
                 push_interval_seconds: float = DEFAULT_PUSH_INTERVAL_SECONDS,
                 push_timeout_seconds: float = PUSH_TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 pusher: Pusher = push_to_gateway) -> None:
        self.request = request
        self.grouping_key = {"namespace": namespace, "lineage": lineage, "request": request}
        self.push_interval_seconds = push_interval_seconds
        self.push_timeout_seconds = push_timeout_seconds
        self.pusher = pusher
        self.pushgateway_url = self._usable_url(pushgateway_url)
        self.pushes = 0
        self.push_failures = 0

        self._warning = _RateLimitedWarning(interval_seconds=WARNING_INTERVAL_SECONDS, clock=clock)
        self._push_lock = threading.Lock()  # one push at a time, so a final push never races a periodic one
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False

        self.registry = CollectorRegistry(auto_describe=True)
        self._gauges: dict[str, Gauge] = {}
        self._set("lethe_trainer_run_info", 1, method=method)
        self._set("lethe_trainer_sequence", sequence)
        self._set("lethe_trainer_start_time_seconds", time.time())

    # -- setup ------------------------------------------------------------

    def _usable_url(self, url: str | None) -> str | None:
        if not url:
            logger.info("No Pushgateway configured (set %s or --pushgateway-url); step metrics are only logged",
                        PUSHGATEWAY_URL_ENV)
            return None
        problem = check_pushgateway_url(url)
        if problem is not None:
            logger.warning("Pushgateway URL %r is invalid: %s; step metrics are only logged. Fix %s or "
                           "--pushgateway-url", url, problem, PUSHGATEWAY_URL_ENV)
            return None
        return url.rstrip("/")

    def _gauge(self, name: str) -> Gauge:
        # Gauges are registered on first use: an unlabelled gauge is exported as 0 from the moment it
        # exists, and a 0 accuracy or loss before the value is known would read as a real figure.
        gauge = self._gauges.get(name)
        if gauge is None:
            documentation, labels = GAUGES[name]
            gauge = Gauge(name, documentation, labels, registry=self.registry)
            self._gauges[name] = gauge
        return gauge

    def _set(self, name: str, value: Any, **labels: str) -> None:
        """Set gauge NAME (with LABELS) to VALUE; None and non-finite values leave it unset."""
        if value is None or not math.isfinite(float(value)):
            return
        gauge = self._gauge(name)
        (gauge.labels(**labels) if labels else gauge).set(float(value))

    # -- recording --------------------------------------------------------

    def start(self) -> None:
        """Start the background pusher (no-op without a Pushgateway)."""
        if self.pushgateway_url is None or self._thread is not None:
            return
        logger.info("Pushing step metrics of %s to %s every %.0fs", self.request, self.pushgateway_url,
                    self.push_interval_seconds)
        self._thread = threading.Thread(target=self._push_periodically, name="lethe-metrics-push", daemon=True)
        self._thread.start()

    def record_step(self, metrics: Mapping[str, Any]) -> None:
        """Log one optimizer step's metrics and set the gauges; the background thread pushes them."""
        try:
            self._record_step(metrics)
        except Exception:  # noqa: BLE001 - monitoring must never fail the run
            logger.warning("Recording the step metrics %r of %s failed; training continues", dict(metrics),
                           self.request, exc_info=True)

    def _record_step(self, metrics: Mapping[str, Any]) -> None:
        logger.info("step %d/%d of %s: loss %.4f mask density %s grad norm %.3g eta %.0fs",
                    metrics["step"], metrics["total_steps"], self.request, metrics["loss"],
                    f"{metrics['mask_density']:.4f}" if "mask_density" in metrics else "n/a",
                    metrics["grad_norm"], metrics["eta_seconds"])
        total_steps = metrics["total_steps"]
        for name, key in STEP_GAUGES.items():
            # Keys missing for a method (the SSU-only terms) leave their gauges absent rather than 0.
            self._set(name, metrics.get(key))
        self._set("lethe_trainer_progress_ratio", metrics["step"] / total_steps if total_steps else None)
        self._dirty.set()

    def record_figures(self, figures: Mapping[str, Any]) -> None:
        """Set the evaluation gauges from a step manifest's ``figures`` and log them."""
        try:
            self._record_figures(figures)
        except Exception:  # noqa: BLE001 - the step is already committed; monitoring must not fail it
            logger.warning("Recording the evaluation figures of %s failed; they are still in the step manifest",
                           self.request, exc_info=True)

    def _record_figures(self, figures: Mapping[str, Any]) -> None:
        for set_name in FIGURE_SETS:
            entry = figures.get(set_name)
            if not entry:
                continue
            for variant in ROUGE_VARIANTS:
                if variant not in entry:
                    continue
                scores = entry[variant]
                self._set("lethe_trainer_evaluation_rouge_f1", scores.get("mean"), set=set_name, rouge=variant)
                self._set("lethe_trainer_evaluation_rouge_f1_ci_low", scores.get("ci_low"), set=set_name,
                          rouge=variant)
                self._set("lethe_trainer_evaluation_rouge_f1_ci_high", scores.get("ci_high"), set=set_name,
                          rouge=variant)
            self._set("lethe_trainer_evaluation_chunks", entry.get("chunks"), set=set_name)
        perplexity = (figures.get("held_out") or {}).get("perplexity")
        self._set("lethe_trainer_evaluation_perplexity", perplexity)
        accuracy = (figures.get("accuracy") or {}).get("accuracy")
        self._set("lethe_trainer_evaluation_accuracy_ratio", accuracy)

        def rouge_l(set_name: str) -> str:
            entry = figures.get(set_name)
            return f"{entry['rougeL']['mean']:.3f}" if entry and "rougeL" in entry else "n/a"

        logger.info("figures of %s: ROUGE-L forget %s (before %s), previous %s, retain %s; perplexity %s; "
                    "accuracy %s", self.request, rouge_l("forget"), rouge_l("forget_before"), rouge_l("previous"),
                    rouge_l("retain"), "n/a" if perplexity is None else f"{perplexity:.2f}",
                    "n/a" if accuracy is None else f"{accuracy:.3f}")

    def finish(self, *, result: str) -> None:
        """Stop the background pusher and push the final values with the run's RESULT; never raises."""
        if self._finished:
            return
        self._finished = True
        try:
            self._set("lethe_trainer_completion_time_seconds", time.time(), result=result)
            self._stop.set()
            self._dirty.set()
            if self._thread is not None:
                self._thread.join(timeout=self.push_timeout_seconds + 1.0)
            if self.pushgateway_url is None:
                return
            if self.push():
                logger.info("Pushed the final metrics of %s (%s) to %s: %d pushes, %d failed", self.request,
                            result, self.pushgateway_url, self.pushes, self.push_failures)
            else:
                logger.warning("Pushing the final metrics of %s (%s) to %s failed: %d pushes, %d failed; the "
                               "figures are still in the step manifest", self.request, result,
                               self.pushgateway_url, self.pushes, self.push_failures)
        except Exception:  # noqa: BLE001 - monitoring must never fail the run
            logger.warning("Finishing the step metrics of %s failed; the step result is unaffected", self.request,
                           exc_info=True)

    # -- pushing ----------------------------------------------------------

    def push(self) -> bool:
        """Push the current values now; return whether the Pushgateway accepted them."""
        if self.pushgateway_url is None:
            return False
        with self._push_lock:
            try:
                self.pusher(self.pushgateway_url, job=PUSH_JOB, registry=self.registry,
                            grouping_key=self.grouping_key, timeout=self.push_timeout_seconds)
            except Exception as error:  # noqa: BLE001 - any push failure is only a warning
                self.push_failures += 1
                self._warning.failed("Pushing step metrics of %s to %s failed: %s; training continues. Check "
                                     "that the Pushgateway is up and that %s is right",
                                     self.request, self.pushgateway_url, error, PUSHGATEWAY_URL_ENV)
                return False
            self.pushes += 1
            self._warning.recovered("Pushing step metrics of %s to %s works again", self.request, self.pushgateway_url)
            return True

    def _push_periodically(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            started = time.monotonic()
            self.push()
            # Waiting out the rest of the interval caps the push rate however fast steps come.
            self._stop.wait(max(0.0, self.push_interval_seconds - (time.monotonic() - started)))

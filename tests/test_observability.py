"""Metrics, alert rules and dashboard queries, against a real Prometheus and Pushgateway.

The unmarked tests check the trainer's metrics object with a fake pusher,
the dashboard's structure, and that a real tiny step with a dead Pushgateway
still commits. The tests marked ``prometheus`` start Debian's Prometheus and
Pushgateway on loopback (scripts/install-prometheus.sh installs them, and
the tests skip without them) and check that:

- two real tiny trainer steps push their step metrics and final figures, and
  Prometheus scrapes them from the Pushgateway with plausible values;
- Prometheus scrapes the operator's metrics registry, served in-process on a
  loopback port, and the operator's and the pushed expositions pass
  ``promtool check metrics``;
- the rules file and the shipped config pass ``promtool check``, and the
  rules' unit tests (``promtool test rules``) pass;
- every PromQL expression of the rules and the dashboard runs without error
  and returns at least one series. The data comes from the trainer pushes
  and from calling the operator's metric functions directly
  (``operator_state``). ``absent()`` alerts are the exception, because they
  return a series only while no operator target exists.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lethe_trainer import job
from lethe_trainer.metrics import GAUGES, PUSH_JOB, TrainerMetrics, check_pushgateway_url
from lethe_trainer.spec import parse_lineage
from lethe_trainer.step import initialise_lineage
from lethe_trainer.store import open_lineage_store

from prometheus_client import start_http_server

from lethe_operator import metrics as operator_metrics
from tests.support.prometheus import (Binaries, Prometheus, Pushgateway, ScrapeTarget, find_binaries, free_port,
                                      http_get, run_promtool, sample_values)
from tests.support.tiny_model import make_tiny_model

REPOSITORY = Path(__file__).resolve().parents[1]
RULES_FILE = REPOSITORY / "charts" / "lethe" / "files" / "lethe-rules.yaml"
RULES_TEST_FILE = REPOSITORY / "monitoring" / "rules-tests" / "lethe-rules-test.yaml"
DASHBOARD_FILE = REPOSITORY / "charts" / "lethe" / "dashboards" / "lethe.json"
PROMETHEUS_CONFIG = REPOSITORY / "monitoring" / "prometheus.yml"

NAMESPACE = "observability"
LINEAGE = "tiny"
REQUEST = "forget-one"
SECOND_REQUEST = "forget-two"
HALTED_LINEAGE = "halted"


# ---------------------------------------------------------------------------
# Trainer metrics object, with a fake pusher.


class RecordingPusher:
    """Stands in for prometheus_client.push_to_gateway; records calls or raises a given error."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, gateway: str, *, job: str, registry, grouping_key: dict[str, str], timeout: float) -> None:
        with self.lock:
            self.calls.append({"gateway": gateway, "job": job, "grouping_key": dict(grouping_key),
                               "samples": _samples(registry)})
        if self.error is not None:
            raise self.error


def _samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() for sample in family.samples}


def _step_metrics(step: int, *, total: int = 10, ssu: bool = True) -> dict[str, Any]:
    metrics = {"step": step, "total_steps": total, "epoch": 1, "loss": 2.5, "forget_loss": 2.0, "grad_norm": 0.7,
               "learning_rate": 1e-3, "eta_seconds": 3.0 * (total - step)}
    if ssu:
        metrics.update(random_label_loss=0.5, mask_density=0.12, saliency_threshold=1e-4)
    return metrics


def _metrics(pusher, *, url: str | None = "http://127.0.0.1:9", **options) -> TrainerMetrics:
    return TrainerMetrics(namespace=NAMESPACE, lineage=LINEAGE, request=REQUEST, method="SSU", sequence=3,
                          pushgateway_url=url, pusher=pusher, **options)


def test_push_rate_capped_by_interval():
    pusher = RecordingPusher()
    telemetry = _metrics(pusher, push_interval_seconds=0.5)
    telemetry.start()
    started = time.monotonic()
    for step in range(1, 201):
        telemetry.record_step(_step_metrics(step, total=200))
        time.sleep(0.005)
    elapsed = time.monotonic() - started
    telemetry.finish(result="Committed")

    # One push per started interval plus the final one.
    assert len(pusher.calls) <= int(elapsed / 0.5) + 2
    assert len(pusher.calls) >= 2
    final = pusher.calls[-1]
    assert final["job"] == PUSH_JOB
    assert final["grouping_key"] == {"namespace": NAMESPACE, "lineage": LINEAGE, "request": REQUEST}
    assert final["samples"][("lethe_trainer_optimizer_step", ())] == 200
    assert final["samples"][("lethe_trainer_progress_ratio", ())] == 1.0
    assert ("lethe_trainer_completion_time_seconds", (("result", "Committed"),)) in final["samples"]


def test_unknown_values_stay_absent():
    pusher = RecordingPusher()
    telemetry = _metrics(pusher)
    before = {name for name, _ in _samples(telemetry.registry)}
    assert "lethe_trainer_loss" not in before
    assert "lethe_trainer_evaluation_accuracy_ratio" not in before
    assert "lethe_trainer_run_info" in before

    telemetry.record_step(_step_metrics(1, ssu=False))
    after = {name for name, _ in _samples(telemetry.registry)}
    assert "lethe_trainer_loss" in after
    assert "lethe_trainer_mask_density_ratio" not in after
    assert "lethe_trainer_random_label_loss" not in after


def test_figures_set_rouge_and_skip_nan():
    telemetry = _metrics(RecordingPusher())
    rouge = {"mean": 0.25, "ci_low": 0.2, "ci_high": 0.3}
    telemetry.record_figures({
        "forget": {"rouge1": rouge, "rougeL": rouge, "chunks": 2},
        "previous": None,
        "retain": {"rouge1": {"mean": float("nan"), "ci_low": 0.0, "ci_high": 0.0}, "rougeL": rouge, "chunks": 2},
        "forget_before": {"rouge1": rouge, "rougeL": rouge, "chunks": 2},
        "held_out": {"perplexity": 12.5},
    })
    samples = _samples(telemetry.registry)
    assert samples[("lethe_trainer_evaluation_rouge_f1", (("rouge", "rougeL"), ("set", "forget")))] == 0.25
    assert samples[("lethe_trainer_evaluation_rouge_f1_ci_high", (("rouge", "rouge1"), ("set", "forget_before")))] == 0.3
    assert ("lethe_trainer_evaluation_rouge_f1", (("rouge", "rouge1"), ("set", "retain"))) not in samples
    assert not any(labels and dict(labels).get("set") == "previous" for _, labels in samples)
    assert samples[("lethe_trainer_evaluation_perplexity", ())] == 12.5
    assert ("lethe_trainer_evaluation_accuracy_ratio", ()) not in samples


def test_push_failures_warn_once_per_interval(caplog):
    now = [0.0]
    pusher = RecordingPusher(error=OSError("connection refused"))
    telemetry = _metrics(pusher, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="lethe_trainer.metrics"):
        for _ in range(5):
            assert telemetry.push() is False
            now[0] += 1.0
        now[0] += 60.0
        assert telemetry.push() is False

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "connection refused" in warnings[0]
    assert "4 more push failures" in warnings[1]
    assert telemetry.push_failures == 6


def test_failing_pusher_never_raises_from_finish():
    telemetry = _metrics(RecordingPusher(error=RuntimeError("gateway exploded")), push_interval_seconds=0.1)
    telemetry.start()
    telemetry.record_step(_step_metrics(1))
    telemetry.finish(result="Failed")
    telemetry.finish(result="Failed")  # a second call is a no-op
    assert telemetry.pushes == 0
    assert telemetry.push_failures >= 1


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:9091", None),
    ("https://pushgateway.monitoring:9091/", None),
    ("127.0.0.1:9091", "expected http"),
    ("http://127.0.0.1:9091/metrics/job/x", "must not have a path"),
    ("http://:9091", "has no host"),
])
def test_pushgateway_url_check(url, problem):
    found = check_pushgateway_url(url)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_invalid_url_only_logs(caplog):
    pusher = RecordingPusher()
    with caplog.at_level(logging.WARNING, logger="lethe_trainer.metrics"):
        telemetry = _metrics(pusher, url="pushgateway:9091")
    telemetry.start()
    telemetry.record_step(_step_metrics(1))
    telemetry.finish(result="Committed")
    assert pusher.calls == []
    assert any("'pushgateway:9091' is invalid" in r.getMessage() for r in caplog.records)


def test_gauge_names_follow_conventions():
    for name, (documentation, labels) in GAUGES.items():
        assert re.fullmatch(r"lethe_trainer_[a-z0-9_]+", name), name
        assert not name.endswith("_total"), f"{name}: _total is reserved for counters"
        assert documentation, name
        assert not {"job", "instance", "namespace", "lineage", "request"} & set(labels), name


# ---------------------------------------------------------------------------
# A tiny lineage and a real trainer step.

WORDS = ("amber basalt cedar delta ember fjord garnet heron indigo jasper kestrel lichen mistral nettle opal "
         "quartz raven sorrel tundra umber").split()


def _write_work(path: Path, seed: int, words: int = 600) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
    path.write_text(" ".join(WORDS[i] for i in picks) + "\n", encoding="utf-8")
    return path.as_uri()


class TinyLineage:
    """A tiny model, two works and an initialised file:// store, with resources for ``lethe-trainer step``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        model = make_tiny_model(root / "model")
        retain = _write_work(root / "retain.txt", seed=2)
        self.forget_uris = [_write_work(root / "forget-1.txt", seed=1), _write_work(root / "forget-2.txt", seed=3)]
        self.lineage = {
            "apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage",
            "metadata": {"name": LINEAGE, "namespace": NAMESPACE},
            "spec": {
                "baseModel": {"uri": model.as_uri()},
                "retain": {"works": [{"uri": retain}]},
                "heldOut": {"uri": retain},
                "evaluation": {"forgetChunks": 2, "previousChunks": 2, "retainChunks": 2, "promptTokens": 16,
                               "continuationTokens": 16, "maxNewTokens": 8, "perplexityTokens": 64,
                               "bootstrapSamples": 100},
            },
        }
        self.store_uri = (root / "store").as_uri()
        store = open_lineage_store(self.store_uri, namespace=NAMESPACE, lineage=LINEAGE, create=True)
        initialise_lineage(parse_lineage(self.lineage), store, show_progress=False)

    def request(self, name: str) -> dict[str, Any]:
        forget_uri = self.forget_uris[0] if name == REQUEST else self.forget_uris[1]
        return {
            "apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"lineageRef": {"name": LINEAGE}, "forget": {"uri": forget_uri},
                     "method": {"name": "SSU", "maxChunks": 2, "learningRate": 1e-2, "loraRank": 2, "loraAlpha": 4}},
        }

    def run_step(self, request_name: str, step_id: str, *, pushgateway_url: str, monkeypatch: pytest.MonkeyPatch,
                 sequence: int = 1, parent_step_id: str | None = None) -> tuple[int, dict[str, Any]]:
        """Run ``lethe-trainer step`` in this process; return its exit code and termination message."""
        termination_log = self.root / f"termination-{step_id}"
        monkeypatch.setenv("LETHE_TERMINATION_LOG", str(termination_log))
        arguments = ["step", "--lineage", json.dumps(self.lineage), "--request", json.dumps(self.request(request_name)),
                     "--store", self.store_uri, "--step-id", step_id, "--sequence", str(sequence), "--no-progress",
                     "--pushgateway-url", pushgateway_url]
        if parent_step_id is not None:
            arguments += ["--parent-step-id", parent_step_id]
        code = job.main(arguments)
        return code, json.loads(termination_log.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_lineage(tmp_path_factory) -> TinyLineage:
    return TinyLineage(tmp_path_factory.mktemp("observability"))


# ---------------------------------------------------------------------------
# Real Prometheus and Pushgateway.


@pytest.fixture(scope="module")
def binaries() -> Binaries:
    found = find_binaries()
    if found is None:
        pytest.skip("prometheus, promtool or prometheus-pushgateway not on PATH; run scripts/install-prometheus.sh")
    return found


@pytest.fixture(scope="module")
def pushgateway(binaries):
    server = Pushgateway(binary=binaries.pushgateway)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class OperatorEndpoint:
    """The operator's metrics registry served on a loopback port, as ``lethe-operator`` serves it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=operator_metrics.registry)

    def metrics_text(self) -> str:
        return http_get(f"http://{self.address}/metrics").decode("utf-8")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def operator_endpoint():
    endpoint = OperatorEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture(scope="module")
def prometheus(binaries, pushgateway, operator_endpoint):
    # A second lethe-operator target where nothing listens stands for a crashed replica, so the
    # operator-down expression has a series to return.
    targets = [ScrapeTarget("lethe-operator", [operator_endpoint.address, f"127.0.0.1:{free_port()}"]),
               ScrapeTarget("pushgateway", [pushgateway.address], honor_labels=True)]
    server = Prometheus(binary=binaries.prometheus, rule_files=[RULES_FILE], targets=targets)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pushed_steps(tiny_lineage, pushgateway, prometheus) -> list[dict[str, Any]]:
    """Two real tiny steps of one lineage pushed to the Pushgateway; returns their termination messages."""
    messages = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        for sequence, (request, parent) in enumerate([(REQUEST, None), (SECOND_REQUEST, "0001-" + REQUEST)], 1):
            code, message = tiny_lineage.run_step(request, f"{sequence:04d}-{request}", sequence=sequence,
                                                  parent_step_id=parent, pushgateway_url=pushgateway.url,
                                                  monkeypatch=monkeypatch)
            assert code == 0, message
            messages.append(message)
    return messages


@pytest.fixture(scope="module")
def operator_state(operator_endpoint, prometheus, pushed_steps) -> None:
    """Drive the operator's metric functions into a state where every rule and panel has a series.

    LINEAGE is collapsed (so also halted) with two requests queued and none finished; HALTED_LINEAGE is
    halted after failed requests. Counters and histograms are created at zero, scraped once, then
    increased, so that increase() and rate() see a change.
    """
    second = pushed_steps[1]
    operator_metrics.set_build_info("0.0.0-test")
    operator_metrics.set_lineage_state(namespace=NAMESPACE, lineage=LINEAGE,
                                       phase_counts={"Queued": 2, "Succeeded": 1, "Failed": 1}, queue=2,
                                       is_active=False, is_halted=True, is_collapsed=True)
    operator_metrics.set_lineage_state(namespace=NAMESPACE, lineage=HALTED_LINEAGE,
                                       phase_counts={"Running": 1, "Failed": 2}, queue=0, is_active=True,
                                       is_halted=True, is_collapsed=False)
    operator_metrics.set_head(namespace=NAMESPACE, lineage=LINEAGE, sequence=2, figures={
        "forgetRouge1": second["forgetRougeL"], "forgetRougeL": second["forgetRougeL"],
        "previousRouge1": second["previousRougeL"], "previousRougeL": second["previousRougeL"],
        "retainRouge1": second["retainRougeL"], "retainRougeL": second["retainRougeL"],
        "perplexity": second["perplexity"], "accuracy": 0.25})

    restarts = operator_metrics.job_restarts.labels(NAMESPACE, HALTED_LINEAGE, "SSU")
    failed = operator_metrics.requests_finished.labels(NAMESPACE, HALTED_LINEAGE, "SSU", "failed")
    errors = operator_metrics.reconcile_errors.labels("lineage_event")
    for counter in (restarts, failed, errors):
        counter.inc(0)
    gate_wait = operator_metrics.gate_wait_seconds.labels(NAMESPACE, LINEAGE)
    job_duration = operator_metrics.job_duration_seconds.labels(NAMESPACE, HALTED_LINEAGE, "SSU", "failed")
    gate_wait.observe(0)
    job_duration.observe(0)
    prometheus.wait_for(f'lethe_reconcile_errors_total{{job="lethe-operator", handler="lineage_event"}}')
    time.sleep(prometheus.scrape_interval_seconds * 1.5)  # a second zero-valued sample before the rise

    restarts.inc(3)
    failed.inc(2)
    errors.inc(100)
    gate_wait.observe(42)
    job_duration.observe(300)
    prometheus.wait_for(f'lethe_job_restarts_total{{lineage="{HALTED_LINEAGE}"}} >= 3')


def _selector(name: str, *, request: str = REQUEST, **labels: str) -> str:
    matchers = {"namespace": NAMESPACE, "lineage": LINEAGE, "request": request, **labels}
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in matchers.items()) + "}"


@pytest.mark.prometheus
def test_trainer_step_metrics_reach_prometheus(pushed_steps, prometheus):
    first = pushed_steps[0]
    assert first["result"] == "Committed"
    prometheus.wait_for(_selector("lethe_trainer_completion_time_seconds", result="Committed"))

    loss = prometheus.query(_selector("lethe_trainer_loss"))
    assert len(loss) == 1
    assert loss[0]["metric"]["job"] == PUSH_JOB
    assert sample_values(loss)[0] > 0

    density = sample_values(prometheus.query(_selector("lethe_trainer_mask_density_ratio")))
    assert len(density) == 1
    assert 0 < density[0] < 1

    for name in ("lethe_trainer_forget_loss", "lethe_trainer_random_label_loss", "lethe_trainer_grad_norm"):
        values = sample_values(prometheus.query(_selector(name)))
        assert len(values) == 1, name
        assert values[0] > 0, name
    assert sample_values(prometheus.query(_selector("lethe_trainer_progress_ratio"))) == [1.0]
    assert sample_values(prometheus.query(_selector("lethe_trainer_learning_rate"))) == [pytest.approx(1e-2)]
    assert sample_values(prometheus.query(_selector("lethe_trainer_eta_seconds"))) == [0.0]
    assert sample_values(prometheus.query(_selector("lethe_trainer_sequence"))) == [1.0]
    info = prometheus.query(_selector("lethe_trainer_run_info"))
    assert info[0]["metric"]["method"] == "SSU"


@pytest.mark.prometheus
def test_trainer_figures_reach_prometheus(pushed_steps, prometheus):
    for request, message in zip((REQUEST, SECOND_REQUEST), pushed_steps):
        prometheus.wait_for(_selector("lethe_trainer_completion_time_seconds", request=request, result="Committed"))
        rouge = prometheus.query(_selector("lethe_trainer_evaluation_rouge_f1", request=request))
        found = {(series["metric"]["set"], series["metric"]["rouge"]) for series in rouge}
        sets = ("forget", "retain", "forget_before") if request == REQUEST else \
            ("forget", "previous", "retain", "forget_before")  # the first step has no earlier works
        assert found == {(s, r) for s in sets for r in ("rouge1", "rougeL")}, request
        assert all(0 <= value <= 1 for value in sample_values(rouge)), request

        forget = prometheus.query(_selector("lethe_trainer_evaluation_rouge_f1", request=request, set="forget",
                                            rouge="rougeL"))
        assert sample_values(forget) == [pytest.approx(message["forgetRougeL"], abs=1e-4)], request
        perplexity = sample_values(prometheus.query(_selector("lethe_trainer_evaluation_perplexity",
                                                              request=request)))
        assert perplexity == [pytest.approx(message["perplexity"])], request
        chunks = sample_values(prometheus.query(_selector("lethe_trainer_evaluation_chunks", request=request,
                                                          set="forget")))
        assert chunks == [2.0], request


def test_dead_pushgateway_does_not_fail_step(tiny_lineage, monkeypatch, caplog):
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="lethe_trainer.metrics"):
        code, message = tiny_lineage.run_step("forget-dead-gateway", "0001-dead-gateway", pushgateway_url=dead_url,
                                              monkeypatch=monkeypatch)
    assert code == 0
    assert message["result"] == "Committed"
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(dead_url in text and "failed" in text for text in failures), failures


@pytest.mark.prometheus
def test_pushed_metrics_pass_promtool(pushed_steps, pushgateway, binaries):
    # The gateway's own families (go_*, process_*, pushgateway_*, push_time_seconds) are not ours to check.
    text = _families(pushgateway.metrics_text(), prefix="lethe_trainer_")
    assert "lethe_trainer_loss{" in text
    checked = run_promtool(binaries, "check", "metrics", input_text=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout
    assert checked.stderr.strip() == "", checked.stderr


@pytest.mark.prometheus
def test_operator_metrics_pass_promtool(operator_state, operator_endpoint, binaries):
    text = operator_endpoint.metrics_text()
    assert "lethe_lineage_queue_depth{" in text
    checked = run_promtool(binaries, "check", "metrics", input_text=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout
    assert checked.stderr.strip() == "", checked.stderr


def _families(exposition: str, *, prefix: str) -> str:
    """Return the lines of the text exposition that belong to metric families named PREFIX*."""
    kept = []
    for line in exposition.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            name = line.split(" ", 3)[2]
        else:
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name.startswith(prefix):
            kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.mark.prometheus
def test_prometheus_scrapes_operator(operator_state, operator_endpoint, prometheus):
    build = prometheus.wait_for('lethe_build_info{job="lethe-operator"}')
    assert build[0]["metric"]["instance"] == operator_endpoint.address
    assert build[0]["metric"]["version"] == "0.0.0-test"
    queue = prometheus.query(f'lethe_lineage_queue_depth{{namespace="{NAMESPACE}", lineage="{LINEAGE}"}}')
    assert sample_values(queue) == [2.0]
    collapsed = prometheus.query(f'lethe_lineage_collapsed{{namespace="{NAMESPACE}", lineage="{LINEAGE}"}}')
    assert sample_values(collapsed) == [1.0]
    head = prometheus.query(f'lethe_head_sequence{{namespace="{NAMESPACE}", lineage="{LINEAGE}"}}')
    assert sample_values(head) == [2.0]
    up = {series["metric"]["instance"]: float(series["value"][1])
          for series in prometheus.query('up{job="lethe-operator"}')}
    assert up[operator_endpoint.address] == 1.0
    assert sorted(up.values()) == [0.0, 1.0]


# ---------------------------------------------------------------------------
# Rules and dashboard expressions.

# Grafana's built-in variables and the dashboard's own, as a user selecting this test's data would set them.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "1m",
                       "$namespace": NAMESPACE, "$lineage": ".*"}
# absent() returns a series only when nothing matches, which a live operator prevents; promtool tests cover it.
EXPRESSIONS_WITHOUT_LIVE_SERIES = {"LetheOperatorAbsent"}


def _rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def _dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    expressions = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions[f"panel {panel['title']!r} query {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # label_values(SELECTOR, LABEL) is Grafana's; the series it reads come from SELECTOR.
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, f"variable {variable['name']}: unexpected query {variable['query']['query']!r}"
        expressions[f"variable {variable['name']}"] = match.group(1)
    return expressions


def _substitute(expression: str) -> str:
    for name in sorted(DASHBOARD_VARIABLES, key=len, reverse=True):
        expression = expression.replace(name, DASHBOARD_VARIABLES[name])
    assert "$" not in expression, f"unsubstituted variable in {expression!r}"
    return expression


def test_dashboard_has_rows_and_variables():
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Queue and gate", "Lineage trajectories", "Live training (trainer push)", "Job failures"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["namespace"]["query"]["query"].startswith("label_values(")
    assert variables["lineage"]["query"]["query"].startswith("label_values(")
    assert "$namespace" in variables["lineage"]["query"]["query"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.prometheus
def test_rules_file_passes_promtool_check(binaries):
    checked = run_promtool(binaries, "check", "rules", str(RULES_FILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.prometheus
def test_shipped_config_passes_promtool_check(binaries):
    checked = run_promtool(binaries, "check", "config", str(PROMETHEUS_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.prometheus
def test_rules_unit_tests_pass(binaries):
    tested = run_promtool(binaries, "test", "rules", str(RULES_TEST_FILE), cwd=RULES_TEST_FILE.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.mark.prometheus
def test_every_expression_returns_series(operator_state, prometheus):
    expressions = {f"rule {name}": expr for name, expr in _rule_expressions().items()}
    expressions.update(_dashboard_expressions())
    assert len(expressions) > 30
    # The rules were loaded by Prometheus itself: a parse error would have kept it from starting.
    loaded = {rule["name"] for group in prometheus.rule_groups() for rule in group["rules"]}
    assert loaded == set(_rule_expressions())

    empty = []
    for where, expression in expressions.items():
        result = prometheus.query(_substitute(expression))  # raises PrometheusError on a bad expression
        if not result and where.removeprefix("rule ") not in EXPRESSIONS_WITHOUT_LIVE_SERIES:
            empty.append(f"{where}: {expression}")
    assert empty == []

"""The local runner's planning: grouping by lineage, gate order and input checks before any work."""

from __future__ import annotations

import datetime

import pytest

from lethe_trainer.runner import plan_lineages, requests_of
from lethe_trainer.spec import SpecError


def lineage(name: str, namespace: str = "default") -> dict:
    return {"apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"baseModel": {"uri": "demo:smollm2-135m-instruct"}}}


def request(name: str, lineage_name: str, *, namespace: str = "default", uri: str = "demo:emma",
            created=None) -> dict:
    metadata = {"name": name, "namespace": namespace}
    if created is not None:
        metadata["creationTimestamp"] = created
    return {"apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest", "metadata": metadata,
            "spec": {"lineageRef": {"name": lineage_name}, "forget": {"uri": uri}}}


def test_same_lineage_name_in_two_namespaces_stays_apart():
    lineages, requests = plan_lineages([
        lineage("tiny", "team-a"), lineage("tiny", "team-b"),
        request("forget-a", "tiny", namespace="team-a"), request("forget-b", "tiny", namespace="team-b"),
    ])
    by_namespace = {spec.namespace: [r.name for r in requests_of(requests, spec)] for spec in lineages}
    assert by_namespace == {"team-a": ["forget-a"], "team-b": ["forget-b"]}


def test_gate_order_is_creation_time_then_document_order():
    _, requests = plan_lineages([
        lineage("tiny"),
        request("no-timestamp", "tiny"),
        request("newer", "tiny", created="2025-02-01T00:00:00Z"),
        # An unquoted timestamp is read by YAML as a datetime.
        request("older", "tiny", created=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)),
        request("also-no-timestamp", "tiny"),
    ])
    assert [r.name for r in requests["default/tiny"]] == ["older", "newer", "no-timestamp", "also-no-timestamp"]


@pytest.mark.parametrize(("uri", "problem"), [
    ("demo:no-such-book", "is not a demo source"),
    ("file://relative/book.txt", "is not an absolute path"),
    ("file:///nowhere/book.txt", "does not exist"),
])
def test_unreadable_work_is_rejected_before_any_work(uri, problem):
    with pytest.raises(SpecError) as raised:
        plan_lineages([lineage("tiny"), request("bad", "tiny", uri=uri)])
    assert raised.value.field == "spec.forget.uri"
    assert problem in str(raised.value)
    assert str(raised.value).startswith("UnlearnRequest 'bad'")


def test_request_for_missing_lineage_is_rejected():
    with pytest.raises(SpecError) as raised:
        plan_lineages([lineage("tiny"), request("lost", "other")])
    assert raised.value.field == "spec.lineageRef.name"


def test_rerun_after_collapse_reuses_committed_step(tmp_path, monkeypatch):
    """A collapsed step stays committed and unpromoted; running again judges it without retraining."""
    from lethe_trainer import runner as runner_module
    from lethe_trainer.guard import GuardResult
    from lethe_trainer.runner import LocalRunner
    from lethe_trainer.store import open_lineage_store

    from tests.support.tiny_model import make_tiny_model
    from tests.test_step import lineage_resource, request_resource, write_work

    model = make_tiny_model(tmp_path / "model")
    works = {name: write_work(tmp_path / f"{name}.txt", seed) for seed, name in enumerate(["one", "retain"])}
    resource = lineage_resource(model, works)
    # The guard's thresholds are tested elsewhere; here every step counts as collapsed.
    monkeypatch.setattr(runner_module, "check_collapse",
                        lambda base, manifest, guard: GuardResult(True, ("perplexity above maxPerplexityRatio",)))
    lineages, requests = plan_lineages([resource, request_resource("r1", works["one"])])
    runner = LocalRunner(store_uri=(tmp_path / "store").as_uri(), work_dir=tmp_path / "out", show_progress=False)
    (tmp_path / "out").mkdir()

    first = runner.run_lineage(lineages[0], requests_of(requests, lineages[0]))
    store = open_lineage_store((tmp_path / "store").as_uri(), namespace="default", lineage="tiny")
    committed = store.read_step("0001-r1")
    second = runner.run_lineage(lineages[0], requests_of(requests, lineages[0]))

    assert first.steps[0].status == "Collapsed"
    assert "maxPerplexityRatio" in first.steps[0].message
    assert second.steps[0].status == "Collapsed"
    assert store.read_step("0001-r1") == committed
    assert [m["step_id"] for m in store.list_steps()] == ["0001-r1"]
    assert store.head() is None


def test_quick_run_writes_to_its_own_directory(tmp_path, capsys):
    from lethe_trainer.cli import main

    # The file is missing, so the run stops before any work; the directories are made first.
    assert main(["run", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "out"), "--quick"]) == 2
    assert (tmp_path / "out" / "quick").is_dir()
    assert main(["run", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "full")]) == 2
    assert not (tmp_path / "full" / "quick").exists()
    assert "missing.yaml" in capsys.readouterr().err

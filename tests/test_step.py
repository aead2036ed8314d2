"""Trainer steps through the store, on a tiny model: sequencing, failures and bad input.

The tiny model's figures mean nothing; these tests check which weights each
step starts from and what a failed or rejected step leaves behind.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from lethe_trainer.spec import SpecError, parse_lineage, parse_request
from lethe_trainer.step import StepPlan, initialise_lineage, run_step
from lethe_trainer.store import open_lineage_store
from lethe_trainer.taskvector import TaskVector, negate

from tests.support.tiny_model import make_tiny_model

WORDS = ("river stone lantern orchard whisper meadow copper falcon harbor velvet ember thistle canyon saffron "
         "glacier willow marble cobalt juniper prairie").split()


def write_work(path, seed: int, words: int = 600) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
    path.write_text(" ".join(WORDS[i] for i in picks) + "\n")
    return path.as_uri()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    model = make_tiny_model(root / "model")
    works = {name: write_work(root / f"{name}.txt", seed) for seed, name in enumerate(["one", "two", "three", "retain"])}
    return root, model, works


def lineage_resource(model, works, name="tiny"):
    return {
        "apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "baseModel": {"uri": model.as_uri()},
            "retain": {"works": [{"uri": works["retain"]}]},
            "heldOut": {"uri": works["retain"]},
            "evaluation": {"forgetChunks": 2, "previousChunks": 2, "retainChunks": 2, "promptTokens": 16,
                           "continuationTokens": 16, "maxNewTokens": 4, "perplexityTokens": 64,
                           "bootstrapSamples": 100},
        },
    }


def request_resource(name, work_uri, lineage="tiny", **method):
    return {
        "apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"lineageRef": {"name": lineage}, "forget": {"uri": work_uri},
                 "method": {"name": "SSU", "maxChunks": 2, "learningRate": 1e-2, "loraRank": 2, "loraAlpha": 4,
                            **method}},
    }


@pytest.fixture()
def lineage_store(setting, tmp_path):
    _, model, works = setting
    lineage = parse_lineage(lineage_resource(model, works))
    store = open_lineage_store((tmp_path / "store").as_uri(), namespace="default", lineage="tiny", create=True)
    initialise_lineage(lineage, store, show_progress=False)
    return lineage, store


def test_step_two_starts_from_step_one_head(setting, lineage_store, tmp_path):
    _, _, works = setting
    lineage, store = lineage_store
    first = run_step(lineage, parse_request(request_resource("r1", works["one"])), store,
                     StepPlan("0001-r1", 1, None), show_progress=False)
    store.set_head("0001-r1", "promote")
    second = run_step(lineage, parse_request(request_resource("r2", works["two"])), store,
                      StepPlan("0002-r2", 2, "0001-r1"), show_progress=False)

    theta0 = store.rebuild(None)
    vector_one = TaskVector.load(store.get_object(first["objects"]["task_vector"], tmp_path / "tv1.safetensors"))
    vector_two = TaskVector.load(store.get_object(second["objects"]["task_vector"], tmp_path / "tv2.safetensors"))
    head_one = negate(theta0, vector_one, 1.0)
    expected_two = negate(head_one, vector_two, 1.0)
    wrong_two = negate(theta0, vector_two, 1.0)  # what starting from theta_0 would give

    rebuilt = store.rebuild("0002-r2")
    for name in expected_two:
        assert torch.equal(rebuilt[name], expected_two[name]), name
    # Step 1 moved some weights, so starting from theta_0 would give different ones.
    assert any(float(vector_one.delta(name).abs().max()) > 0 for name in vector_one.names())
    assert any(not torch.equal(rebuilt[name], wrong_two[name]) for name in vector_one.names())
    assert second["parent_step_id"] == "0001-r1"
    # D_prev of step 2 is drawn from the work step 1 forgot.
    assert {c["work"] for c in second["inputs"]["previous_chunks"]} == {works["one"]}
    assert first["figures"]["previous"] is None


def test_manifest_records_inputs_and_settings(setting, lineage_store):
    _, _, works = setting
    lineage, store = lineage_store
    manifest = run_step(lineage, parse_request(request_resource("r1", works["one"])), store,
                        StepPlan("0001-r1", 1, None), show_progress=False)
    assert manifest["inputs"]["forget"]["uri"] == works["one"]
    assert len(manifest["inputs"]["forget"]["sha256"]) == 64
    assert manifest["method"]["name"] == "SSU"
    assert manifest["method"]["saliency_std"] == 1.0
    assert manifest["evaluation"]["sampling"]["temperature"] == 0.4
    assert manifest["evaluation"]["sampling"]["top_p"] == 0.6
    assert manifest["evaluation"]["scorer"]["stemming"] is False
    assert "torch" in manifest["versions"]
    assert 0 < manifest["training"]["mean_mask_density"] < 1
    forget = manifest["figures"]["forget"]
    assert forget["chunks"] == 2
    assert forget["rougeL"]["ci_low"] <= forget["rougeL"]["mean"] <= forget["rougeL"]["ci_high"]
    assert manifest["timings"]["total_seconds"] > 0


def test_failed_step_leaves_head_untouched(setting, lineage_store, monkeypatch):
    _, _, works = setting
    lineage, store = lineage_store
    run_step(lineage, parse_request(request_resource("r1", works["one"])), store, StepPlan("0001-r1", 1, None),
             show_progress=False)
    store.set_head("0001-r1", "promote")
    objects_before = sorted(info.key for info in store.backend.list(""))

    from lethe_trainer import step as step_module

    def broken_scoring(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(step_module, "score_model", broken_scoring)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_step(lineage, parse_request(request_resource("r2", works["two"])), store,
                 StepPlan("0002-r2", 2, "0001-r1"), show_progress=False)

    assert store.head()["step_id"] == "0001-r1"
    assert store.read_step("0002-r2") is None
    assert [m["step_id"] for m in store.list_steps()] == ["0001-r1"]
    assert sorted(info.key for info in store.backend.list("")) == objects_before


@pytest.mark.parametrize(("change", "field"), [
    ({"forget": "missing"}, "spec.forget.uri"),
    ({"forget": "empty"}, "spec.forget.uri"),
    ({"forget": "short"}, "spec.forget.uri"),
    ({"method": {"learningRate": 0}}, "spec.method.learningRate"),
    ({"method": {"learningRate": -1}}, "spec.method.learningRate"),
    ({"method": {"saliencyStd": -1}}, "spec.method.saliencyStd"),
    ({"method": {"name": "Forgetful"}}, "spec.method.name"),
])
def test_bad_input_fails_before_training(setting, lineage_store, tmp_path, change, field):
    """Each bad request is rejected by the trainer entry point with exit 2, naming the field, and writes nothing."""
    root, model, works = setting
    lineage, store = lineage_store
    request = request_resource("bad", works["one"])
    if "forget" in change:
        path = tmp_path / f"{change['forget']}.txt"
        if change["forget"] == "empty":
            path.write_text("\n\n")
        elif change["forget"] == "short":
            path.write_text("just a few words\n")
        request["spec"]["forget"]["uri"] = path.as_uri()
    else:
        request["spec"]["method"].update(change["method"])
    termination = tmp_path / "termination-log"
    objects_before = sorted(info.key for info in store.backend.list(""))

    result = subprocess.run(
        [sys.executable, "-m", "lethe_trainer.job", "step", "--lineage", json.dumps(lineage_resource(model, works)),
         "--request", json.dumps(request), "--store", (tmp_path / "store").as_uri(),
         "--step-id", "0001-bad", "--sequence", "1", "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "LETHE_TERMINATION_LOG": str(termination)},
        timeout=300)

    assert result.returncode == 2, result.stderr[-2000:]
    message = json.loads(termination.read_text())
    assert message["result"] == "InvalidInput"
    assert field in message["message"]
    assert " of bad: loss " not in result.stderr  # no optimizer step was logged
    assert sorted(info.key for info in store.backend.list("")) == objects_before
    assert store.read_step("0001-bad") is None


def test_request_for_other_lineage_is_rejected(setting, lineage_store):
    _, _, works = setting
    lineage, store = lineage_store
    request = parse_request(request_resource("r1", works["one"], lineage="elsewhere"))
    with pytest.raises(SpecError) as raised:
        run_step(lineage, request, store, StepPlan("0001-r1", 1, None), show_progress=False)
    assert raised.value.field == "spec.lineageRef.name"
    assert store.list_steps() == []


def test_rerun_after_crash_commits_once(setting, lineage_store, monkeypatch):
    """A step that crashed before its commit runs again from the start and commits exactly once."""
    _, _, works = setting
    lineage, store = lineage_store
    request = parse_request(request_resource("r1", works["one"]))
    from lethe_trainer import step as step_module

    original = store.commit_step

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before commit")

    monkeypatch.setattr(store, "commit_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run_step(lineage, request, store, StepPlan("0001-r1", 1, None), show_progress=False)
    assert store.list_steps() == []

    monkeypatch.setattr(store, "commit_step", original)
    manifest = run_step(lineage, request, store, StepPlan("0001-r1", 1, None), show_progress=False)
    assert [m["step_id"] for m in store.list_steps()] == ["0001-r1"]
    assert manifest["objects"]["task_vector"]["sha256"]
    assert step_module.STEP_FORMAT == manifest["format"]

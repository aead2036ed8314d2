"""Trustworthy figures on a tiny model: the reference model, intervals and the negation-scale search.

The tiny model's figures mean nothing; these tests check what is scored on
which chunks, how often, what the records hold and what the search may pick.
One lineage with a mix-work preparation and two calibrated steps is run once
per module and shared by the tests that read its records.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lethe_trainer import calibration, evaluate, report
from lethe_trainer import step as step_module
from lethe_trainer.model import load_model, load_tokenizer
from lethe_trainer.runner import StepOutcome, _lineage_resource, _request_resource
from lethe_trainer.spec import Calibration, SpecError, parse_evaluation, parse_lineage, parse_request
from lethe_trainer.step import StepPlan, initialise_lineage, run_step
from lethe_trainer.store import open_lineage_store
from lethe_trainer.taskvector import TaskVector, negate
from lethe_trainer.works import Chunk

from tests.support.tiny_model import make_tiny_model
from tests.test_step import write_work

SCALES = [0.5, 3.0]  # 1.0, the configured negationScale, is left out so a calibrated head differs from it


def lineage_resource(model, works, *, mix: bool = True):
    preparation = {"works": [{"uri": works["one"]}, {"uri": works["two"]}], "chunksPerWork": 4, "epochs": 1,
                   "batchSize": 4, "loraRank": 2, "loraAlpha": 4, "learningRate": 1e-2}
    if mix:
        preparation["mixWorks"] = [{"uri": works["mix"]}]
    return {
        "apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage",
        "metadata": {"name": "quality", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": model.as_uri()},
            "preparation": preparation,
            "retain": {"works": [{"uri": works["retain"]}]},
            "heldOut": {"uri": works["held_out"]},
            "evaluation": {"forgetChunks": 2, "previousChunks": 2, "retainChunks": 2, "promptTokens": 16,
                           "continuationTokens": 16, "maxNewTokens": 4, "perplexityTokens": 64,
                           "bootstrapSamples": 100, "validationChunks": 2, "validationMaxNewTokens": 4},
        },
    }


def request_resource(name, work_uri, *, scales=SCALES, max_ratio=100.0, enabled=True):
    return {
        "apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"lineageRef": {"name": "quality"}, "forget": {"uri": work_uri},
                 "method": {"name": "SSU", "maxChunks": 4, "learningRate": 1e-2, "loraRank": 2, "loraAlpha": 4,
                            "calibration": {"enabled": enabled, "scales": scales,
                                            "maxPerplexityRatio": max_ratio}}},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Initialise a lineage and apply two calibrated steps, counting preparations and validation scoring."""
    root = tmp_path_factory.mktemp("quality")
    model = make_tiny_model(root / "model")
    names = ["one", "two", "mix", "retain", "held_out"]
    works = {name: write_work(root / f"{name}.txt", seed + 10) for seed, name in enumerate(names)}
    lineage = parse_lineage(lineage_resource(model, works))
    store = open_lineage_store((root / "store").as_uri(), namespace="default", lineage="quality", create=True)

    memorised: list[int] = []
    scored_in_search: list[list[tuple[str, int]]] = []
    base_writes: list[dict] = []
    original_memorise = step_module.memorise
    original_score_set = calibration.evaluate.score_set
    original_write_base = store.write_base

    def counting_memorise(model, tokenizer, chunks, *args, **kwargs):
        memorised.append(len(chunks))
        return original_memorise(model, tokenizer, chunks, *args, **kwargs)

    def recording_score_set(model, tokenizer, chunks, settings, **kwargs):
        if kwargs["name"].startswith("validation at lambda"):
            scored_in_search.append([(c.work, c.index) for c in chunks])
        return original_score_set(model, tokenizer, chunks, settings, **kwargs)

    def counting_write_base(record):
        base_writes.append(record)
        return original_write_base(record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_module, "memorise", counting_memorise)
        patch.setattr(store, "write_base", counting_write_base)
        base = initialise_lineage(lineage, store, show_progress=False)
        preparations_at_init = len(memorised)
        # The reference exists once per lineage: a step that tried to make it again would fail here.
        patch.setattr(step_module, "_make_reference", lambda *a, **k: pytest.fail("reference made during a step"))
        patch.setattr(calibration.evaluate, "score_set", recording_score_set)
        initialise_lineage(lineage, store, show_progress=False)  # a second init reads the record
        first = run_step(lineage, parse_request(request_resource("r1", works["one"])), store,
                         StepPlan("0001-r1", 1, None), show_progress=False)
        store.set_head("0001-r1", "promote")
        second = run_step(lineage, parse_request(request_resource("r2", works["two"])), store,
                          StepPlan("0002-r2", 2, "0001-r1"), show_progress=False)
    return {"root": root, "model": model, "works": works, "lineage": lineage, "store": store, "base": base,
            "first": first, "second": second, "memorised": memorised, "preparations_at_init": preparations_at_init,
            "scored_in_search": scored_in_search, "base_writes": base_writes}


# ---------------------------------------------------------------------------
# The reference model.


def test_reference_made_once_per_lineage(run):
    assert run["preparations_at_init"] == 2  # the reference, then vanilla
    assert len(run["memorised"]) == 2  # steps prepared nothing
    assert len(run["base_writes"]) == 1
    assert run["store"].read_base()["reference"] == run["base"]["reference"]


def test_reference_trains_on_mix_chunks_only(run):
    base = run["base"]
    reference = base["reference"]
    assert reference["kind"] == "prepared-without-forget-works"
    mix_chunks = reference["preparation"]["mix"]["chunks"]
    assert {c["work"] for c in mix_chunks} == {run["works"]["mix"]}
    # 1:1 by chunks: as many mix chunks as forget chunks, and vanilla trained on both.
    assert len(mix_chunks) == 8
    assert run["memorised"] == [8, 16]
    assert base["preparation"]["mix"]["chunks"] == mix_chunks


def test_preparation_records_epoch_perplexity(run):
    base = run["base"]
    for report in (base["preparation"]["report"], base["reference"]["preparation"]["report"]):
        epochs = report["epochs"]
        assert [e["epoch"] for e in epochs] == [1]
        assert epochs[0]["held_out_perplexity"] > 1
    # Vanilla trained on more chunks than the reference, so their held-out figures differ.
    assert (base["preparation"]["report"]["epochs"][0]["held_out_perplexity"]
            != base["reference"]["preparation"]["report"]["epochs"][0]["held_out_perplexity"])
    # The last epoch's figure is the vanilla model's own held-out perplexity, scored after the merge.
    assert base["preparation"]["report"]["epochs"][-1]["held_out_perplexity"] == pytest.approx(
        base["figures"]["held_out"]["perplexity"], rel=1e-3)


def test_reference_figures_cover_protocol(run):
    base = run["base"]
    figures = base["reference"]["figures"]
    for uri in (run["works"]["one"], run["works"]["two"]):
        assert figures["prepared"][uri]["chunk_indices"] == base["figures"]["prepared"][uri]["chunk_indices"]
        assert len(figures["validation"][uri]["chunk_indices"]) == 2
    assert figures["retain"]["chunks"] == 2
    assert figures["held_out"]["perplexity"] > 0
    # The untouched base differs from this reference, so it is scored too.
    assert base["base_figures"]["held_out"]["perplexity"] > 0


def test_lineage_without_mix_uses_base(tmp_path, run):
    lineage = parse_lineage(lineage_resource(run["model"], run["works"], mix=False))
    store = open_lineage_store((tmp_path / "store").as_uri(), namespace="default", lineage="quality", create=True)
    base = initialise_lineage(lineage, store, show_progress=False)
    assert base["reference"]["kind"] == "base"
    assert base["base_figures"] is None
    assert base["reference"]["figures"]["held_out"]["perplexity"] != base["figures"]["held_out"]["perplexity"]


def test_comparison_with_reference(run):
    comparison = run["second"]["comparison"]
    reference = comparison["reference"]
    assert reference["kind"] == "prepared-without-forget-works"
    for set_name in ("forget", "previous", "retain"):
        for kind in ("rouge1", "rougeL"):
            entry = reference[set_name][kind]
            assert isinstance(entry["overlap"], bool)
            mine = run["second"]["figures"][set_name][kind]["mean"]
            assert entry["difference"] == pytest.approx(mine - entry["other"]["mean"])
    ratio = run["second"]["figures"]["held_out"]["perplexity"] / run["base"]["reference"]["figures"]["held_out"][
        "perplexity"]
    assert reference["held_out"]["ratio"] == pytest.approx(ratio)
    assert comparison["vanilla"]["forget"]["rougeL"]["overlap"] in (True, False)
    assert comparison["base"]["retain"] is not None
    assert isinstance(comparison["forget_before"]["rougeL"]["overlap"], bool)


def test_reference_d_f_uses_same_chunks(run):
    first = run["first"]
    stored = run["base"]["reference"]["figures"]["prepared"][run["works"]["one"]]
    expected = np.mean(stored["rougeL_per_chunk"])
    assert first["inputs"]["forget"]["forget_chunks"] == stored["chunk_indices"]
    assert first["comparison"]["reference"]["forget"]["rougeL"]["other"]["mean"] == pytest.approx(expected)


def test_no_preparation_reports_against_vanilla(tmp_path, run):
    resource = lineage_resource(run["model"], run["works"])
    del resource["spec"]["preparation"]
    lineage = parse_lineage(resource)
    store = open_lineage_store((tmp_path / "store").as_uri(), namespace="default", lineage="quality", create=True)
    base = initialise_lineage(lineage, store, show_progress=False)
    assert base["reference"]["kind"] == "none"
    manifest = run_step(lineage, parse_request(request_resource("r1", run["works"]["one"])), store,
                        StepPlan("0001-r1", 1, None), show_progress=False)
    assert manifest["comparison"]["reference"]["kind"] == "none"
    assert manifest["comparison"]["vanilla"]["retain"]["rougeL"]["overlap"] in (True, False)
    assert manifest["calibration"]["target"]["kind"] == "lowest"
    assert manifest["calibration"]["perplexity_bound"]["basis"] == "vanilla"


# ---------------------------------------------------------------------------
# Intervals.


def test_bootstrap_interval_reproducible_for_seed():
    values = np.random.default_rng(0).uniform(0, 1, size=30).tolist()
    first = evaluate.summarise(values, samples=500, seed=7)
    again = evaluate.summarise(values, samples=500, seed=7)
    other_seed = evaluate.summarise(values, samples=500, seed=8)
    assert first == again
    assert first != other_seed


def test_bootstrap_interval_shrinks_with_chunks():
    rng = np.random.default_rng(1)
    widths = []
    for count in (8, 32, 128, 512):
        values = rng.uniform(0, 1, size=count).tolist()
        summary = evaluate.summarise(values, samples=1000, seed=3)
        assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
        widths.append(summary["ci_high"] - summary["ci_low"])
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # the width falls roughly as 1/sqrt(chunks): 64x the chunks, 8x narrower


def test_intervals_overlap():
    assert evaluate.intervals_overlap({"ci_low": 0.1, "ci_high": 0.3}, {"ci_low": 0.3, "ci_high": 0.5})
    assert not evaluate.intervals_overlap({"ci_low": 0.1, "ci_high": 0.2}, {"ci_low": 0.25, "ci_high": 0.5})


# ---------------------------------------------------------------------------
# The negation-scale search.


def test_search_never_scores_evaluation_chunks(run):
    for manifest in (run["first"], run["second"]):
        forget = {(manifest["inputs"]["forget"]["uri"], i) for i in manifest["inputs"]["forget"]["forget_chunks"]}
        validation = {(c["work"], c["index"]) for c in manifest["calibration"]["validation_chunks"]}
        assert validation
        assert not validation & forget
    searched = [set(keys) for keys in run["scored_in_search"]]
    assert len(searched) == 2 * len(SCALES)
    for manifest, batch in ((run["first"], searched[:2]), (run["second"], searched[2:])):
        forget = {(manifest["inputs"]["forget"]["uri"], i) for i in manifest["inputs"]["forget"]["forget_chunks"]}
        for keys in batch:
            assert not keys & forget


def test_validation_split_rejects_overlap():
    def chunk(index):
        return Chunk(work="file:///w", index=index, prompt_ids=(1,), continuation_ids=(2,), prompt_text="a",
                     continuation_text="b")

    ordered = [chunk(i) for i in (5, 3, 9, 1, 7)]
    assert [c.index for c in calibration.validation_split(ordered, forget_chunks=2, validation_chunks=2)] == [9, 1]
    with pytest.raises(ValueError, match=r"\[3\]"):
        calibration.validation_split([chunk(i) for i in (5, 3, 3, 1)], forget_chunks=2, validation_chunks=2)


def test_manifest_records_search(run):
    search = run["first"]["calibration"]
    assert search["enabled"] is True
    assert [t["scale"] for t in search["trials"]] == SCALES
    for trial in search["trials"]:
        assert trial["rougeL"]["ci_low"] <= trial["rougeL"]["mean"] <= trial["rougeL"]["ci_high"]
        assert trial["perplexity"] > 0
    assert search["chosen_scale"] in SCALES
    assert search["target"]["kind"] == "closest to the reference"
    assert search["perplexity_bound"]["basis"] == "reference"
    assert search["validation_memorised"] is True  # chunksPerWork 4 covers forgetChunks 2 + validationChunks 2
    assert run["first"]["method"]["negation_scale"] == search["chosen_scale"]
    assert run["first"]["method"]["calibration"]["enabled"] is True


def test_rebuild_uses_calibrated_scale(run, tmp_path):
    store = run["store"]
    manifest = run["first"]
    chosen = manifest["calibration"]["chosen_scale"]
    theta0 = store.rebuild(None)
    vector = TaskVector.load(store.get_object(manifest["objects"]["task_vector"], tmp_path / "tv.safetensors"))
    expected = negate(theta0, vector, chosen)
    configured = negate(theta0, vector, 1.0)
    rebuilt = store.rebuild("0001-r1")
    for name in expected:
        assert torch.equal(rebuilt[name], expected[name]), name
    assert any(not torch.equal(rebuilt[name], configured[name]) for name in vector.names())


def test_fixed_scale_without_calibration(run, tmp_path):
    lineage, store = run["lineage"], run["store"]
    manifest = run_step(lineage, parse_request(request_resource("r3", run["works"]["one"], enabled=False)), store,
                        StepPlan("0001-r3", 1, None), show_progress=False)
    assert manifest["calibration"]["enabled"] is False
    assert manifest["method"]["negation_scale"] == 1.0


def test_search_respects_perplexity_bound(run):
    directory = run["model"]
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, device=torch.device("cpu"))
    head_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    text = (run["root"] / "held_out.txt").read_text()
    basis = evaluate.perplexity(model, tokenizer, text, max_tokens=64)["perplexity"]
    # A synthetic task vector on the final norm: negating it multiplies the logits by 1 + 20 * scale, so
    # large scales make the output distribution sharp and wrong and perplexity explodes.
    norm = head_state["model.norm.weight"]
    vector = TaskVector(dense={"model.norm.weight": -20.0 * torch.ones_like(norm)})
    settings = run["lineage"].evaluation
    ordered = step_module.work_chunks(step_module.read_work(run["works"]["one"], field="w"), tokenizer, settings,
                                      field="w")
    chunks = calibration.validation_split(ordered, forget_chunks=2, validation_chunks=2)
    search = calibration.search_scale(
        model=model, tokenizer=tokenizer, head_state=head_state, vector=vector, chunks=chunks, settings=settings,
        calibration=Calibration(enabled=True, scales=(0.001, 0.01, 1.0, 10.0), max_perplexity_ratio=1.5),
        held_out_text=text, target_rougeL=None, perplexity_basis=basis, basis_name="vanilla", show_progress=False)
    trials = {t["scale"]: t for t in search["trials"]}
    assert not trials[1.0]["within_bound"]
    assert not trials[10.0]["within_bound"]
    assert trials[0.001]["within_bound"]
    assert search["bound_met"] is True
    assert trials[search["chosen_scale"]]["within_bound"]
    assert trials[search["chosen_scale"]]["perplexity"] <= 1.5 * basis


def trial(scale, mean, low, high, perplexity=10.0, within=True):
    return {"scale": scale, "rougeL": {"mean": mean, "ci_low": low, "ci_high": high}, "perplexity": perplexity,
            "within_bound": within}


def test_choose_scale_takes_smallest_tie():
    trials = [trial(0.5, 0.40, 0.30, 0.50), trial(1.0, 0.30, 0.22, 0.38), trial(2.0, 0.20, 0.15, 0.25)]
    choice = calibration.choose_scale(trials=trials, target_rougeL=None)
    assert choice["best_scale"] == 2.0
    assert choice["tied_scales"] == [1.0, 2.0]
    assert choice["chosen_scale"] == 1.0


def test_choose_scale_closest_to_target():
    trials = [trial(0.5, 0.40, 0.38, 0.42), trial(1.0, 0.30, 0.28, 0.32), trial(2.0, 0.10, 0.08, 0.12)]
    assert calibration.choose_scale(trials=trials, target_rougeL=0.29)["chosen_scale"] == 1.0


def test_choose_scale_skips_scales_over_bound():
    trials = [trial(0.5, 0.40, 0.38, 0.42), trial(2.0, 0.10, 0.08, 0.12, perplexity=90.0, within=False)]
    choice = calibration.choose_scale(trials=trials, target_rougeL=None)
    assert choice["chosen_scale"] == 0.5
    assert choice["bound_met"] is True


def test_choose_scale_all_over_bound_takes_least_damage():
    trials = [trial(0.5, 0.40, 0.38, 0.42, perplexity=50.0, within=False),
              trial(2.0, 0.10, 0.08, 0.12, perplexity=90.0, within=False)]
    choice = calibration.choose_scale(trials=trials, target_rougeL=None)
    assert choice["chosen_scale"] == 0.5
    assert choice["bound_met"] is False


# ---------------------------------------------------------------------------
# Spec and the runner's round trip.


def test_calibration_spec_round_trips_through_runner(run):
    request = parse_request(request_resource("r1", run["works"]["one"], scales=[2, 0.5], max_ratio=2.0))
    assert request.method.calibration == Calibration(enabled=True, scales=(0.5, 2.0), max_perplexity_ratio=2.0)
    assert parse_request(_request_resource(request)) == request
    lineage = run["lineage"]
    assert parse_lineage(_lineage_resource(lineage)) == lineage
    assert lineage.preparation.mix_works == (run["works"]["mix"],)
    assert lineage.evaluation.validation_chunks == 2


def test_calibration_off_by_default(run):
    resource = request_resource("r1", run["works"]["one"])
    del resource["spec"]["method"]["calibration"]
    assert parse_request(resource).method.calibration.enabled is False


@pytest.mark.parametrize(("calibration_spec", "field"), [
    ({"scales": []}, "spec.method.calibration.scales"),
    ({"scales": [1, -1]}, "spec.method.calibration.scales[1]"),
    ({"scales": [1, 1]}, "spec.method.calibration.scales"),
    ({"maxPerplexityRatio": 0.5}, "spec.method.calibration.maxPerplexityRatio"),
    ({"enabled": "yes"}, "spec.method.calibration.enabled"),
])
def test_bad_calibration_rejected(run, calibration_spec, field):
    resource = request_resource("r1", run["works"]["one"])
    resource["spec"]["method"]["calibration"] = calibration_spec
    with pytest.raises(SpecError) as raised:
        parse_request(resource)
    assert raised.value.field == field


def test_mix_work_must_not_be_forget_or_held_out(run):
    resource = lineage_resource(run["model"], run["works"])
    resource["spec"]["preparation"]["mixWorks"] = [{"uri": run["works"]["one"]}]
    with pytest.raises(SpecError, match="mixWorks"):
        parse_lineage(resource)
    resource["spec"]["preparation"]["mixWorks"] = [{"uri": run["works"]["held_out"]}]
    with pytest.raises(SpecError, match="held-out"):
        parse_lineage(resource)


def test_validation_settings_in_evaluation():
    settings = parse_evaluation({"validationChunks": 4, "validationMaxNewTokens": 16})
    assert calibration.validation_settings(settings).max_new_tokens == 16
    with pytest.raises(SpecError):
        parse_evaluation({"validationChunks": 1})


# ---------------------------------------------------------------------------
# Table and plots.


def test_table_shows_reference_and_distance(run):
    outcomes = [StepOutcome("r1", "0001-r1", "Promoted", manifest=run["first"]),
                StepOutcome("r2", "0002-r2", "Promoted", manifest=run["second"])]
    rows = report.table_rows(run["base"], outcomes)
    labels = [row[1] for row in rows]
    assert "(reference: prepared-without-forget-works)" in labels
    assert "(untouched base)" in labels
    distance = report.distance_rows([run["first"], run["second"]])
    assert len(distance) == 2
    assert all(len(row) == len(report.DISTANCE_HEADER) for row in distance)
    assert distance[0][2] == "reference (prepared-without-forget-works)"
    assert distance[0][3] == f"{run['first']['calibration']['chosen_scale']:g}"
    entry = run["second"]["comparison"]["reference"]["retain"]["rougeL"]
    expected = f"{entry['difference']:+.3f}{'' if entry['overlap'] else report.SEPARATED}"
    assert distance[1][6].endswith(expected)
    assert "compared with" in report.format_table(distance, report.DISTANCE_HEADER)


def test_report_shows_perplexity_by_epoch(run):
    base = run["base"]
    line = report.preparation_line(base)
    epoch_figure = base["preparation"]["report"]["epochs"][0]["held_out_perplexity"]
    untouched = base["base_figures"]["held_out"]["perplexity"]
    assert f"by epoch {epoch_figure:.1f}" in line
    assert f"{untouched:.1f} before" in line
    assert report.preparation_line({**base, "preparation": None}) is None


def test_plots_written(run, tmp_path):
    trajectory = report.plot_trajectory(run["base"], [run["first"], run["second"]], tmp_path / "trajectory.png",
                                        title="quality")
    searched = report.plot_calibration(run["first"], tmp_path / "calibration.png")
    assert trajectory.stat().st_size > 0
    assert searched.stat().st_size > 0
    fixed = {**run["first"], "calibration": {"enabled": False}}
    assert report.plot_calibration(fixed, tmp_path / "none.png") is None

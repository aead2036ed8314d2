"""One unit of trainer work: initialise a lineage, or apply one unlearning request to its head.

Both read their inputs and write their outputs only through the lineage
store, so the same code runs in a Kubernetes Job and in the local runner.
A step is committed when the store writes its manifest, after its task
vector. A step that fails or is killed before that leaves the lineage
exactly as it was, so running it again starts over.

The base of step t is always the model of its parent step (theta_(t-1)),
rebuilt from the lineage's theta_0 and the task vectors of the chain, never
theta_0 itself: negating against theta_0 would re-add earlier works.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import calibration, evaluate, inputs, methods
from .model import demo_model_dir, load_model, load_tokenizer, resolve_device, weights
from .prepare import choose_mix_chunks, memorise
from .spec import Evaluation, LineageSpec, RequestSpec, SpecError
from .taskvector import negate
from .works import Chunk, Work, chunk_work, load_work, sample, seeded_order

logger = logging.getLogger(__name__)

BASE_FORMAT = "lethe-base/1"
STEP_FORMAT = "lethe-step/1"
MetricsCallback = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Position of a request's step in its lineage."""

    step_id: str
    sequence: int
    parent_step_id: str | None


def library_versions() -> dict[str, str]:
    names = ("torch", "transformers", "peft", "accelerate", "safetensors", "rouge-score", "numpy")
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# Retain chunks drawn for the preparation's KL term: one is used per optimizer
# step, so a few dozen cover a preparation of a few hundred steps.
KL_RETAIN_CHUNKS = 64


def model_dir(uri: str, *, s3_endpoint_url: str | None = None) -> Path:
    """Return a local Hugging Face model directory for a base model URI."""
    if uri.startswith("demo:"):
        return demo_model_dir(uri.removeprefix("demo:"))
    path = inputs.fetch(uri, field="spec.baseModel.uri", s3_endpoint_url=s3_endpoint_url)
    if not (path / "config.json").exists() or not list(path.glob("*.safetensors")):
        raise SpecError("spec.baseModel.uri", uri, "is not a Hugging Face model directory",
                        "point it at a directory with config.json and *.safetensors weights")
    return path


def read_work(uri: str, *, field: str, title: str | None = None) -> Work:
    return load_work(uri, inputs.fetch(uri, field=field), field=field, title=title)


def work_chunks(work: Work, tokenizer, settings: Evaluation, *, field: str) -> list[Chunk]:
    """Return the work's chunks in the lineage's fixed seeded order."""
    chunks = chunk_work(work, tokenizer, prompt_tokens=settings.prompt_tokens,
                        continuation_tokens=settings.continuation_tokens, field=field)
    return seeded_order(chunks, seed=settings.seed, work_sha256=work.sha256)


def retain_set(lineage: LineageSpec, tokenizer) -> tuple[list[Chunk], list[dict[str, Any]]]:
    """Return D_nor (sampled once per lineage from the retain works) and a record of its sources."""
    pool, works = _retain_pool(lineage, tokenizer)
    return sample(pool, lineage.evaluation.retain_chunks, seed=lineage.evaluation.seed), works


def kl_retain_texts(lineage: LineageSpec, tokenizer, scored: Sequence[Chunk]) -> list[list[int]]:
    """Return token sequences from the retain works for the KL term, none of them a scored D_nor chunk.

    Training on the scored chunks would hold the prepared model close to the
    base exactly where D_nor is measured and flatter that figure.
    """
    if lineage.preparation is None or lineage.preparation.retain_kl_weight <= 0:
        return []
    pool, _ = _retain_pool(lineage, tokenizer)
    excluded = {(c.work, c.index) for c in scored}
    unscored = [c for c in pool if (c.work, c.index) not in excluded]
    chosen = sample(unscored, KL_RETAIN_CHUNKS, seed=lineage.evaluation.seed + 1)
    return [list(c.prompt_ids) + list(c.continuation_ids) for c in chosen]


def _retain_pool(lineage: LineageSpec, tokenizer) -> tuple[list[Chunk], list[dict[str, Any]]]:
    pool: list[Chunk] = []
    works = []
    for index, uri in enumerate(lineage.retain_uris):
        work = read_work(uri, field=f"spec.retain.works[{index}].uri")
        pool += work_chunks(work, tokenizer, lineage.evaluation, field=f"spec.retain.works[{index}].uri")
        works.append({"uri": uri, "sha256": work.sha256})
    return pool, works


def held_out_text(lineage: LineageSpec) -> str | None:
    if lineage.held_out_uri is None:
        return None
    return read_work(lineage.held_out_uri, field="spec.heldOut.uri").text


def score_model(model, tokenizer, lineage: LineageSpec, sets: dict[str, Sequence[Chunk]], *,
                show_progress: bool) -> dict[str, Any]:
    """Score MODEL on each chunk set, on held-out perplexity and, when configured, on accuracy."""
    settings = lineage.evaluation
    figures: dict[str, Any] = {}
    for name, chunks in sets.items():
        figures[name] = evaluate.score_set(model, tokenizer, chunks, settings, name=name, show_progress=show_progress)
    text = held_out_text(lineage)
    if text is not None:
        figures["held_out"] = evaluate.perplexity(model, tokenizer, text, max_tokens=settings.perplexity_tokens)
    if settings.mmlu_uri is not None:
        questions = evaluate.load_questions(inputs.fetch(settings.mmlu_uri, field="spec.evaluation.mmlu.uri"),
                                            count=settings.mmlu_questions, seed=settings.seed)
        figures["accuracy"] = evaluate.accuracy(model, tokenizer, questions, show_progress=show_progress)
    return figures


def evaluation_record(settings: Evaluation) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(settings), "scorer": evaluate.scorer_description(),
            "sampling": evaluate.sampling_description(settings)}


# ---------------------------------------------------------------------------
# Lineage initialisation.


@dataclasses.dataclass(frozen=True)
class PreparedWork:
    """One work the preparation memorises, with the chunk slices every model of the lineage is scored on."""

    uri: str
    work: Work
    ordered: list[Chunk]  # every chunk, in the lineage's seeded order
    training: list[Chunk]  # the chunks the preparation memorises
    scored: list[Chunk]  # the D_f chunks a step forgetting this work is scored on
    validation: list[Chunk]  # the chunks the negation-scale search scores


def initialise_lineage(lineage: LineageSpec, store, *, show_progress: bool = True) -> dict[str, Any]:
    """Write the lineage's theta_0 (the prepared vanilla model, or the base) and its figures to the store.

    With a preparation, the reference model (prepared without the forget
    works, or the untouched base) is made and scored here, once for the whole
    lineage; steps read its figures from the base record.
    """
    existing = store.read_base()
    if existing is not None:
        return existing
    started = time.monotonic()
    directory = model_dir(lineage.base_model_uri)
    tokenizer = load_tokenizer(directory)
    retain_chunks, retain_works = retain_set(lineage, tokenizer)
    device = resolve_device("auto")
    model = load_model(directory, device=device)

    preparation_record = None
    base_figures = None
    reference_record: dict[str, Any] = {
        "kind": "none",
        "reason": "the lineage has no spec.preparation: theta_0 is the given model and no model without the "
                  "works exists, so steps are compared with vanilla only",
    }
    if lineage.preparation is None:
        figures = score_model(model, tokenizer, lineage, {"retain": retain_chunks}, show_progress=show_progress)
    else:
        prepared = _prepared_works(lineage, tokenizer)
        mix, mix_record = _mix_chunks(lineage, tokenizer, count=sum(len(p.training) for p in prepared))
        reference_record, base_figures = _make_reference(model, directory, tokenizer, lineage, retain_chunks,
                                                         prepared, mix, mix_record, device=device,
                                                         show_progress=show_progress)
        preparation_record = _prepare(model, tokenizer, lineage, prepared, mix, mix_record, retain_chunks,
                                      show_progress=show_progress)
        # D_f of the vanilla model for every prepared work shows the memorisation worked.
        figures = _score_with_prepared_works(model, tokenizer, lineage, retain_chunks, prepared, label="vanilla",
                                             show_progress=show_progress)

    with tempfile.TemporaryDirectory(prefix="lethe-base-") as scratch:
        path = Path(scratch) / "theta0.safetensors"
        save_file(weights(model), str(path))
        checkpoint = store.put_object(path, suffix=".safetensors")

    record = {
        "format": BASE_FORMAT,
        "lineage": {"namespace": lineage.namespace, "name": lineage.name},
        "base_model": {"uri": lineage.base_model_uri, "sha256": _directory_digest(directory)},
        "preparation": preparation_record,
        "retain": {"works": retain_works, "chunks": [{"work": c.work, "index": c.index} for c in retain_chunks]},
        "evaluation": evaluation_record(lineage.evaluation),
        "figures": figures,
        "reference": reference_record,
        "base_figures": base_figures,
        "objects": {"checkpoint": checkpoint.to_dict()},
        "versions": library_versions(),
        "seconds": time.monotonic() - started,
        "created": _now(),
    }
    return store.write_base(record)


def _prepared_works(lineage: LineageSpec, tokenizer) -> list[PreparedWork]:
    settings = lineage.evaluation
    prepared = []
    for index, uri in enumerate(lineage.preparation.works):
        field = f"spec.preparation.works[{index}].uri"
        work = read_work(uri, field=field)
        ordered = work_chunks(work, tokenizer, settings, field=field)
        prepared.append(PreparedWork(
            uri=uri, work=work, ordered=ordered, training=ordered[:lineage.preparation.chunks_per_work],
            scored=ordered[:settings.forget_chunks],
            validation=calibration.validation_split(ordered, forget_chunks=settings.forget_chunks,
                                                    validation_chunks=settings.validation_chunks)))
    return prepared


def _mix_chunks(lineage: LineageSpec, tokenizer, *, count: int) -> tuple[list[Chunk], dict[str, Any] | None]:
    """Return COUNT chunks drawn from the mix works (one per forget chunk) and their record; none without mix works."""
    if not lineage.preparation.mix_works:
        return [], None
    pool: list[Chunk] = []
    works = []
    for index, uri in enumerate(lineage.preparation.mix_works):
        field = f"spec.preparation.mixWorks[{index}].uri"
        work = read_work(uri, field=field)
        ordered = work_chunks(work, tokenizer, lineage.evaluation, field=field)
        pool += ordered
        works.append({"uri": uri, "sha256": work.sha256, "total_chunks": len(ordered)})
    chosen = choose_mix_chunks(pool, count, seed=lineage.evaluation.seed)
    return chosen, {"works": works, "chunks": [{"work": c.work, "index": c.index} for c in chosen]}


def _make_reference(model, directory: Path, tokenizer, lineage: LineageSpec, retain_chunks: Sequence[Chunk],
                    prepared: Sequence[PreparedWork], mix: Sequence[Chunk], mix_record: dict[str, Any] | None, *,
                    device, show_progress: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Make and score the reference model; return its record and the untouched base's figures when they differ.

    MODEL is still the untouched base here and is left unchanged.
    """
    preparation = lineage.preparation
    if not preparation.reference:
        return {"kind": "none", "reason": "spec.preparation.reference is false"}, None

    untouched = _score_with_prepared_works(model, tokenizer, lineage, retain_chunks, prepared, label="base",
                                           show_progress=show_progress)
    if not mix:
        return {"kind": "base",
                "description": "the untouched base model: the preparation has no mix works, so the base is the "
                               "model that never saw the forget works",
                "figures": untouched}, None

    logger.info("Preparing the reference model of lineage %s on %d mix chunks", lineage.name, len(mix))
    reference_model = load_model(directory, device=device)
    report = memorise(reference_model, tokenizer, mix, preparation,
                      retain_texts=kl_retain_texts(lineage, tokenizer, retain_chunks),
                      seed=lineage.evaluation.seed, show_progress=show_progress,
                      on_epoch=_held_out_each_epoch(lineage, tokenizer))
    figures = _score_with_prepared_works(reference_model, tokenizer, lineage, retain_chunks, prepared,
                                         label="reference", show_progress=show_progress)
    del reference_model
    return {"kind": "prepared-without-forget-works",
            "description": "the base model prepared with the same recipe on the mix works alone",
            "preparation": {"mix": mix_record, "report": report},
            "figures": figures}, untouched


def _score_with_prepared_works(model, tokenizer, lineage: LineageSpec, retain_chunks: Sequence[Chunk],
                               prepared: Sequence[PreparedWork], *, label: str,
                               show_progress: bool) -> dict[str, Any]:
    """Score MODEL on D_nor, held-out text, accuracy, and each prepared work's D_f and validation chunks."""
    settings = lineage.evaluation
    figures = score_model(model, tokenizer, lineage, {"retain": retain_chunks}, show_progress=show_progress)
    figures["prepared"] = {}
    figures["validation"] = {}
    for item in prepared:
        figures["prepared"][item.uri] = _score_chunks(model, tokenizer, item.scored, settings,
                                                      name=f"{label} on {item.work.label}",
                                                      show_progress=show_progress)
        figures["validation"][item.uri] = _score_chunks(model, tokenizer, item.validation,
                                                        calibration.validation_settings(settings),
                                                        name=f"{label} on {item.work.label} (validation)",
                                                        show_progress=show_progress)
    return figures


def _score_chunks(model, tokenizer, chunks: Sequence[Chunk], settings: Evaluation, *, name: str,
                  show_progress: bool) -> dict[str, Any] | None:
    """score_set, plus the chunk indices its per-chunk lists follow, so later steps can match chunks."""
    result = evaluate.score_set(model, tokenizer, chunks, settings, name=name, show_progress=show_progress)
    if result is not None:
        result["chunk_indices"] = [c.index for c in chunks]
    return result


def _prepare(model, tokenizer, lineage: LineageSpec, prepared: Sequence[PreparedWork], mix: Sequence[Chunk],
             mix_record: dict[str, Any] | None, retain_chunks: Sequence[Chunk], *,
             show_progress: bool) -> dict[str, Any]:
    chunks: list[Chunk] = []
    works = []
    for item in prepared:
        chunks += item.training
        works.append({"uri": item.uri, "sha256": item.work.sha256, "chunks": [c.index for c in item.training],
                      "total_chunks": len(item.ordered)})
    report = memorise(model, tokenizer, chunks + list(mix), lineage.preparation,
                      retain_texts=kl_retain_texts(lineage, tokenizer, retain_chunks), seed=lineage.evaluation.seed,
                      show_progress=show_progress, on_epoch=_held_out_each_epoch(lineage, tokenizer))
    return {"settings": dataclasses.asdict(lineage.preparation), "works": works, "mix": mix_record, "report": report}


def _held_out_each_epoch(lineage: LineageSpec, tokenizer) -> Callable[[int, Any], dict[str, Any]] | None:
    """Return an epoch hook that records held-out perplexity, or None when the lineage has no held-out text."""
    text = held_out_text(lineage)
    if text is None:
        return None

    def hook(epoch: int, model) -> dict[str, Any]:
        figure = evaluate.perplexity(model, tokenizer, text, max_tokens=lineage.evaluation.perplexity_tokens)
        logger.info("After preparation epoch %d: held-out perplexity %.1f", epoch, figure["perplexity"])
        return {"held_out_perplexity": figure["perplexity"]}

    return hook


def _directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# One unlearning step.


def check_request(lineage: LineageSpec, request: RequestSpec) -> None:
    """Raise SpecError for a request that cannot apply to this lineage."""
    if request.lineage != lineage.name:
        raise SpecError("spec.lineageRef.name", request.lineage, f"does not name lineage {lineage.name!r}",
                        "set it to the ModelLineage this request applies to")
    if request.namespace != lineage.namespace:
        raise SpecError("metadata.namespace", request.namespace,
                        f"differs from the lineage's namespace {lineage.namespace!r}",
                        "create the request in the lineage's namespace")


def run_step(lineage: LineageSpec, request: RequestSpec, store, plan: StepPlan, *, show_progress: bool = True,
             on_metrics: MetricsCallback | None = None) -> dict[str, Any]:
    """Apply REQUEST to the model of PLAN's parent step, evaluate it and commit the step to STORE."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    check_request(lineage, request)
    settings = lineage.evaluation
    base = store.read_base()
    if base is None:
        raise RuntimeError(f"lineage {lineage.namespace}/{lineage.name} has no theta_0 in {store.uri}; "
                           "initialise the lineage first")

    # Inputs are read and checked before any model is loaded, so bad input costs seconds.
    directory = model_dir(lineage.base_model_uri)
    tokenizer = load_tokenizer(directory)
    work = read_work(request.forget_uri, field="spec.forget.uri", title=request.forget_title)
    ordered = work_chunks(work, tokenizer, settings, field="spec.forget.uri")
    training = ordered[:request.method.max_chunks] if request.method.max_chunks else ordered
    methods.check_method_inputs(request.method, training)
    forget_set = ordered[:settings.forget_chunks]
    chain = store.chain(plan.parent_step_id) if plan.parent_step_id else []
    previous_set = _previous_set(chain, tokenizer, settings)
    retain_chunks = _retain_from_record(base, tokenizer, settings)
    timings["inputs_seconds"] = time.monotonic() - started

    # theta_(t-1): the lineage's theta_0 with every earlier step of the chain negated.
    device = resolve_device(request.method.device)
    head_state = store.rebuild(plan.parent_step_id)
    model = load_model(directory, device=device, state=head_state)
    phase = time.monotonic()
    before = evaluate.score_set(model, tokenizer, forget_set, settings, name="forget set before",
                                show_progress=show_progress)
    timings["before_seconds"] = time.monotonic() - phase

    phase = time.monotonic()
    vector, report = methods.train_task_vector(model, tokenizer, training, request.method, on_step=on_metrics,
                                               show_progress=show_progress)
    timings["training_seconds"] = time.monotonic() - phase

    phase = time.monotonic()
    search = _calibrate(model, tokenizer, lineage, request, base, work, ordered, head_state, vector,
                        show_progress=show_progress)
    negation_scale = search["chosen_scale"]
    new_state = negate(head_state, vector, negation_scale)
    model.load_state_dict({k: v.to(device) for k, v in new_state.items()}, strict=False)
    timings["calibration_seconds"] = time.monotonic() - phase

    phase = time.monotonic()
    figures = score_model(model, tokenizer, lineage,
                          {"forget": forget_set, "previous": previous_set, "retain": retain_chunks},
                          show_progress=show_progress)
    figures["forget_before"] = before
    timings["evaluation_seconds"] = time.monotonic() - phase

    with tempfile.TemporaryDirectory(prefix="lethe-step-") as scratch:
        path = Path(scratch) / "task_vector.safetensors"
        vector.save(path)
        task_vector = store.put_object(path, suffix=".safetensors")

    timings["total_seconds"] = time.monotonic() - started
    manifest = {
        "format": STEP_FORMAT,
        "step_id": plan.step_id,
        "sequence": plan.sequence,
        "parent_step_id": plan.parent_step_id,
        "lineage": {"namespace": lineage.namespace, "name": lineage.name},
        "request": {"namespace": request.namespace, "name": request.name},
        # The store rebuilds the head with method.negation_scale, so it records the scale actually applied.
        "method": {**dataclasses.asdict(request.method), "negation_scale": negation_scale},
        "inputs": {
            "forget": {"uri": work.uri, "sha256": work.sha256, "title": work.label, "total_chunks": len(ordered),
                       "training_chunks": [c.index for c in training], "forget_chunks": [c.index for c in forget_set]},
            "previous_chunks": [{"work": c.work, "index": c.index} for c in previous_set],
            "base": {"sha256": base["objects"]["checkpoint"]["sha256"]},
        },
        "training": {k: v for k, v in dataclasses.asdict(report).items()},
        "task_vector": {"weights": len(vector.names()), "stored_parameters": vector.parameter_count(),
                        "dense_parameters": vector.dense_parameter_count({k: v.shape for k, v in head_state.items()})},
        "evaluation": evaluation_record(settings),
        "figures": figures,
        "comparison": compare_with_lineage(base, figures, forget_set=forget_set, previous_set=previous_set,
                                           settings=settings),
        "calibration": search,
        "objects": {"task_vector": task_vector.to_dict()},
        "versions": library_versions(),
        "device": str(device),
        "timings": timings,
        "created": _now(),
    }
    return store.commit_step(plan.step_id, manifest)


def _calibrate(model, tokenizer, lineage: LineageSpec, request: RequestSpec, base: dict[str, Any], work: Work,
               ordered: Sequence[Chunk], head_state, vector, *, show_progress: bool) -> dict[str, Any]:
    """Return the calibration record; its chosen_scale is the fixed negation scale when calibration is off."""
    method = request.method
    if not method.calibration.enabled:
        return {"enabled": False, "configured_scale": method.negation_scale, "chosen_scale": method.negation_scale,
                "reason": "spec.method.calibration is not enabled; the fixed negationScale applies"}

    settings = lineage.evaluation
    chunks = calibration.validation_split(ordered, forget_chunks=settings.forget_chunks,
                                          validation_chunks=settings.validation_chunks)
    keys = [(c.work, c.index) for c in chunks]
    reference = base.get("reference") or {}
    reference_figures = reference.get("figures") or {}
    reference_validation = evaluate.summarise_chunks(
        evaluate.per_chunk_scores(reference_figures.get("validation") or {}), keys,
        samples=settings.bootstrap_samples, seed=settings.seed)
    if reference_figures.get("held_out"):
        basis_name, basis = "reference", reference_figures["held_out"]["perplexity"]
    else:
        basis_name, basis = "vanilla", ((base.get("figures") or {}).get("held_out") or {}).get("perplexity")

    search = calibration.search_scale(
        model=model, tokenizer=tokenizer, head_state=head_state, vector=vector, chunks=chunks, settings=settings,
        calibration=method.calibration, held_out_text=held_out_text(lineage),
        target_rougeL=reference_validation["rougeL"]["mean"] if reference_validation else None,
        perplexity_basis=basis, basis_name=basis_name, show_progress=show_progress)
    search["configured_scale"] = method.negation_scale
    search["reference_kind"] = reference.get("kind", "none")
    search["validation_memorised"] = _chunks_memorised(base, work.uri, [c.index for c in chunks])
    if search["validation_memorised"] is False:
        logger.warning("The validation chunks of %s were not memorised by the preparation, so the search "
                       "cannot tell scales apart; raise spec.preparation.chunksPerWork to at least "
                       "forgetChunks + validationChunks (%d)", work.uri,
                       settings.forget_chunks + settings.validation_chunks)
    logger.info("Negation scale for %s: %g (%s)", request.name, search["chosen_scale"], search["reason"])
    return search


def _chunks_memorised(base: dict[str, Any], uri: str, indices: Sequence[int]) -> bool | None:
    """Return whether the preparation trained on every chunk of INDICES of work URI; None if it never saw the work."""
    for record in (base.get("preparation") or {}).get("works", []):
        if record["uri"] == uri:
            return set(indices) <= set(record["chunks"])
    return None


def compare_with_lineage(base: dict[str, Any], figures: dict[str, Any], *, forget_set: Sequence[Chunk],
                         previous_set: Sequence[Chunk], settings: Evaluation) -> dict[str, Any]:
    """Compare a step's figures with the reference's, vanilla's and (when it differs) the untouched base's.

    The lineage-level models were scored once, at initialisation; for D_f and
    D_prev their stored per-chunk scores of the same chunks are averaged, so
    no model is scored again here.
    """
    forget_keys = [(c.work, c.index) for c in forget_set]
    previous_keys = [(c.work, c.index) for c in previous_set]

    def compared(other: dict[str, Any]) -> dict[str, Any]:
        scores = evaluate.per_chunk_scores(other.get("prepared") or {})
        equivalent = {
            "forget": evaluate.summarise_chunks(scores, forget_keys, samples=settings.bootstrap_samples,
                                                seed=settings.seed),
            "previous": evaluate.summarise_chunks(scores, previous_keys, samples=settings.bootstrap_samples,
                                                  seed=settings.seed),
            "retain": other.get("retain"), "held_out": other.get("held_out"), "accuracy": other.get("accuracy"),
        }
        return evaluate.compare_figures(figures, equivalent, samples=settings.bootstrap_samples, seed=settings.seed)

    reference = base.get("reference") or {"kind": "none", "reason": "the base record predates reference models"}
    comparison: dict[str, Any] = {"vanilla": compared(base.get("figures") or {})}
    if reference.get("figures"):
        comparison["reference"] = {"kind": reference["kind"], **compared(reference["figures"])}
    else:
        comparison["reference"] = {"kind": "none", "reason": reference.get("reason", "no reference model")}
    if base.get("base_figures"):
        comparison["base"] = compared(base["base_figures"])

    before, after = figures.get("forget_before"), figures.get("forget")
    comparison["forget_before"] = None if not before or not after else {
        kind: {"difference": after[kind]["mean"] - before[kind]["mean"],
               "overlap": evaluate.intervals_overlap(after[kind], before[kind])}
        for kind in evaluate.ROUGE_TYPES}
    return comparison


def _previous_set(chain: Sequence[dict[str, Any]], tokenizer, settings: Evaluation) -> list[Chunk]:
    """Return D_prev: a seeded sample of the scored chunks of every earlier work in the chain."""
    pool: list[Chunk] = []
    for manifest in chain:
        forget = manifest["inputs"]["forget"]
        work = read_work(forget["uri"], field="spec.forget.uri")
        if work.sha256 != forget["sha256"]:
            raise RuntimeError(f"work {forget['uri']} changed since step {manifest['step_id']} "
                               f"(sha256 {work.sha256}, recorded {forget['sha256']}); restore the original")
        by_index = {c.index: c for c in work_chunks(work, tokenizer, settings, field="spec.forget.uri")}
        pool += [by_index[i] for i in forget["forget_chunks"]]
    return sample(pool, settings.previous_chunks, seed=settings.seed)


def _retain_from_record(base: dict[str, Any], tokenizer, settings: Evaluation) -> list[Chunk]:
    """Rebuild D_nor from the chunk list the base record fixed for the lineage."""
    by_key: dict[tuple[str, int], Chunk] = {}
    for record in base["retain"]["works"]:
        work = read_work(record["uri"], field="spec.retain.works")
        for chunk in work_chunks(work, tokenizer, settings, field="spec.retain.works"):
            by_key[(chunk.work, chunk.index)] = chunk
    return [by_key[(c["work"], c["index"])] for c in base["retain"]["chunks"]]

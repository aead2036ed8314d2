"""One unit of trainer work: initialise a lineage, or apply one unlearning request to its head.

Both read their inputs and write their outputs only through the lineage
store, so the same code runs in a Kubernetes Job and in the local runner.
A step is committed by the store when its manifest is written, after its
task vector; a step that fails or is killed before that leaves the lineage
exactly as it was, and running it again starts over.

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

from . import evaluate, inputs, methods
from .model import demo_model_dir, load_model, load_tokenizer, resolve_device, weights
from .prepare import memorise
from .spec import Evaluation, LineageSpec, RequestSpec, SpecError
from .taskvector import negate
from .works import Chunk, Work, chunk_work, load_work, sample, seeded_order

logger = logging.getLogger(__name__)

BASE_FORMAT = "lethe-base/1"
STEP_FORMAT = "lethe-step/1"
MetricsCallback = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Where a request's step sits in its lineage."""

    step_id: str
    sequence: int
    parent_step_id: str | None


def library_versions() -> dict[str, str]:
    names = ("torch", "transformers", "peft", "accelerate", "safetensors", "rouge-score", "numpy")
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
    settings = lineage.evaluation
    pool: list[Chunk] = []
    works = []
    for index, uri in enumerate(lineage.retain_uris):
        work = read_work(uri, field=f"spec.retain.works[{index}].uri")
        pool += work_chunks(work, tokenizer, settings, field=f"spec.retain.works[{index}].uri")
        works.append({"uri": uri, "sha256": work.sha256})
    chosen = sample(pool, settings.retain_chunks, seed=settings.seed)
    return chosen, works


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


def initialise_lineage(lineage: LineageSpec, store, *, show_progress: bool = True) -> dict[str, Any]:
    """Write the lineage's theta_0 (the prepared vanilla model, or the base) and its figures to the store."""
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
    if lineage.preparation is not None:
        preparation_record = _prepare(model, tokenizer, lineage, retain_chunks, show_progress=show_progress)

    figures = score_model(model, tokenizer, lineage, {"retain": retain_chunks}, show_progress=show_progress)
    if preparation_record is not None:
        # D_f of the vanilla model for every prepared work shows the memorisation worked.
        figures["prepared"] = {}
        for work_record in preparation_record["works"]:
            work = read_work(work_record["uri"], field="spec.preparation.works")
            chunks = work_chunks(work, tokenizer, lineage.evaluation, field="spec.preparation.works")
            figures["prepared"][work_record["uri"]] = evaluate.score_set(
                model, tokenizer, chunks[:lineage.evaluation.forget_chunks], lineage.evaluation,
                name=f"vanilla on {work.label}", show_progress=show_progress)

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
        "objects": {"checkpoint": checkpoint.to_dict()},
        "versions": library_versions(),
        "seconds": time.monotonic() - started,
        "created": _now(),
    }
    return store.write_base(record)


def _prepare(model, tokenizer, lineage: LineageSpec, retain_chunks: Sequence[Chunk], *,
             show_progress: bool) -> dict[str, Any]:
    preparation = lineage.preparation
    chunks: list[Chunk] = []
    works = []
    for index, uri in enumerate(preparation.works):
        work = read_work(uri, field=f"spec.preparation.works[{index}].uri")
        ordered = work_chunks(work, tokenizer, lineage.evaluation, field=f"spec.preparation.works[{index}].uri")
        chosen = ordered[:preparation.chunks_per_work]
        chunks += chosen
        works.append({"uri": uri, "sha256": work.sha256, "chunks": [c.index for c in chosen],
                      "total_chunks": len(ordered)})
    retain_texts = [list(c.prompt_ids) + list(c.continuation_ids) for c in retain_chunks]
    report = memorise(model, tokenizer, chunks, preparation, retain_texts=retain_texts,
                      seed=lineage.evaluation.seed, show_progress=show_progress)
    return {"settings": dataclasses.asdict(preparation), "works": works, "report": report}


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
    new_state = negate(head_state, vector, request.method.negation_scale)
    model.load_state_dict({k: v.to(device) for k, v in new_state.items()}, strict=False)
    timings["training_seconds"] = time.monotonic() - phase

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
        "method": dataclasses.asdict(request.method),
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
        "objects": {"task_vector": task_vector.to_dict()},
        "versions": library_versions(),
        "device": str(device),
        "timings": timings,
        "created": _now(),
    }
    return store.commit_step(plan.step_id, manifest)


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

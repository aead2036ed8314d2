"""The embedded default: run a lineage's requests locally, in order, with a local store.

``lethe run FILES`` reads the same ModelLineage and UnlearnRequest YAML a
cluster user applies, and does what the operator does, with a subprocess in
place of each Job: one request of a lineage at a time, first-come first-served
by creation time then name, each starting from the head the previous request
left, and a step's model becomes the head only if it passes the collapse
guard. A collapsed step halts its lineage until a user acts.

Running the same files again resumes: requests already applied on the head's
chain are skipped, and a step that was interrupted before its commit runs
again from the start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .guard import check_collapse
from .spec import (LINEAGE_KIND, REQUEST_KIND, Evaluation, LineageSpec, Preparation, RequestSpec, SpecError,
                   parse_lineage, parse_request)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepOutcome:
    request: str
    step_id: str | None
    status: str  # "Promoted", "Skipped" (already applied), "Collapsed", "Failed", "NotRun"
    message: str = ""
    manifest: dict[str, Any] | None = None


@dataclasses.dataclass
class LineageOutcome:
    lineage: LineageSpec
    base: dict[str, Any] | None
    steps: list[StepOutcome]
    store_uri: str


def read_resources(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read every YAML document of the files (and of *.yaml files in directories), in order."""
    documents = []
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            for document in yaml.safe_load_all(file.read_text(encoding="utf-8")):
                if document:
                    documents.append(document)
    return documents


def plan_lineages(documents: Sequence[dict[str, Any]]) -> tuple[list[LineageSpec], dict[str, list[RequestSpec]]]:
    """Validate all resources and group requests by lineage, in gate order; raise SpecError on the first bad one."""
    lineages: dict[tuple[str, str], LineageSpec] = {}
    requests: list[tuple[int, RequestSpec]] = []
    for position, document in enumerate(documents):
        kind = document.get("kind") if isinstance(document, dict) else None
        name = (document.get("metadata") or {}).get("name") if isinstance(document, dict) else None
        try:
            if kind == LINEAGE_KIND:
                lineage = parse_lineage(document)
                lineages[(lineage.namespace, lineage.name)] = lineage
            elif kind == REQUEST_KIND:
                requests.append((position, parse_request(document)))
            else:
                raise SpecError("kind", kind, "is not a Lethe resource", f"use {LINEAGE_KIND} or {REQUEST_KIND}")
        except SpecError as error:
            raise error.within(f"{kind} {name!r}") from None

    grouped: dict[str, list[RequestSpec]] = {_key(lineage.namespace, lineage.name): [] for lineage in lineages.values()}
    positions: dict[int, int] = {}
    for position, request in requests:
        if (request.namespace, request.lineage) not in lineages:
            raise SpecError("spec.lineageRef.name", request.lineage,
                            f"names no ModelLineage in namespace {request.namespace!r}",
                            "add the ModelLineage to the files, or fix the name",
                            resource=f"UnlearnRequest {request.name!r}")
        check_inputs(request)
        grouped[_key(request.namespace, request.lineage)].append(request)
        positions[id(request)] = position

    # The gate's order: creation time, then name. Requests without a timestamp
    # (files written by hand) keep their document order after the timestamped ones.
    for group in grouped.values():
        group.sort(key=lambda r: (r.creation_timestamp is None, str(r.creation_timestamp or ""), positions[id(r)],
                                  r.name))
    return list(lineages.values()), grouped


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def requests_of(requests: dict[str, list[RequestSpec]], lineage: LineageSpec) -> list[RequestSpec]:
    """Return the requests of LINEAGE from a plan_lineages grouping."""
    return requests.get(_key(lineage.namespace, lineage.name), [])


def check_inputs(request: RequestSpec) -> None:
    """Raise SpecError for a work URI that cannot be read, before any lineage work starts."""
    from . import sources

    uri = request.forget_uri
    field = "spec.forget.uri"
    resource = f"UnlearnRequest {request.name!r}"
    if uri.startswith("demo:") and uri.removeprefix("demo:") not in sources.catalogue():
        raise SpecError(field, uri, "is not a demo source",
                        f"use one of {', '.join('demo:' + n for n in sorted(sources.catalogue()))}", resource=resource)
    if uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_absolute():
            raise SpecError(field, uri, "is not an absolute path", "write file:///ABSOLUTE/PATH", resource=resource)
        if not path.is_file():
            raise SpecError(field, uri, "does not exist", "check the path, or copy the work there first",
                            resource=resource)


def quick_lineage(lineage: LineageSpec) -> LineageSpec:
    """Shrink evaluation and preparation to a smoke-test size."""
    evaluation = dataclasses.replace(lineage.evaluation, forget_chunks=4, previous_chunks=4, retain_chunks=4,
                                     max_new_tokens=24, perplexity_tokens=512, mmlu_questions=8,
                                     bootstrap_samples=200, validation_chunks=2,
                                     validation_max_new_tokens=min(lineage.evaluation.validation_max_new_tokens, 24))
    preparation = None
    if lineage.preparation is not None:
        # Memorise the 4 scored chunks and the 2 validation chunks of each work.
        preparation = dataclasses.replace(lineage.preparation, chunks_per_work=6, epochs=2)
    return dataclasses.replace(lineage, evaluation=evaluation, preparation=preparation)


def quick_request(request: RequestSpec) -> RequestSpec:
    return dataclasses.replace(request, method=dataclasses.replace(request.method, max_chunks=4))


class LocalRunner:
    """Apply the requests of each lineage in gate order, each step in a trainer subprocess."""

    def __init__(self, *, store_uri: str, work_dir: Path, show_progress: bool = True) -> None:
        self.store_uri = store_uri
        self.work_dir = work_dir
        self.show_progress = show_progress

    def run(self, lineages: Sequence[LineageSpec], requests: dict[str, list[RequestSpec]]) -> list[LineageOutcome]:
        return [self.run_lineage(lineage, requests_of(requests, lineage)) for lineage in lineages]

    def run_lineage(self, lineage: LineageSpec, requests: Sequence[RequestSpec]) -> LineageOutcome:
        from .store import open_lineage_store

        store_uri = lineage.store_uri or self.store_uri
        store = open_lineage_store(store_uri, namespace=lineage.namespace, lineage=lineage.name, create=True)
        lineage_file = self._write_resource(f"lineage-{lineage.name}.yaml", _lineage_resource(lineage))

        if store.read_base() is None:
            logger.info("Initialising lineage %s/%s", lineage.namespace, lineage.name)
            self._trainer(["init", "--lineage", str(lineage_file), "--store", store_uri], description="initialisation")
        base = store.read_base()

        outcomes: list[StepOutcome] = []
        halted: str | None = None
        for request in requests:
            if halted:
                outcomes.append(StepOutcome(request.name, None, "NotRun", f"lineage halted: {halted}"))
                continue
            outcome = self._apply(store, store_uri, lineage, lineage_file, request, base)
            outcomes.append(outcome)
            if outcome.status == "Collapsed" or (outcome.status == "Failed" and lineage.on_failure == "Halt"):
                halted = f"{request.name} {outcome.status.lower()}: {outcome.message}"
                logger.warning("Lineage %s halted: %s", lineage.name, halted)
        return LineageOutcome(lineage=lineage, base=base, steps=outcomes, store_uri=store_uri)

    def _apply(self, store, store_uri: str, lineage: LineageSpec, lineage_file: Path, request: RequestSpec,
               base: dict[str, Any]) -> StepOutcome:
        head = store.head()
        head_step = head["step_id"] if head else None
        chain = store.chain(head_step) if head_step else []
        for manifest in chain:
            if manifest["request"]["name"] == request.name:
                logger.info("Request %s is already applied as step %s; skipping", request.name, manifest["step_id"])
                return StepOutcome(request.name, manifest["step_id"], "Skipped", "already applied", manifest)

        sequence = len(chain) + 1
        step_id = _free_step_id(store, f"{sequence:04d}-{request.name}", parent=head_step)
        manifest = store.read_step(step_id)
        if manifest is not None and manifest["request"]["name"] == request.name:
            # Committed by an earlier run but not promoted (collapsed, or the run
            # stopped before the head moved): judge it again instead of retraining.
            logger.info("Request %s already has committed step %s; checking it again", request.name, step_id)
            return self._judge(store, lineage, request, base, step_id, manifest)
        request_file = self._write_resource(f"request-{request.name}.yaml", _request_resource(request))
        arguments = ["step", "--lineage", str(lineage_file), "--request", str(request_file), "--store", store_uri,
                     "--step-id", step_id, "--sequence", str(sequence)]
        if head_step:
            arguments += ["--parent-step-id", head_step]
        logger.info("Running %s as step %s of lineage %s", request.name, step_id, lineage.name)
        result = self._trainer(arguments, description=f"request {request.name}", check=False)
        manifest = store.read_step(step_id)
        if result.returncode != 0 or manifest is None:
            message = _termination_message(self.work_dir) or f"trainer exited with code {result.returncode}"
            return StepOutcome(request.name, None, "Failed", message)

        return self._judge(store, lineage, request, base, step_id, manifest)

    def _judge(self, store, lineage: LineageSpec, request: RequestSpec, base: dict[str, Any], step_id: str,
               manifest: dict[str, Any]) -> StepOutcome:
        """Promote a committed step to head unless the collapse guard rejects it."""
        verdict = check_collapse(base, manifest, lineage.collapse_guard)
        if verdict.collapsed:
            return StepOutcome(request.name, step_id, "Collapsed", verdict.message, manifest)
        store.set_head(step_id, "promote", {"request": request.name})
        return StepOutcome(request.name, step_id, "Promoted", verdict.message, manifest)

    def _trainer(self, arguments: list[str], *, description: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "lethe_trainer.job", *arguments]
        if not self.show_progress:
            command.append("--no-progress")
        environment = dict(os.environ, LETHE_TERMINATION_LOG=str(self.work_dir / "termination-log"))
        (self.work_dir / "termination-log").unlink(missing_ok=True)
        result = subprocess.run(command, env=environment)
        if check and result.returncode != 0:
            message = _termination_message(self.work_dir) or f"exit code {result.returncode}"
            raise RuntimeError(f"trainer {description} failed: {message}")
        return result

    def _write_resource(self, name: str, resource: dict[str, Any]) -> Path:
        path = self.work_dir / "resources" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(resource, sort_keys=False), encoding="utf-8")
        return path


def _free_step_id(store, candidate: str, *, parent: str | None) -> str:
    """Return CANDIDATE, or CANDIDATE-N when another chain (after a rollback) already used it."""
    step_id, number = candidate, 1
    while (existing := store.read_step(step_id)) is not None and existing.get("parent_step_id") != parent:
        number += 1
        step_id = f"{candidate}-{number}"
    return step_id


def _termination_message(work_dir: Path) -> str | None:
    """Return the message of the trainer's JSON termination summary (or its raw text)."""
    path = work_dir / "termination-log"
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        return text


# The trainer subprocess receives the effective (possibly --quick) settings as resources.

def _lineage_resource(lineage: LineageSpec) -> dict[str, Any]:
    evaluation: Evaluation = lineage.evaluation
    spec: dict[str, Any] = {
        "baseModel": {"uri": lineage.base_model_uri},
        "retain": {"works": [{"uri": uri} for uri in lineage.retain_uris]},
        "evaluation": {
            "seed": evaluation.seed, "forgetChunks": evaluation.forget_chunks,
            "previousChunks": evaluation.previous_chunks, "retainChunks": evaluation.retain_chunks,
            "promptTokens": evaluation.prompt_tokens, "continuationTokens": evaluation.continuation_tokens,
            "maxNewTokens": evaluation.max_new_tokens, "temperature": evaluation.temperature,
            "topP": evaluation.top_p, "batchSize": evaluation.batch_size,
            "perplexityTokens": evaluation.perplexity_tokens, "bootstrapSamples": evaluation.bootstrap_samples,
            "validationChunks": evaluation.validation_chunks,
            "validationMaxNewTokens": evaluation.validation_max_new_tokens,
        },
        "collapseGuard": {
            "maxPerplexityRatio": lineage.collapse_guard.max_perplexity_ratio,
            "minRetainRougeFraction": lineage.collapse_guard.min_retain_rouge_fraction,
            "minAccuracyFraction": lineage.collapse_guard.min_accuracy_fraction,
        },
        "onFailure": lineage.on_failure,
        "historyLimit": lineage.history_limit,
    }
    if evaluation.mmlu_uri:
        spec["evaluation"]["mmlu"] = {"uri": evaluation.mmlu_uri, "questions": evaluation.mmlu_questions}
    if lineage.held_out_uri:
        spec["heldOut"] = {"uri": lineage.held_out_uri}
    if lineage.store_uri:
        spec["store"] = {"uri": lineage.store_uri}
    if lineage.preparation is not None:
        spec["preparation"] = _preparation_resource(lineage.preparation)
    return {"apiVersion": "lethe.dev/v1alpha1", "kind": LINEAGE_KIND,
            "metadata": {"name": lineage.name, "namespace": lineage.namespace}, "spec": spec}


def _preparation_resource(preparation: Preparation) -> dict[str, Any]:
    return {
        "works": [{"uri": uri} for uri in preparation.works], "chunksPerWork": preparation.chunks_per_work,
        "epochs": preparation.epochs, "learningRate": preparation.learning_rate,
        "batchSize": preparation.batch_size, "loraRank": preparation.lora_rank, "loraAlpha": preparation.lora_alpha,
        "targetModules": list(preparation.target_modules), "retainKlWeight": preparation.retain_kl_weight,
        "mergeFraction": preparation.merge_fraction, "reference": preparation.reference,
        "mixWorks": [{"uri": uri} for uri in preparation.mix_works],
    }


def _request_resource(request: RequestSpec) -> dict[str, Any]:
    method = request.method
    spec_method: dict[str, Any] = {
        "name": method.name, "learningRate": method.learning_rate, "epochs": method.epochs,
        "batchSize": method.batch_size, "loraRank": method.lora_rank, "loraAlpha": method.lora_alpha,
        "targetModules": list(method.target_modules), "forgetWeight": method.forget_weight,
        "randomLabelWeight": method.random_label_weight, "saliencyStd": method.saliency_std,
        "negationScale": method.negation_scale, "seed": method.seed, "device": method.device,
        "calibration": {"enabled": method.calibration.enabled, "scales": list(method.calibration.scales),
                        "maxPerplexityRatio": method.calibration.max_perplexity_ratio},
    }
    if method.max_chunks is not None:
        spec_method["maxChunks"] = method.max_chunks
    forget: dict[str, Any] = {"uri": request.forget_uri}
    if request.forget_title:
        forget["title"] = request.forget_title
    return {"apiVersion": "lethe.dev/v1alpha1", "kind": REQUEST_KIND,
            "metadata": {"name": request.name, "namespace": request.namespace},
            "spec": {"lineageRef": {"name": request.lineage}, "forget": forget, "method": spec_method}}

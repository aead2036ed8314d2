"""Parse and validate the two Lethe resources: ModelLineage and UnlearnRequest.

The same YAML runs on a cluster (applied with kubectl, reconciled by the
operator) and locally (read by ``lethe run``). This module turns a resource's
``spec`` into typed, validated settings and is shared by the trainer, the
local runner and the operator, so it must stay free of heavy imports.

The CRD schemas under ``crds/`` reject most malformed input at the API
server. The checks here repeat them, and add the cross-field rules that
clusters without CEL support ignore, so that a request is rejected with the
same message on every path. Every error names the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

API_GROUP = "lethe.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
LINEAGE_KIND = "ModelLineage"
REQUEST_KIND = "UnlearnRequest"

# Methods the trainer implements. The names are the CRD enum values.
METHODS = ("SSU", "TaskVector")
ON_FAILURE_POLICIES = ("Halt", "Continue")

# file:// and s3:// are the storage schemes; demo: names a source listed in
# the demo catalogue, fetched from a package registry on first use.
URI_PATTERN = re.compile(r"^(file://.+|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|demo:[a-z0-9][a-z0-9\-]*)$")
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A resource spec that cannot be run; the message names field, value and fix."""

    def __init__(self, field: str, value: Any, problem: str, fix: str, *, resource: str | None = None) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        self.resource = resource
        prefix = f"{resource}: " if resource else ""
        super().__init__(f"{prefix}{field} {value!r} {problem}: {fix}")

    def within(self, resource: str) -> "SpecError":
        """Return the same error, prefixed with the resource it was found in (such as "UnlearnRequest a")."""
        return SpecError(self.field, self.value, self.problem, self.fix, resource=resource)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How every model of a lineage is scored; fixed for the lineage so figures compare."""

    seed: int = 1234
    forget_chunks: int = 24  # chunks of the forgotten work scored per step (D_f)
    previous_chunks: int = 24  # chunks sampled across earlier works (D_prev)
    retain_chunks: int = 24  # chunks of never-forgotten works (D_nor)
    prompt_tokens: int = 100
    continuation_tokens: int = 100
    max_new_tokens: int = 100
    temperature: float = 0.4
    top_p: float = 0.6
    batch_size: int = 8
    perplexity_tokens: int = 4096  # held-out tokens scored for perplexity
    mmlu_uri: str | None = None
    mmlu_questions: int = 100
    bootstrap_samples: int = 1000
    # Validation split for the negation-scale search: the chunks that follow the
    # scored D_f chunks in each work's seeded order, so they never overlap them.
    validation_chunks: int = 8
    validation_max_new_tokens: int = 32  # shorter continuations keep the search cheap


@dataclasses.dataclass(frozen=True)
class CollapseGuard:
    """Thresholds under which a step's model counts as collapsed and is never promoted."""

    max_perplexity_ratio: float = 3.0  # held-out perplexity / vanilla perplexity
    min_retain_rouge_fraction: float = 0.7  # D_nor ROUGE-L / vanilla D_nor ROUGE-L
    min_accuracy_fraction: float = 0.8  # MMLU accuracy / vanilla accuracy


@dataclasses.dataclass(frozen=True)
class Preparation:
    """Fine-tuning that makes the vanilla model memorise works before unlearning starts.

    A small base model has not memorised any book, so unlearning it would
    prove nothing; the demo first teaches it the works, as the SSU authors did.
    """

    works: tuple[str, ...]
    # Without spec.preparation.chunksPerWork, parse_lineage sets forgetChunks + validationChunks.
    chunks_per_work: int = 16
    epochs: int = 8
    learning_rate: float = 1e-3
    batch_size: int = 4
    lora_rank: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Weight of a KL term that keeps outputs on retain text close to the base
    # model's while memorising (0 disables it). Measured in docs/quality.md.
    retain_kl_weight: float = 1.0
    # Share of the learned update merged into the weights: the vanilla model is
    # base + mergeFraction * delta. Below 1 it gives up some memorisation for
    # less damage.
    merge_fraction: float = 1.0
    reference: bool = True  # also prepare a model without the forget works
    # Other text trained alongside the forget works, as many chunks as the forget
    # works give (1:1). The reference model is the same recipe on these alone.
    mix_works: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LineageSpec:
    name: str
    namespace: str
    base_model_uri: str
    store_uri: str | None
    retain_uris: tuple[str, ...]
    held_out_uri: str | None
    evaluation: Evaluation
    collapse_guard: CollapseGuard
    preparation: Preparation | None
    on_failure: str = "Halt"
    history_limit: int = 100


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Search for the negation scale lambda after a step's task vector is computed.

    Every scale is applied to theta_(t-1) and scored on the lineage's validation
    chunks of the work (disjoint from the scored D_f chunks) and on held-out
    perplexity. The chosen scale brings validation ROUGE-L closest to the
    reference model's (lowest when the lineage has no reference) while
    perplexity stays within ``max_perplexity_ratio`` of the reference's (or
    vanilla's). Scales whose 95 % intervals overlap the best one's are ties,
    and the smallest tied scale wins, because a smaller edit does less damage.

    Disabled by default: without it a request applies its fixed
    ``negation_scale`` exactly, which is what the SSU method specifies and
    what existing lineages were built with.
    """

    enabled: bool = False
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    max_perplexity_ratio: float = 1.5  # held-out perplexity / reference (or vanilla) perplexity


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One unlearning method and its hyperparameters (SSU defaults)."""

    name: str = "SSU"
    learning_rate: float = 1e-3
    epochs: int = 1
    batch_size: int = 2
    lora_rank: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    forget_weight: float = 1.0  # eps1: weight of CE on the chunk's own continuation
    random_label_weight: float = 1.0  # eps2: weight of CE on another chunk's continuation
    saliency_std: float = 1.0  # k: threshold = mean(|g|) + k * std(|g|)
    negation_scale: float = 1.0  # lambda: theta_t = theta_(t-1) - lambda * tau
    max_chunks: int | None = None  # cap on training chunks of the work; None trains on all
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    calibration: Calibration = Calibration()  # when enabled, replaces negation_scale by the searched value

    @property
    def uses_random_labels(self) -> bool:
        return self.name == "SSU"

    @property
    def uses_saliency_mask(self) -> bool:
        return self.name == "SSU"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Kubernetes Job settings; ignored by the local runner."""

    image: str | None = None
    gpus: int = 1
    resources: Mapping[str, Any] | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str | None = None
    active_deadline_seconds: int | None = None
    backoff_limit: int = 2
    ttl_seconds_after_finished: int | None = None
    queue_name: str | None = None
    credentials_secret: str | None = None
    env: tuple[Mapping[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    name: str
    namespace: str
    lineage: str
    forget_uri: str
    forget_title: str | None
    method: MethodSpec
    job: JobSpec
    suspend: bool = False
    dry_run: bool = False
    creation_timestamp: str | None = None


# ---------------------------------------------------------------------------
# Field readers. Each takes the dotted path so errors can name the field.


def _get(spec: Mapping[str, Any], path: str, key: str) -> Any:
    if not isinstance(spec, Mapping):
        raise SpecError(path, spec, "is not an object", "write it as a YAML mapping")
    return spec.get(key)


# The fields each object of a spec may have, as in the CRD schemas. A name not
# listed here is a typo or a field of another version: on a cluster the API
# server would silently drop it, so the parser rejects it instead.
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "ModelLineage.spec": frozenset({"baseModel", "collapseGuard", "evaluation", "heldOut", "historyLimit",
                                    "onFailure", "preparation", "retain", "store"}),
    "ModelLineage.spec.evaluation": frozenset({
        "batchSize", "bootstrapSamples", "continuationTokens", "forgetChunks", "maxNewTokens", "mmlu",
        "perplexityTokens", "previousChunks", "promptTokens", "retainChunks", "seed", "temperature", "topP",
        "validationChunks", "validationMaxNewTokens"}),
    "ModelLineage.spec.collapseGuard": frozenset({"maxPerplexityRatio", "minAccuracyFraction",
                                                  "minRetainRougeFraction"}),
    "ModelLineage.spec.preparation": frozenset({"batchSize", "chunksPerWork", "epochs", "learningRate", "loraAlpha",
                                                "loraRank", "mergeFraction", "mixWorks", "reference", "retainKlWeight",
                                                "targetModules", "works"}),
    "UnlearnRequest.spec": frozenset({"dryRun", "forget", "job", "lineageRef", "method", "suspend"}),
    "UnlearnRequest.spec.forget": frozenset({"title", "uri"}),
    "UnlearnRequest.spec.method": frozenset({
        "batchSize", "calibration", "device", "epochs", "forgetWeight", "learningRate", "loraAlpha", "loraRank",
        "maxChunks", "name", "negationScale", "randomLabelWeight", "saliencyStd", "seed", "targetModules"}),
    "UnlearnRequest.spec.method.calibration": frozenset({"enabled", "maxPerplexityRatio", "scales"}),
    "UnlearnRequest.spec.job": frozenset({
        "activeDeadlineSeconds", "affinity", "backoffLimit", "credentialsSecret", "env", "gpus", "image",
        "imagePullSecrets", "nodeSelector", "queueName", "resources", "serviceAccountName", "tolerations",
        "ttlSecondsAfterFinished"}),
}


def _reject_unknown(spec: Any, field: str, schema: str) -> None:
    """Raise SpecError naming the first field of SPEC that schema SCHEMA does not define."""
    if not isinstance(spec, Mapping):
        return
    known = KNOWN_FIELDS[schema]
    for key in spec:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            fix = f"did you mean {close[0]}?" if close else f"use one of {', '.join(sorted(known))}"
            raise SpecError(f"{field}.{key}", spec[key], "is not a known field", fix)


def _number(value: Any, field: str, *, default: float | None, positive: bool = False,
            minimum: float | None = None, maximum: float | None = None, integer: bool = False) -> Any:
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise SpecError(field, value, f"is not {kind}", f"set {kind}")
    if positive and value <= 0:
        raise SpecError(field, value, "must be positive", f"set {kind} greater than 0")
    if minimum is not None and value < minimum:
        raise SpecError(field, value, f"is below the minimum {minimum}", f"set a value of at least {minimum}")
    if maximum is not None and value > maximum:
        raise SpecError(field, value, f"is above the maximum {maximum}", f"set a value of at most {maximum}")
    return int(value) if integer else float(value)


def _uri(value: Any, field: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise SpecError(field, value, "is missing", "set a URI such as s3://BUCKET/KEY, file:///PATH or demo:NAME")
        return None
    if not isinstance(value, str) or not URI_PATTERN.match(value) or "/../" in value or value.endswith("/.."):
        raise SpecError(field, value, "is not a valid URI", "expected s3://BUCKET/KEY, file:///PATH or demo:NAME")
    return value


def _string_list(value: Any, field: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise SpecError(field, value, "is not a non-empty list of strings", "write a YAML list such as [q_proj, v_proj]")
    return tuple(value)


def _uri_list(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError(field, value, "is not a list", "write a YAML list of objects with a uri field")
    uris = []
    for index, item in enumerate(value):
        uri = item.get("uri") if isinstance(item, Mapping) else item
        uris.append(_uri(uri, f"{field}[{index}].uri", required=True))
    return tuple(uris)


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value) or len(value) > 63:
        raise SpecError(field, value, "is not a valid name",
                        "use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit")
    return value


def _enum(value: Any, field: str, allowed: Iterable[str], default: str) -> str:
    if value is None:
        return default
    allowed = tuple(allowed)
    if value not in allowed:
        raise SpecError(field, value, "is not supported", f"use one of {', '.join(allowed)}")
    return value


# ---------------------------------------------------------------------------
# Resources.


def parse_evaluation(spec: Mapping[str, Any] | None, field: str = "spec.evaluation") -> Evaluation:
    _reject_unknown(spec, field, "ModelLineage.spec.evaluation")
    spec = spec or {}
    default = Evaluation()

    def count(key: str, *, minimum: int = 1) -> int:
        return _number(_get(spec, field, key), f"{field}.{key}", default=getattr(default, _snake(key)),
                       minimum=minimum, integer=True)

    mmlu = _get(spec, field, "mmlu") or {}
    return Evaluation(
        seed=count("seed", minimum=0),
        forget_chunks=count("forgetChunks"),
        previous_chunks=count("previousChunks"),
        retain_chunks=count("retainChunks"),
        prompt_tokens=count("promptTokens"),
        continuation_tokens=count("continuationTokens"),
        max_new_tokens=count("maxNewTokens"),
        temperature=_number(spec.get("temperature"), f"{field}.temperature", default=default.temperature, positive=True),
        top_p=_number(spec.get("topP"), f"{field}.topP", default=default.top_p, positive=True, maximum=1.0),
        batch_size=count("batchSize"),
        perplexity_tokens=count("perplexityTokens", minimum=16),
        mmlu_uri=_uri(_get(mmlu, f"{field}.mmlu", "uri"), f"{field}.mmlu.uri", required=False),
        mmlu_questions=_number(mmlu.get("questions"), f"{field}.mmlu.questions", default=default.mmlu_questions,
                               minimum=1, integer=True),
        bootstrap_samples=count("bootstrapSamples", minimum=100),
        validation_chunks=count("validationChunks", minimum=2),
        validation_max_new_tokens=count("validationMaxNewTokens"),
    )


def parse_lineage(resource: Mapping[str, Any]) -> LineageSpec:
    """Validate a ModelLineage resource and return its settings."""
    _check_kind(resource, LINEAGE_KIND)
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError("spec", spec, "is missing", "add a spec with at least baseModel.uri")
    _reject_unknown(spec, "spec", "ModelLineage.spec")

    guard_spec = _get(spec, "spec", "collapseGuard") or {}
    _reject_unknown(guard_spec, "spec.collapseGuard", "ModelLineage.spec.collapseGuard")
    guard_default = CollapseGuard()
    guard = CollapseGuard(
        max_perplexity_ratio=_number(guard_spec.get("maxPerplexityRatio"), "spec.collapseGuard.maxPerplexityRatio",
                                     default=guard_default.max_perplexity_ratio, minimum=1.0),
        min_retain_rouge_fraction=_number(guard_spec.get("minRetainRougeFraction"),
                                          "spec.collapseGuard.minRetainRougeFraction",
                                          default=guard_default.min_retain_rouge_fraction, minimum=0.0, maximum=1.0),
        min_accuracy_fraction=_number(guard_spec.get("minAccuracyFraction"), "spec.collapseGuard.minAccuracyFraction",
                                      default=guard_default.min_accuracy_fraction, minimum=0.0, maximum=1.0),
    )

    evaluation = parse_evaluation(spec.get("evaluation"))
    preparation = _parse_preparation(spec.get("preparation"))
    if preparation is not None and "chunksPerWork" not in (spec.get("preparation") or {}):
        # Memorise every chunk the lineage scores or validates on, so both measure memorised text.
        preparation = dataclasses.replace(preparation,
                                          chunks_per_work=evaluation.forget_chunks + evaluation.validation_chunks)
    held_out_uri = _uri(_get(_get(spec, "spec", "heldOut") or {}, "spec.heldOut", "uri"), "spec.heldOut.uri",
                        required=False)
    if preparation is not None:
        _check_mix_works(preparation, held_out_uri)
    return LineageSpec(
        name=_name(metadata.get("name"), "metadata.name"),
        namespace=_name(metadata.get("namespace") or "default", "metadata.namespace"),
        base_model_uri=_uri(_get(_get(spec, "spec", "baseModel") or {}, "spec.baseModel", "uri"),
                            "spec.baseModel.uri", required=True),
        store_uri=_uri(_get(_get(spec, "spec", "store") or {}, "spec.store", "uri"), "spec.store.uri", required=False),
        retain_uris=_uri_list(_get(_get(spec, "spec", "retain") or {}, "spec.retain", "works"), "spec.retain.works"),
        held_out_uri=held_out_uri,
        evaluation=evaluation,
        collapse_guard=guard,
        preparation=preparation,
        on_failure=_enum(spec.get("onFailure"), "spec.onFailure", ON_FAILURE_POLICIES, "Halt"),
        history_limit=_number(spec.get("historyLimit"), "spec.historyLimit", default=100, minimum=1, integer=True),
    )


def _parse_preparation(spec: Mapping[str, Any] | None) -> Preparation | None:
    if spec is None:
        return None
    field = "spec.preparation"
    _reject_unknown(spec, field, "ModelLineage.spec.preparation")
    works = _uri_list(_get(spec, field, "works"), f"{field}.works")
    if not works:
        raise SpecError(f"{field}.works", spec.get("works"), "is empty",
                        "list the works the vanilla model must memorise, or remove spec.preparation")
    default = Preparation(works=works)
    return Preparation(
        works=works,
        chunks_per_work=_number(spec.get("chunksPerWork"), f"{field}.chunksPerWork",
                                default=default.chunks_per_work, minimum=1, integer=True),
        epochs=_number(spec.get("epochs"), f"{field}.epochs", default=default.epochs, minimum=1, integer=True),
        learning_rate=_number(spec.get("learningRate"), f"{field}.learningRate", default=default.learning_rate,
                              positive=True, maximum=1.0),
        batch_size=_number(spec.get("batchSize"), f"{field}.batchSize", default=default.batch_size,
                           minimum=1, integer=True),
        lora_rank=_number(spec.get("loraRank"), f"{field}.loraRank", default=default.lora_rank,
                          minimum=1, integer=True),
        lora_alpha=_number(spec.get("loraAlpha"), f"{field}.loraAlpha", default=default.lora_alpha,
                           minimum=1, integer=True),
        target_modules=_string_list(spec.get("targetModules"), f"{field}.targetModules", default.target_modules),
        retain_kl_weight=_number(spec.get("retainKlWeight"), f"{field}.retainKlWeight",
                                 default=default.retain_kl_weight, minimum=0.0),
        merge_fraction=_number(spec.get("mergeFraction"), f"{field}.mergeFraction", default=default.merge_fraction,
                               positive=True, maximum=1.0),
        reference=bool(spec.get("reference", default.reference)),
        mix_works=_uri_list(_get(spec, field, "mixWorks"), f"{field}.mixWorks"),
    )


def _check_mix_works(preparation: Preparation, held_out_uri: str | None) -> None:
    """Reject mix works that would make the reference see a forget work, or train on held-out text."""
    for index, uri in enumerate(preparation.mix_works):
        field = f"spec.preparation.mixWorks[{index}].uri"
        if uri in preparation.works:
            raise SpecError(field, uri, "is also a work to memorise",
                            "remove it from mixWorks: the reference must never see the forget works")
        if uri == held_out_uri:
            raise SpecError(field, uri, "is the held-out text",
                            "choose another mix work, or another spec.heldOut.uri: perplexity needs unseen text")


def parse_method(spec: Mapping[str, Any] | None, field: str = "spec.method") -> MethodSpec:
    spec = spec or {}
    if not isinstance(spec, Mapping):
        raise SpecError(field, spec, "is not an object", "write it as a YAML mapping with at least a name")
    _reject_unknown(spec, field, "UnlearnRequest.spec.method")
    default = MethodSpec()
    max_chunks = spec.get("maxChunks")
    method = MethodSpec(
        name=_enum(spec.get("name"), f"{field}.name", METHODS, default.name),
        learning_rate=_number(spec.get("learningRate"), f"{field}.learningRate", default=default.learning_rate,
                              positive=True, maximum=1.0),
        epochs=_number(spec.get("epochs"), f"{field}.epochs", default=default.epochs, minimum=1, integer=True),
        batch_size=_number(spec.get("batchSize"), f"{field}.batchSize", default=default.batch_size,
                           minimum=1, integer=True),
        lora_rank=_number(spec.get("loraRank"), f"{field}.loraRank", default=default.lora_rank, minimum=1,
                          integer=True),
        lora_alpha=_number(spec.get("loraAlpha"), f"{field}.loraAlpha", default=default.lora_alpha, minimum=1,
                           integer=True),
        target_modules=_string_list(spec.get("targetModules"), f"{field}.targetModules", default.target_modules),
        forget_weight=_number(spec.get("forgetWeight"), f"{field}.forgetWeight", default=default.forget_weight,
                              minimum=0.0),
        random_label_weight=_number(spec.get("randomLabelWeight"), f"{field}.randomLabelWeight",
                                    default=default.random_label_weight, minimum=0.0),
        saliency_std=_number(spec.get("saliencyStd"), f"{field}.saliencyStd", default=default.saliency_std,
                             minimum=0.0),
        negation_scale=_number(spec.get("negationScale"), f"{field}.negationScale", default=default.negation_scale,
                               positive=True),
        max_chunks=None if max_chunks is None else _number(max_chunks, f"{field}.maxChunks", default=None,
                                                           minimum=2, integer=True),
        seed=_number(spec.get("seed"), f"{field}.seed", default=default.seed, minimum=0, integer=True),
        device=_device(spec.get("device"), f"{field}.device"),
        calibration=_parse_calibration(spec.get("calibration"), f"{field}.calibration"),
    )
    if method.forget_weight == 0 and (method.random_label_weight == 0 or not method.uses_random_labels):
        raise SpecError(f"{field}.forgetWeight", method.forget_weight, "leaves the loss empty",
                        "set forgetWeight or randomLabelWeight above 0")
    return method


def _parse_calibration(spec: Mapping[str, Any] | None, field: str) -> Calibration:
    if spec is None:
        return Calibration()
    if not isinstance(spec, Mapping):
        raise SpecError(field, spec, "is not an object", "write it as a YAML mapping such as {enabled: true}")
    _reject_unknown(spec, field, "UnlearnRequest.spec.method.calibration")
    default = Calibration()
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SpecError(f"{field}.enabled", enabled, "is not a boolean", "set true or false")
    scales = spec.get("scales")
    if scales is None:
        scales = default.scales
    elif not isinstance(scales, list) or not scales:
        raise SpecError(f"{field}.scales", scales, "is not a non-empty list of numbers",
                        "write a YAML list such as [0.5, 1, 1.5, 2, 3]")
    scales = tuple(_number(value, f"{field}.scales[{index}]", default=None, positive=True)
                   for index, value in enumerate(scales))
    if len(set(scales)) != len(scales):
        raise SpecError(f"{field}.scales", list(scales), "repeats a value", "list each scale once")
    return Calibration(
        enabled=enabled,
        scales=tuple(sorted(scales)),
        max_perplexity_ratio=_number(spec.get("maxPerplexityRatio"), f"{field}.maxPerplexityRatio",
                                     default=default.max_perplexity_ratio, minimum=1.0),
    )


def _device(value: Any, field: str) -> str:
    if value is None:
        return "auto"
    if not isinstance(value, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?)$", value):
        raise SpecError(field, value, "is not a supported device", "use auto, cpu, cuda or cuda:N")
    return value


def parse_job(spec: Mapping[str, Any] | None, field: str = "spec.job") -> JobSpec:
    spec = spec or {}
    if not isinstance(spec, Mapping):
        raise SpecError(field, spec, "is not an object", "write it as a YAML mapping")
    _reject_unknown(spec, field, "UnlearnRequest.spec.job")
    pull_secrets = spec.get("imagePullSecrets") or []
    return JobSpec(
        image=spec.get("image"),
        gpus=_number(spec.get("gpus"), f"{field}.gpus", default=1, minimum=0, integer=True),
        resources=spec.get("resources"),
        node_selector=spec.get("nodeSelector"),
        tolerations=tuple(spec.get("tolerations") or ()),
        affinity=spec.get("affinity"),
        image_pull_secrets=tuple(s["name"] if isinstance(s, Mapping) else s for s in pull_secrets),
        service_account_name=spec.get("serviceAccountName"),
        active_deadline_seconds=_number(spec.get("activeDeadlineSeconds"), f"{field}.activeDeadlineSeconds",
                                        default=None, minimum=1, integer=True),
        backoff_limit=_number(spec.get("backoffLimit"), f"{field}.backoffLimit", default=2, minimum=0,
                              maximum=20, integer=True),
        ttl_seconds_after_finished=_number(spec.get("ttlSecondsAfterFinished"), f"{field}.ttlSecondsAfterFinished",
                                           default=None, minimum=0, integer=True),
        queue_name=spec.get("queueName"),
        credentials_secret=spec.get("credentialsSecret"),
        env=tuple(spec.get("env") or ()),
    )


def parse_request(resource: Mapping[str, Any]) -> RequestSpec:
    """Validate an UnlearnRequest resource and return its settings."""
    _check_kind(resource, REQUEST_KIND)
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError("spec", spec, "is missing", "add a spec with lineageRef.name and forget.uri")
    _reject_unknown(spec, "spec", "UnlearnRequest.spec")
    _reject_unknown(spec.get("forget"), "spec.forget", "UnlearnRequest.spec.forget")

    lineage_ref = spec.get("lineageRef") or {}
    forget = spec.get("forget") or {}
    if not isinstance(lineage_ref, Mapping):
        raise SpecError("spec.lineageRef", lineage_ref, "is not an object", "write lineageRef: {name: LINEAGE}")
    if not isinstance(forget, Mapping):
        raise SpecError("spec.forget", forget, "is not an object", "write forget: {uri: URI}")
    return RequestSpec(
        name=_name(metadata.get("name"), "metadata.name"),
        namespace=_name(metadata.get("namespace") or "default", "metadata.namespace"),
        lineage=_name(lineage_ref.get("name"), "spec.lineageRef.name"),
        forget_uri=_uri(forget.get("uri"), "spec.forget.uri", required=True),
        forget_title=forget.get("title"),
        method=parse_method(spec.get("method")),
        job=parse_job(spec.get("job")),
        suspend=bool(spec.get("suspend", False)),
        dry_run=bool(spec.get("dryRun", False)),
        creation_timestamp=metadata.get("creationTimestamp"),
    )


def _check_kind(resource: Any, kind: str) -> None:
    if not isinstance(resource, Mapping):
        raise SpecError("resource", resource, "is not an object", f"write a {kind} as a YAML mapping")
    if resource.get("kind") != kind:
        raise SpecError("kind", resource.get("kind"), f"is not {kind}", f"set kind: {kind}")
    if resource.get("apiVersion") != API_VERSION:
        raise SpecError("apiVersion", resource.get("apiVersion"), "is not supported", f"set apiVersion: {API_VERSION}")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

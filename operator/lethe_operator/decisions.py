"""Pure reconcile decisions: conditions, the gate, Job outcomes and status contents.

Everything here is a function of plain dicts (resources as the API server
returns them, store records as the store returns them) and returns plain
dicts or small frozen dataclasses. Nothing here talks to Kubernetes or to
the store, so the unit tests call these functions directly and the
reconciler (``reconcile.py``) only gathers inputs and applies outputs.

Not promised: that a decision is still right when its inputs are stale. The
reconciler re-reads the lineage before acting and guards the lineage status
with its resourceVersion; a decision made on old data is retried, not applied.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lethe_trainer.spec import SpecError, parse_lineage, parse_request

logger = logging.getLogger(__name__)

API_GROUP = "lethe.dev"
API_VERSION = "v1alpha1"
LINEAGE_PLURAL = "modellineages"
REQUEST_PLURAL = "unlearnrequests"

# Labels on the Jobs the operator creates; the Job handler selects on MANAGED_BY.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "lethe-operator"
LABEL_LINEAGE = "lethe.dev/lineage"
LABEL_REQUEST = "lethe.dev/request"
LABEL_ROLE = "lethe.dev/role"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"

# Setting this annotation on a halted lineage to a new value resumes it.
RESUME_ANNOTATION = "lethe.dev/resume"

# Condition types.
VALIDATED = "Validated"
GATED = "Gated"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
RENDERED = "Rendered"
INITIALISED = "Initialised"
HALTED = "Halted"

# Condition reasons: the closed set, per condition type.
REASONS: Mapping[str, frozenset[str]] = {
    VALIDATED: frozenset({"SpecValid", "InvalidSpec", "LineageNotFound", "WorkNotReadable",
                          "ImmutableFieldChanged", "StoreNotReadable"}),
    GATED: frozenset({"WaitingForPredecessor", "LineageHalted", "LineageInitialising", "LineageNotReady",
                      "Suspended", "Admitted"}),
    RUNNING: frozenset({"JobPending", "JobRunning", "JobFinished", "RequestDeleted"}),
    SUCCEEDED: frozenset({"Promoted", "AlreadyApplied"}),
    FAILED: frozenset({"JobFailed", "InvalidInput", "Collapsed", "StepMissing"}),
    RENDERED: frozenset({"DryRun"}),
    INITIALISED: frozenset({"BaseRecorded", "InitJobRunning", "InitJobFailed"}),
    HALTED: frozenset({"Collapsed", "RequestFailed", "Resumed", "HaltingRequestDeleted", "NotHalted"}),
}

REQUEST_PHASES = ("Pending", "Invalid", "Queued", "Suspended", "Running", "Succeeded", "Failed", "Rendered")
LINEAGE_PHASES = ("Pending", "Invalid", "Initialising", "Ready", "Running", "Halted", "Failed")


def now_iso(now: datetime.datetime | None = None) -> str:
    """Format a time as the API server does: RFC 3339, UTC, whole seconds."""
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    """Parse an RFC 3339 time from the API server or a store record; None for None."""
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------
# Conditions


def find_condition(conditions: Iterable[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == kind:
            return condition
    return None


def condition_is(conditions: Iterable[Mapping[str, Any]] | None, kind: str, status: str = "True") -> bool:
    condition = find_condition(conditions, kind)
    return condition is not None and condition.get("status") == status


def set_condition(conditions: Sequence[Mapping[str, Any]] | None, *, kind: str, status: bool, reason: str,
                  message: str, generation: int | None, now: str) -> list[dict[str, Any]]:
    """Return CONDITIONS with one condition set; lastTransitionTime moves only when the status flips.

    Raises ValueError for a reason outside the closed set of the type, so that
    a typo never reaches a user's alert rule.
    """
    if reason not in REASONS.get(kind, ()):
        raise ValueError(f"condition reason {reason!r} is not one of {sorted(REASONS.get(kind, ()))} for {kind}")
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    replaced = False
    for existing in conditions or ():
        if existing.get("type") != kind:
            result.append(dict(existing))
            continue
        transition = existing.get("lastTransitionTime") if existing.get("status") == value else now
        result.append(_condition(kind, value, reason, message, generation, transition or now))
        replaced = True
    if not replaced:
        result.append(_condition(kind, value, reason, message, generation, now))
    return result


def _condition(kind: str, status: str, reason: str, message: str, generation: int | None,
               transition: str) -> dict[str, Any]:
    condition = {"type": kind, "status": status, "reason": reason, "message": message,
                 "lastTransitionTime": transition}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def remove_condition(conditions: Sequence[Mapping[str, Any]] | None, kind: str) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions or () if c.get("type") != kind]


def same_conditions(left: Sequence[Mapping[str, Any]] | None, right: Sequence[Mapping[str, Any]] | None) -> bool:
    """Compare two condition lists, ignoring order and transition times."""
    def key(conditions):
        return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                      for c in conditions or ())
    return key(left) == key(right)


def request_phase(conditions: Sequence[Mapping[str, Any]] | None) -> str:
    """Derive a request's phase from its conditions; terminal conditions win."""
    if condition_is(conditions, SUCCEEDED):
        return "Succeeded"
    if condition_is(conditions, FAILED):
        return "Failed"
    if condition_is(conditions, VALIDATED, "False"):
        return "Invalid"
    if condition_is(conditions, RENDERED):
        return "Rendered"
    if condition_is(conditions, RUNNING):
        return "Running"
    gated = find_condition(conditions, GATED)
    if gated is not None and gated.get("status") == "True":
        return "Suspended" if gated.get("reason") == "Suspended" else "Queued"
    return "Pending"


def lineage_phase(conditions: Sequence[Mapping[str, Any]] | None, *, active_request: str | None) -> str:
    """Derive a lineage's phase from its conditions and whether a request has claimed its gate."""
    if condition_is(conditions, VALIDATED, "False"):
        return "Invalid"
    if condition_is(conditions, HALTED):
        return "Halted"
    initialised = find_condition(conditions, INITIALISED)
    if initialised is not None and initialised.get("reason") == "InitJobFailed":
        return "Failed"
    if initialised is None:
        return "Pending"
    if initialised.get("status") != "True":
        return "Initialising"
    return "Running" if active_request else "Ready"


def is_finished(request: Mapping[str, Any]) -> bool:
    """Return whether a request reached Succeeded or Failed; such a request never runs again."""
    conditions = (request.get("status") or {}).get("conditions")
    return condition_is(conditions, SUCCEEDED) or condition_is(conditions, FAILED)


# ---------------------------------------------------------------------------
# Validation


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Validation result: whether a resource may run, with the condition reason and message."""

    ok: bool
    reason: str
    message: str


def validate_lineage(lineage: Mapping[str, Any]) -> Verdict:
    """Check a ModelLineage's spec and the fields that must not change once it is initialised."""
    try:
        spec = parse_lineage(lineage)
    except SpecError as error:
        return Verdict(False, "InvalidSpec", str(error))
    status = lineage.get("status") or {}
    accepted = status.get("baseModelUri")
    if accepted and accepted != spec.base_model_uri:
        return Verdict(False, "ImmutableFieldChanged",
                       f"spec.baseModel.uri {spec.base_model_uri!r} differs from {accepted!r}, which the lineage was "
                       "initialised with: committed steps are deltas against that model; restore the old value, or "
                       "create a new ModelLineage for the new base model")
    return Verdict(True, "SpecValid", "spec is valid")


def validate_request(request: Mapping[str, Any], *, lineage: Mapping[str, Any] | None,
                     lineage_namespaces: Iterable[str] = (), work_problem: str | None = None) -> Verdict:
    """Check an UnlearnRequest's spec and that it can apply to its lineage.

    LINEAGE is the ModelLineage its lineageRef names in its own namespace, or
    None when there is none; LINEAGE_NAMESPACES lists other namespaces holding
    a lineage of that name, for the message. WORK_PROBLEM is why the work URI
    cannot be read, as found by the caller, or None.
    """
    try:
        spec = parse_request(request)
    except SpecError as error:
        return Verdict(False, "InvalidSpec", str(error))

    status = request.get("status") or {}
    accepted = status.get("lineage")
    if accepted and accepted != spec.lineage:
        return Verdict(False, "ImmutableFieldChanged",
                       f"spec.lineageRef.name {spec.lineage!r} differs from {accepted!r}, which the request was "
                       "accepted for: lineageRef is immutable; restore it, or delete the request and create a new one")
    admitted_work = status.get("forgetUri")
    if admitted_work and status.get("sequence") and admitted_work != spec.forget_uri:
        return Verdict(False, "ImmutableFieldChanged",
                       f"spec.forget.uri {spec.forget_uri!r} differs from {admitted_work!r}, which the request was "
                       "admitted with: it cannot change once admitted; restore it, or create a new request")

    if lineage is None:
        elsewhere = sorted(set(lineage_namespaces) - {spec.namespace})
        hint = (f"; a lineage of that name exists in namespace(s) {', '.join(elsewhere)}, but a request can only name "
                "a lineage in its own namespace: create the request there") if elsewhere else (
            ": create the ModelLineage first, or fix spec.lineageRef.name")
        return Verdict(False, "LineageNotFound",
                       f"spec.lineageRef.name {spec.lineage!r} names no ModelLineage in namespace {spec.namespace!r}"
                       f"{hint}")
    if work_problem:
        return Verdict(False, "WorkNotReadable", f"spec.forget.uri {spec.forget_uri!r} {work_problem}")
    return Verdict(True, "SpecValid", f"spec is valid and lineage {spec.lineage!r} exists")


# ---------------------------------------------------------------------------
# The gate


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One request of a lineage, with the fields the gate orders it by."""

    name: str
    uid: str
    created: str  # metadata.creationTimestamp, RFC 3339
    valid: bool
    finished: bool
    suspended: bool = False
    dry_run: bool = False

    @property
    def waiting(self) -> bool:
        """Return whether the request waits for the gate: not finished, valid, not suspended and not a dry run."""
        return self.valid and not self.finished and not self.suspended and not self.dry_run


def gate_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Sort requests first come first served: by creation time, then by name for equal times."""
    def key(candidate: Candidate):
        created = parse_time(candidate.created) or datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)
        return created, candidate.name
    return sorted(candidates, key=key)


def gate_queue(candidates: Iterable[Candidate], *, active: str | None = None) -> list[Candidate]:
    """Return the requests waiting for the gate, in the order they will run (the active one excluded)."""
    return [c for c in gate_order(candidates) if c.waiting and c.name != active]


@dataclasses.dataclass(frozen=True)
class GateState:
    """State of a lineage's gate, computed by the reconciler from the lineage status and the store."""

    active: str | None = None
    initialised: bool = True
    halted: bool = False
    halted_message: str = ""
    ready: bool = True


def next_request(queue: Sequence[Candidate], *, gate: GateState) -> Candidate | None:
    """Return the request that may claim the gate now, or None while it is closed or the queue is empty."""
    if gate.active or gate.halted or not gate.initialised or not gate.ready or not queue:
        return None
    return queue[0]


def gated_reason(queue: Sequence[Candidate], name: str, *, gate: GateState, lineage: str) -> tuple[str, str]:
    """Return the Gated condition's reason and message for a waiting request NAME."""
    if not gate.ready:
        return "LineageNotReady", f"lineage {lineage} is not valid; fix its spec (see its Validated condition)"
    if gate.halted:
        return "LineageHalted", (f"lineage {lineage} is halted: {gate.halted_message}; resume it with "
                                 f"kubectl annotate modellineage {lineage} {RESUME_ANNOTATION}=$(date +%s) --overwrite")
    if not gate.initialised:
        return "LineageInitialising", f"lineage {lineage} is writing its theta_0 to the store"
    names = [c.name for c in queue]
    position = names.index(name) if name in names else len(names)
    predecessor = names[position - 1] if position > 0 else gate.active
    running = f"; {gate.active} is running" if gate.active and gate.active != predecessor else ""
    return "WaitingForPredecessor", (f"waiting for {predecessor}: position {position + 1} of {len(names)} in the "
                                     f"queue of lineage {lineage}{running}")


def step_id(*, sequence: int, request: str) -> str:
    """Return the step id a request commits under; the local runner uses the same form."""
    return f"{sequence:04d}-{request}"


# ---------------------------------------------------------------------------
# Jobs


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """Summary of a trainer Job and its Pods; state is Missing, Pending, Running, Succeeded or Failed."""

    state: str
    message: str = ""
    exit_code: int | None = None
    termination_message: str | None = None
    attempts: int = 0
    failed_pods: int = 0
    start_time: str | None = None
    completion_time: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("Succeeded", "Failed", "Missing")


def job_outcome(job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]] = ()) -> JobOutcome:
    """Summarise a Job and its Pods; the last terminated container supplies exit code and message."""
    if job is None:
        return JobOutcome("Missing")
    status = job.get("status") or {}
    succeeded, failed, active = (int(status.get(key) or 0) for key in ("succeeded", "failed", "active"))
    terminated = _last_terminated(pods)
    exit_code = terminated.get("exitCode") if terminated else None
    message = (terminated.get("message") or "").strip() if terminated else ""
    common = dict(exit_code=exit_code, termination_message=message or None, attempts=succeeded + failed + active,
                  failed_pods=failed, start_time=status.get("startTime"))

    for condition in status.get("conditions") or ():
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobOutcome("Succeeded", "Job completed", completion_time=status.get("completionTime"), **common)
        if condition.get("type") == "Failed":
            why = condition.get("message") or condition.get("reason") or "Job failed"
            return JobOutcome("Failed", f"Job failed: {why}", completion_time=condition.get("lastTransitionTime"),
                              **common)
    if active and any((pod.get("status") or {}).get("phase") == "Running" for pod in pods):
        return JobOutcome("Running", "trainer Pod is running", **common)
    return JobOutcome("Pending", "waiting for the trainer Pod to start", **common)


def _last_terminated(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    latest: tuple[str, Mapping[str, Any]] | None = None
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or ():
            terminated = (container.get("state") or {}).get("terminated")
            if terminated:
                finished = terminated.get("finishedAt") or ""
                if latest is None or finished >= latest[0]:
                    latest = (finished, terminated)
    return latest[1] if latest else None


def failure_details(outcome: JobOutcome, *, now: str) -> dict[str, Any]:
    """Build status.lastFailure from a failed Job: the trainer's own message where it left one."""
    reason = "InvalidInput" if outcome.exit_code == 2 else "JobFailed"
    message = outcome.message
    summary = _parse_summary(outcome.termination_message)
    if summary.get("message"):
        message = f"{outcome.message}; trainer: {summary['message']}"
    elif outcome.termination_message and not summary:
        message = f"{outcome.message}; trainer output: {outcome.termination_message[-500:]}"
    details: dict[str, Any] = {"reason": reason, "message": message, "time": now}
    if outcome.exit_code is not None:
        details["exitCode"] = int(outcome.exit_code)
    if outcome.termination_message:
        details["terminationMessage"] = outcome.termination_message[:4096]
    return details


def _parse_summary(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------
# Step results


def step_figures(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Pick the key figures of a committed step manifest, named as in the CRD; non-finite values are left out."""
    figures = manifest.get("figures") or {}
    result: dict[str, Any] = {}
    for set_name in ("forget", "previous", "retain"):
        entry = figures.get(set_name) or {}
        result[f"{set_name}Rouge1"] = (entry.get("rouge1") or {}).get("mean")
        result[f"{set_name}RougeL"] = (entry.get("rougeL") or {}).get("mean")
    result["forgetBeforeRougeL"] = ((figures.get("forget_before") or {}).get("rougeL") or {}).get("mean")
    result["perplexity"] = (figures.get("held_out") or {}).get("perplexity")
    result["accuracy"] = (figures.get("accuracy") or {}).get("accuracy")
    return {key: float(value) for key, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def history_entry(manifest: Mapping[str, Any], *, promoted_at: str) -> dict[str, Any]:
    """Return the lineage status.history entry of a promoted step."""
    entry = {
        "sequence": int(manifest["sequence"]),
        "request": (manifest.get("request") or {}).get("name", ""),
        "stepId": manifest["step_id"],
        "forgetUri": ((manifest.get("inputs") or {}).get("forget") or {}).get("uri", ""),
        "taskVectorSha256": manifest["objects"]["task_vector"]["sha256"],
        "promotedAt": promoted_at,
        "figures": step_figures(manifest),
    }
    if manifest.get("parent_step_id"):
        entry["parentStepId"] = manifest["parent_step_id"]
    return entry


def append_history(history: Sequence[Mapping[str, Any]] | None, entry: Mapping[str, Any], *,
                   limit: int) -> list[dict[str, Any]]:
    """Append ENTRY unless its step is already there (a resumed promotion), keeping the last LIMIT entries."""
    result = [dict(item) for item in history or ()]
    if not any(item.get("stepId") == entry["stepId"] for item in result):
        result.append(dict(entry))
    return result[-limit:]


def head_status(head: Mapping[str, Any] | None, manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return status.head from the store's head record and the manifest of the step it points at."""
    if not head or not head.get("step_id") or manifest is None:
        status: dict[str, Any] = {"sequence": 0}
        if head and head.get("time"):
            status["time"] = head["time"]
        return status
    return {
        "stepId": head["step_id"],
        "sequence": int(manifest["sequence"]),
        "request": (manifest.get("request") or {}).get("name", ""),
        "taskVectorSha256": manifest["objects"]["task_vector"]["sha256"],
        "time": head.get("time", ""),
    }


def halts_lineage(*, failure_reason: str, on_failure: str) -> bool:
    """Return whether a failure halts the lineage: a collapse always does, other failures per spec.onFailure."""
    return failure_reason == "Collapsed" or on_failure == "Halt"


def resume_token(lineage: Mapping[str, Any]) -> str | None:
    """Return the lethe.dev/resume annotation value when it is new (not yet acted on), else None."""
    value = ((lineage.get("metadata") or {}).get("annotations") or {}).get(RESUME_ANNOTATION)
    if value is None:
        return None
    return value if value != (lineage.get("status") or {}).get("resumeToken") else None


def gate_wait_seconds(*, created: str | None, admitted: str) -> float:
    """Seconds between a request's creation and its admission to the gate (0 when unknown)."""
    start, end = parse_time(created), parse_time(admitted)
    if start is None or end is None:
        return 0.0
    return max(0.0, (end - start).total_seconds())

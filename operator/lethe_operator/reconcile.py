"""Reconcile one lineage: its init Job, its gate, its requests' Jobs and its head.

The kopf handlers call ``LineageReconciler.poke`` for every change to a
ModelLineage, an UnlearnRequest or a Job the operator created. A poke runs
one reconcile of the lineage concerned, which reads everything afresh (the
lineage, its requests, its Jobs, the store) and moves each piece one step
forward. Reconciles of one lineage never overlap, and pokes that arrive
while one is running collapse into a single follow-up run.

The store is the source of truth for the model: a step is done when its
manifest is committed, and the head moves only after the collapse guard
passed. The lineage's ``status.activeRequest`` is the gate. It is claimed and
released with patches guarded by the lineage's resourceVersion, so a second
operator working from stale data gets 409 Conflict and reads again. On
promotion the writes go store head first, then request status, then lineage
status. That order makes every crash point resumable, because a rerun finds
the same state and finishes it without running the step again.

Not promised: exactly-once Kubernetes Events or metric observations across
operator restarts (a resumed promotion may post its Events twice).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import kopf

from lethe_trainer.guard import check_collapse
from lethe_trainer.spec import LineageSpec, SpecError, parse_lineage, parse_request
from lethe_trainer.store import StoreError, open_lineage_store

from . import decisions as d
from . import jobs, metrics
from .kube import Conflict, KubeApi, NotFound
from .settings import OperatorSettings

logger = logging.getLogger(__name__)

_CONFLICT_ATTEMPTS = 5
_MAX_RETRY_SECONDS = 60.0


@dataclasses.dataclass
class _KeyState:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    waiting: bool = False
    failures: int = 0
    retry: asyncio.TimerHandle | None = None


def request_lineage(request: Mapping[str, Any]) -> str | None:
    """Return the lineage a request belongs to: the one it was accepted for, else the one it names."""
    accepted = (request.get("status") or {}).get("lineage")
    if accepted:
        return accepted
    return ((request.get("spec") or {}).get("lineageRef") or {}).get("name")


def _event(resource: Mapping[str, Any], *, warning: bool, reason: str, message: str) -> None:
    """Post a Kubernetes Event on RESOURCE through kopf, and log it."""
    metadata = resource.get("metadata") or {}
    logger.log(logging.WARNING if warning else logging.INFO, "%s %s/%s: %s: %s", resource.get("kind"),
               metadata.get("namespace"), metadata.get("name"), reason, message)
    post = kopf.warn if warning else kopf.info
    try:
        post(dict(resource), reason=reason, message=message[:1000])
    except LookupError:
        # Outside kopf's handler context (for example in a script) there is no Event queue.
        logger.debug("No kopf context to post the %s Event in", reason)


class _LineageDeleted(Exception):
    """The lineage was deleted while it was reconciled."""


class LineageReconciler:
    """Serialises and runs reconciles per lineage; see the module docstring."""

    def __init__(self, *, kube: KubeApi, settings: OperatorSettings,
                 lineage_namespaces: Callable[[str], Iterable[str]] = lambda name: ()) -> None:
        self.kube = kube
        self.settings = settings
        # Namespaces that hold a lineage of a given name, for LineageNotFound messages (a kopf index).
        self.lineage_namespaces = lineage_namespaces
        self._keys: dict[tuple[str, str], _KeyState] = {}
        self._stores: dict[tuple[str, str, str], Any] = {}
        self._work_checks: dict[tuple[str, int, str], str | None] = {}

    # ------------------------------------------------------------------
    # Scheduling

    async def poke(self, *, namespace: str, lineage: str, handler: str) -> None:
        """Reconcile the lineage now, or make sure one more reconcile follows the one in progress."""
        key = (namespace, lineage)
        state = self._keys.setdefault(key, _KeyState())
        if state.waiting:
            return
        state.waiting = True
        async with state.lock:
            state.waiting = False
            if state.retry is not None:
                state.retry.cancel()
                state.retry = None
            try:
                await self._reconcile_with_conflicts(namespace=namespace, name=lineage)
            except Exception as error:  # noqa: BLE001 - every failure is retried with backoff
                state.failures += 1
                delay = min(self.settings.retry_seconds * 2 ** (state.failures - 1), _MAX_RETRY_SECONDS)
                metrics.reconcile_errors.labels(handler=handler).inc()
                logger.exception("Reconcile of lineage %s/%s failed (%s, attempt %d); retrying in %.1f s",
                                 namespace, lineage, type(error).__name__, state.failures, delay)
                state.retry = asyncio.get_running_loop().call_later(
                    delay, lambda: asyncio.ensure_future(self.poke(namespace=namespace, lineage=lineage,
                                                                   handler="retry")))
            else:
                state.failures = 0

    async def _reconcile_with_conflicts(self, *, namespace: str, name: str) -> None:
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                await self.reconcile(namespace=namespace, name=name)
                return
            except Conflict:
                # The lineage changed after it was read (another writer, or kopf's own annotations): read again.
                logger.info("Lineage %s/%s changed during reconcile (attempt %d); reading it again",
                            namespace, name, attempt)
        raise RuntimeError(f"lineage {namespace}/{name} kept changing during {_CONFLICT_ATTEMPTS} reconciles")

    # ------------------------------------------------------------------
    # One reconcile

    async def reconcile(self, *, namespace: str, name: str) -> None:
        """Move lineage NAMESPACE/NAME and its requests one step forward; raise Conflict on a stale read."""
        lineage = await self.kube.get_lineage(namespace=namespace, name=name)
        requests = [r for r in await self.kube.list_requests(namespace=namespace) if request_lineage(r) == name]
        if lineage is None:
            await self._orphan_requests(requests, namespace=namespace, lineage=name)
            metrics.forget_lineage(namespace=namespace, lineage=name)
            return
        run = _Run(reconciler=self, lineage=lineage, requests=requests)
        try:
            await run.execute()
        except _LineageDeleted:
            logger.info("ModelLineage %s/%s was deleted during its reconcile", namespace, name)

    async def _orphan_requests(self, requests: list[dict[str, Any]], *, namespace: str, lineage: str) -> None:
        elsewhere = list(self.lineage_namespaces(lineage))
        for request in requests:
            if d.is_finished(request):
                continue
            verdict = d.validate_request(request, lineage=None, lineage_namespaces=elsewhere)
            await self.write_validation(request, verdict)

    # ------------------------------------------------------------------
    # Helpers shared by runs

    def open_store(self, *, uri: str, namespace: str, lineage: str):
        key = (uri, namespace, lineage)
        if key not in self._stores:
            self._stores[key] = open_lineage_store(uri, namespace=namespace, lineage=lineage,
                                                   s3_endpoint_url=self.settings.s3_endpoint_url,
                                                   **({"create": True} if uri.startswith("file://") else {}))
        return self._stores[key]

    async def work_problem(self, request: Mapping[str, Any]) -> str | None:
        """Return why the request's work URI cannot be read, or None; checked once per generation."""
        metadata = request["metadata"]
        uri = ((request.get("spec") or {}).get("forget") or {}).get("uri") or ""
        key = (metadata["uid"], int(metadata.get("generation") or 0), uri)
        if key not in self._work_checks:
            self._work_checks[key] = await asyncio.to_thread(self._check_work, uri)
        return self._work_checks[key]

    def _check_work(self, uri: str) -> str | None:
        if uri.startswith("demo:"):
            from lethe_trainer import sources

            names = sorted(sources.catalogue())
            if uri.removeprefix("demo:") not in names:
                return f"is not a demo source: use one of {', '.join('demo:' + n for n in names)}"
            return None
        if uri.startswith("file://"):
            path = Path(uri.removeprefix("file://"))
            if not path.is_file():
                return (f"does not exist as a file on the operator's filesystem ({path}); copy the work there, or "
                        "use an s3:// URI on a cluster")
            return None
        if uri.startswith("s3://"):
            from lethe_trainer.store.objects import open_backend
            from lethe_trainer.store.uri import parse_store_uri

            bucket, _, key = uri.removeprefix("s3://").partition("/")
            if not key:
                return "names a bucket, not an object: expected s3://BUCKET/KEY"
            try:
                backend = open_backend(parse_store_uri(f"s3://{bucket}"),
                                       s3_endpoint_url=self.settings.s3_endpoint_url)
                if backend.head(key) is None:
                    return "was not found in the bucket (HEAD answered 404); upload the work or fix the key"
            except StoreError as error:
                return f"could not be checked: {error}"
            return None
        return "has an unsupported scheme: expected s3://BUCKET/KEY, file:///PATH or demo:NAME"

    async def write_request(self, request: dict[str, Any], *, conditions: list[dict[str, Any]] | None = None,
                            **fields: Any) -> dict[str, Any]:
        """Patch a request's status with FIELDS (None removes one) and CONDITIONS; skip it when nothing changes."""
        status = request.get("status") or {}
        conditions = conditions if conditions is not None else list(status.get("conditions") or [])
        generation = request["metadata"].get("generation")
        changes: dict[str, Any] = {key: value for key, value in fields.items() if status.get(key) != value}
        if not d.same_conditions(conditions, status.get("conditions")):
            changes["conditions"] = conditions
        phase = d.request_phase(conditions)
        if status.get("phase") != phase:
            changes["phase"] = phase
        if status.get("observedGeneration") != generation:
            changes["observedGeneration"] = generation
        if not changes:
            return request
        metadata = request["metadata"]
        try:
            return await self.kube.patch_request_status(namespace=metadata["namespace"], name=metadata["name"],
                                                        uid=metadata["uid"], status=changes)
        except (NotFound, Conflict):
            # Deleted, or deleted and re-created, since it was listed: the next event reconciles it.
            logger.info("UnlearnRequest %s/%s was deleted or re-created; its status was not written", metadata["namespace"],
                        metadata["name"])
            return request

    async def write_validation(self, request: dict[str, Any], verdict: d.Verdict) -> dict[str, Any]:
        """Set the Validated condition, posting an Event when it changes."""
        status = request.get("status") or {}
        previous = d.find_condition(status.get("conditions"), d.VALIDATED)
        conditions = d.set_condition(status.get("conditions"), kind=d.VALIDATED, status=verdict.ok,
                                     reason=verdict.reason, message=verdict.message,
                                     generation=request["metadata"].get("generation"), now=d.now_iso())
        fields: dict[str, Any] = {}
        if verdict.ok and not status.get("lineage"):
            fields["lineage"] = request_lineage(request)
        if not verdict.ok:
            # An invalid request waits for nothing: it is out of the queue.
            conditions = d.remove_condition(conditions, d.GATED)
        changed = previous is None or previous.get("reason") != verdict.reason or (
            not verdict.ok and previous.get("message") != verdict.message)
        if changed:
            _event(request, warning=not verdict.ok, reason=verdict.reason, message=verdict.message)
        return await self.write_request(request, conditions=conditions, **fields)


class _Run:
    """One reconcile of one lineage, with the state it read; see LineageReconciler.reconcile."""

    def __init__(self, *, reconciler: LineageReconciler, lineage: dict[str, Any],
                 requests: list[dict[str, Any]]) -> None:
        self.reconciler = reconciler
        self.kube = reconciler.kube
        self.settings = reconciler.settings
        self.lineage = lineage
        self.namespace = lineage["metadata"]["namespace"]
        self.name = lineage["metadata"]["name"]
        self.requests = {request["metadata"]["name"]: request for request in requests}
        self.status: dict[str, Any] = dict(lineage.get("status") or {})
        self.now = d.now_iso()
        self.spec: LineageSpec | None = None
        self.store = None
        self.base: dict[str, Any] | None = None
        self.head: dict[str, Any] | None = None
        self.jobs: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------

    async def execute(self) -> None:
        if not await self._validate_lineage():
            return
        await self._read_store_and_jobs()
        self._check_resume()
        valid = await self._validate_requests()

        if self.base is None:
            await self._initialise()
        elif self.status.get("activeRequest"):
            await self._advance_active()

        if self.base is not None and not self.status.get("activeRequest"):
            await self._claim_next(valid)
        await self._render_dry_runs(valid)
        await self._gate_waiting(valid)
        await self._write_lineage_summary(valid)

    # ------------------------------------------------------------------
    # Lineage status

    def _conditions(self) -> list[dict[str, Any]]:
        return list(self.status.get("conditions") or [])

    def _set(self, kind: str, ok: bool, reason: str, message: str) -> None:
        previous = d.find_condition(self.status.get("conditions"), kind)
        self.status["conditions"] = d.set_condition(
            self.status.get("conditions"), kind=kind, status=ok, reason=reason, message=message,
            generation=self.lineage["metadata"].get("generation"), now=self.now)
        if previous is None or previous.get("reason") != reason or previous.get("status") != ("True" if ok else "False"):
            warning = (kind == d.HALTED and ok) or (kind != d.HALTED and not ok and reason != "InitJobRunning")
            _event(self.lineage, warning=warning, reason=reason, message=message)

    async def _patch_lineage(self, **fields: Any) -> None:
        """Write the lineage status fields (None removes one), guarded by the resourceVersion last read."""
        old = self.lineage.get("status") or {}
        for key, value in fields.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value
        self.status["phase"] = d.lineage_phase(self.status.get("conditions"),
                                               active_request=self.status.get("activeRequest"))
        self.status["observedGeneration"] = self.lineage["metadata"].get("generation")
        changes = {key: value for key, value in self.status.items() if old.get(key) != value}
        if not d.same_conditions(self.status.get("conditions"), old.get("conditions")):
            changes["conditions"] = self.status.get("conditions")
        elif "conditions" in changes:
            del changes["conditions"]  # only transition times differ
        for key in old:
            if key not in self.status:
                changes[key] = None
        if not changes:
            return
        try:
            self.lineage = await self.kube.patch_lineage_status(
                namespace=self.namespace, name=self.name, status=changes,
                resource_version=self.lineage["metadata"].get("resourceVersion"))
        except NotFound:
            raise _LineageDeleted() from None
        self.status = dict(self.lineage.get("status") or {})

    async def _validate_lineage(self) -> bool:
        verdict = d.validate_lineage(self.lineage)
        if verdict.ok:
            self.spec = parse_lineage(self.lineage)
            store_uri = self.spec.store_uri or self.settings.store_uri
            if store_uri is None:
                verdict = d.Verdict(False, "InvalidSpec",
                                    "spec.store.uri is missing and the operator has no default store: set "
                                    "spec.store.uri, or start the operator with --store")
        if verdict.ok:
            try:
                self.store = await asyncio.to_thread(self.reconciler.open_store, uri=store_uri, namespace=self.namespace,
                                                     lineage=self.name)
            except StoreError as error:
                verdict = d.Verdict(False, "StoreNotReadable", f"store {store_uri} cannot be opened: {error}")
        self._set(d.VALIDATED, verdict.ok, verdict.reason, verdict.message)
        if verdict.ok:
            await self._patch_lineage(storeUri=self.store.uri, baseModelUri=self.spec.base_model_uri)
            return True

        await self._patch_lineage()
        for request in self.requests.values():
            if d.is_finished(request):
                continue
            problem = await self.reconciler.work_problem(request)
            request = await self.reconciler.write_validation(
                request, d.validate_request(request, lineage=self.lineage, work_problem=problem))
            status = request.get("status") or {}
            if not d.condition_is(status.get("conditions"), d.VALIDATED):
                continue
            conditions = d.set_condition(status.get("conditions"), kind=d.GATED, status=True,
                                         reason="LineageNotReady",
                                         message=f"lineage {self.name} is not usable: {verdict.message}",
                                         generation=request["metadata"].get("generation"), now=self.now)
            await self.reconciler.write_request(request, conditions=conditions)
        metrics.set_lineage_state(namespace=self.namespace, lineage=self.name, phase_counts=self._phase_counts(),
                                  queue=0, is_active=bool(self.status.get("activeRequest")), is_halted=False,
                                  is_collapsed=False)
        if verdict.reason == "StoreNotReadable":
            raise RuntimeError(verdict.message)  # retried with backoff: the store may come back
        return False

    async def _read_store_and_jobs(self) -> None:
        self.base = await asyncio.to_thread(self.store.read_base)
        self.head = await asyncio.to_thread(self.store.head)
        selector = f"{d.LABEL_MANAGED_BY}={d.MANAGED_BY},{d.LABEL_LINEAGE}={self.name}"
        self.jobs = {job["metadata"]["name"]: job
                     for job in await self.kube.list_jobs(namespace=self.namespace, selector=selector)}

    def _check_resume(self) -> None:
        token = d.resume_token(self.lineage)
        halted = d.condition_is(self.status.get("conditions"), d.HALTED)
        if token is not None:
            self.status["resumeToken"] = token
            if halted:
                self._set(d.HALTED, False, "Resumed",
                          f"resumed by annotation {d.RESUME_ANNOTATION}={token}; the head is unchanged")
                self.status.pop("haltedBy", None)
            return
        halted_by = self.status.get("haltedBy")
        if halted and halted_by and halted_by not in self.requests:
            self._set(d.HALTED, False, "HaltingRequestDeleted",
                      f"request {halted_by}, which halted the lineage, was deleted; the queue continues")
            self.status.pop("haltedBy", None)

    # ------------------------------------------------------------------
    # Requests: validation and the gate

    async def _validate_requests(self) -> dict[str, d.Candidate]:
        """Validate every unfinished request; return gate candidates by name."""
        candidates: dict[str, d.Candidate] = {}
        for name, request in list(self.requests.items()):
            metadata = request["metadata"]
            finished = d.is_finished(request)
            valid = False
            suspended = dry_run = False
            if not finished:
                problem = await self.reconciler.work_problem(request)
                verdict = d.validate_request(request, lineage=self.lineage, work_problem=problem)
                request = self.requests[name] = await self.reconciler.write_validation(request, verdict)
                valid = verdict.ok
                if valid:
                    spec = parse_request(request)
                    suspended, dry_run = spec.suspend, spec.dry_run
            candidates[name] = d.Candidate(name=name, uid=metadata["uid"], created=metadata.get("creationTimestamp", ""),
                                           valid=valid, finished=finished, suspended=suspended, dry_run=dry_run)
        return candidates

    def _refresh(self, candidates: Mapping[str, d.Candidate]) -> dict[str, d.Candidate]:
        """Return CANDIDATES with finished flags from the latest request states (a request may just have ended)."""
        return {name: dataclasses.replace(c, finished=c.finished or d.is_finished(self.requests[name]))
                for name, c in candidates.items()}

    def _gate(self) -> d.GateState:
        halted = d.find_condition(self.status.get("conditions"), d.HALTED)
        return d.GateState(active=self.status.get("activeRequest"), initialised=self.base is not None,
                           halted=bool(halted and halted.get("status") == "True"),
                           halted_message=(halted or {}).get("message", ""))

    async def _claim_next(self, candidates: Mapping[str, d.Candidate]) -> None:
        candidates = self._refresh(candidates)
        while True:
            queue = d.gate_queue(candidates.values(), active=None)
            chosen = d.next_request(queue, gate=self._gate())
            if chosen is None:
                return
            request = self.requests[chosen.name]
            head_step = (self.head or {}).get("step_id")
            chain = await asyncio.to_thread(self.store.chain, head_step) if head_step else []
            applied = next((m for m in chain if (m.get("request") or {}).get("name") == chosen.name), None)
            if applied is None:
                break
            # Applied earlier, but its status was lost: record it instead of running it twice.
            await self._finish_request(request, applied, reason="AlreadyApplied",
                                       message=f"already applied as step {applied['step_id']} on the head's chain")
            candidates = {**candidates, chosen.name: dataclasses.replace(chosen, finished=True)}

        sequence = len(chain) + 1
        step = await asyncio.to_thread(self._choose_step_id, request, sequence=sequence, parent=head_step)
        active_step = {"uid": chosen.uid, "stepId": step, "sequence": sequence, "since": self.now}
        if head_step:
            active_step["parentStepId"] = head_step
        await self._patch_lineage(activeRequest=chosen.name, activeStep=active_step)

        job_name = jobs.job_name(request=chosen.name, uid=chosen.uid)
        wait = d.gate_wait_seconds(created=chosen.created, admitted=self.now)
        metrics.gate_wait_seconds.labels(self.namespace, self.name).observe(wait)
        _event(request, warning=False, reason="Admitted",
               message=f"admitted to lineage {self.name} as step {step} (sequence {sequence}) after {wait:.0f} s")
        status = request.get("status") or {}
        conditions = d.set_condition(status.get("conditions"), kind=d.GATED, status=False, reason="Admitted",
                                     message=f"claimed the gate of lineage {self.name}",
                                     generation=request["metadata"].get("generation"), now=self.now)
        conditions = d.set_condition(conditions, kind=d.RUNNING, status=True, reason="JobPending",
                                     message=f"Job {job_name} created", generation=request["metadata"].get("generation"),
                                     now=self.now)
        self.requests[chosen.name] = await self.reconciler.write_request(
            request, conditions=conditions, sequence=sequence, stepId=step, parentStepId=head_step, jobName=job_name,
            admittedAt=self.now, forgetUri=parse_request(request).forget_uri, lineage=self.name)
        await self._ensure_step_job(self.requests[chosen.name])

    def _choose_step_id(self, request: Mapping[str, Any], *, sequence: int, parent: str | None) -> str:
        """Pick the step id: reuse the request's committed step on this head (status lost), else a free id."""
        previous = (request.get("status") or {}).get("stepId")
        if previous:
            manifest = self.store.read_step(previous)
            if manifest is not None and manifest.get("parent_step_id") == parent:
                return previous
        candidate = d.step_id(sequence=sequence, request=request["metadata"]["name"])
        step, number = candidate, 1
        # A step committed under that id belongs to an earlier attempt: a deleted request of the same name, or
        # another chain after a rollback. This attempt has not started yet, so it takes the next free id.
        while self.store.read_step(step) is not None:
            number += 1
            step = f"{candidate}-{number}"
        return step

    async def _ensure_step_job(self, request: dict[str, Any]) -> None:
        active = self.status.get("activeStep") or {}
        job = jobs.build_step_job(request=request, lineage=self.lineage, settings=self.settings,
                                  store_uri=self._store_root(), step_id=active["stepId"],
                                  sequence=int(active["sequence"]), parent_step_id=active.get("parentStepId"))
        created = await self.kube.create_job(namespace=self.namespace, job=job)
        if created:
            _event(request, warning=False, reason="JobCreated",
                   message=f"created Job {job['metadata']['name']} for step {active['stepId']}")
        else:
            logger.info("Job %s/%s already exists; using it", self.namespace, job["metadata"]["name"])

    def _store_root(self) -> str:
        return self.spec.store_uri or self.settings.store_uri

    async def _gate_waiting(self, candidates: Mapping[str, d.Candidate]) -> None:
        candidates = self._refresh(candidates)
        gate = self._gate()
        queue = d.gate_queue(candidates.values(), active=gate.active)
        for candidate in d.gate_order(candidates.values()):
            if not candidate.valid or candidate.finished or candidate.dry_run or candidate.name == gate.active:
                continue
            request = self.requests[candidate.name]
            status = request.get("status") or {}
            if candidate.suspended:
                reason, message = "Suspended", "spec.suspend is true; set it to false to queue the request"
            else:
                reason, message = d.gated_reason(queue, candidate.name, gate=gate, lineage=self.name)
            previous = d.find_condition(status.get("conditions"), d.GATED)
            conditions = d.set_condition(status.get("conditions"), kind=d.GATED, status=True, reason=reason,
                                         message=message, generation=request["metadata"].get("generation"),
                                         now=self.now)
            # A request that was admitted before (the lineage status was lost or reset) is back in the queue.
            conditions = d.remove_condition(conditions, d.RUNNING)
            if previous is None or previous.get("reason") != reason or previous.get("status") != "True":
                _event(request, warning=False, reason=reason, message=message)
            self.requests[candidate.name] = await self.reconciler.write_request(request, conditions=conditions)

    async def _render_dry_runs(self, candidates: Mapping[str, d.Candidate]) -> None:
        for candidate in self._refresh(candidates).values():
            if not (candidate.valid and candidate.dry_run and not candidate.finished):
                continue
            request = self.requests[candidate.name]
            status = request.get("status") or {}
            generation = request["metadata"].get("generation")
            rendered = d.find_condition(status.get("conditions"), d.RENDERED)
            if rendered and rendered.get("observedGeneration") == generation and status.get("renderedJob"):
                continue
            head_step = (self.head or {}).get("step_id")
            chain = await asyncio.to_thread(self.store.chain, head_step) if head_step else []
            sequence = len(chain) + 1
            step = d.step_id(sequence=sequence, request=candidate.name)
            job = jobs.build_step_job(request=request, lineage=self.lineage, settings=self.settings,
                                      store_uri=self._store_root(), step_id=step, sequence=sequence,
                                      parent_step_id=head_step)
            message = (f"rendered Job {job['metadata']['name']} for step {step} into status.renderedJob; nothing "
                       "was created and the lineage is untouched")
            conditions = d.set_condition(d.remove_condition(status.get("conditions"), d.GATED), kind=d.RENDERED,
                                         status=True, reason="DryRun", message=message, generation=generation,
                                         now=self.now)
            _event(request, warning=False, reason="DryRun", message=message)
            self.requests[candidate.name] = await self.reconciler.write_request(request, conditions=conditions,
                                                                       renderedJob=job)

    # ------------------------------------------------------------------
    # Initialisation

    async def _initialise(self) -> None:
        name = jobs.init_job_name(lineage=self.name, uid=self.lineage["metadata"]["uid"])
        job = self.jobs.get(name)
        if job is None:
            body = jobs.build_init_job(lineage=self.lineage, settings=self.settings, store_uri=self._store_root())
            if await self.kube.create_job(namespace=self.namespace, job=body):
                _event(self.lineage, warning=False, reason="InitJobCreated",
                       message=f"created Job {name} to write theta_0 to {self.store.uri}")
            self._set(d.INITIALISED, False, "InitJobRunning", f"Job {name} is writing theta_0 to the store")
            await self._patch_lineage(initJobName=name)
            return

        pods = await self.kube.list_job_pods(namespace=self.namespace, job=name)
        outcome = d.job_outcome(job, pods)
        if outcome.state == "Failed":
            failure = d.failure_details(outcome, now=self.now)
            self._set(d.INITIALISED, False, "InitJobFailed",
                      f"{failure['message']}; fix the cause, then delete Job {name} to try again")
        elif outcome.state == "Succeeded":
            self._set(d.INITIALISED, False, "InitJobFailed",
                      f"Job {name} completed but {self.store.uri} has no base record; delete Job {name} to try again")
        else:
            self._set(d.INITIALISED, False, "InitJobRunning", f"Job {name} is writing theta_0 to the store")
        await self._patch_lineage(initJobName=name)

    # ------------------------------------------------------------------
    # The active request

    async def _advance_active(self) -> None:
        name = self.status["activeRequest"]
        active = self.status.get("activeStep") or {}
        request = self.requests.get(name)
        job_name = jobs.job_name(request=name, uid=active.get("uid", ""))

        if request is None or request["metadata"]["uid"] != active.get("uid"):
            deleted = await self.kube.delete_job(namespace=self.namespace, name=job_name)
            head = (self.head or {}).get("step_id") or "theta_0"
            await self._patch_lineage(activeRequest=None, activeStep=None)
            _event(self.lineage, warning=True, reason="GateReleased",
                   message=f"request {name} was deleted while it held the gate; "
                           f"{'its Job ' + job_name + ' was deleted' if deleted else 'its Job was already gone'}, "
                           f"and the head stays at {head}")
            return

        step = active["stepId"]
        manifest = await asyncio.to_thread(self.store.read_step, step)
        job = self.jobs.get(job_name)
        pods = await self.kube.list_job_pods(namespace=self.namespace, job=job_name) if job else []
        outcome = d.job_outcome(job, pods)

        if manifest is not None and outcome.finished:
            await self._conclude(request, manifest, outcome)
        elif manifest is None and outcome.state == "Missing":
            if d.is_finished(request):
                # Finished but the gate was not released (a crash between the two writes).
                await self._patch_lineage(activeRequest=None, activeStep=None)
                return
            await self._ensure_step_job(request)
        elif manifest is None and outcome.state == "Succeeded":
            await self._fail(request, outcome, reason="StepMissing",
                             message=f"Job {job_name} completed but step {step} is not committed in {self.store.uri}")
        elif manifest is None and outcome.state == "Failed":
            await self._fail(request, outcome)
        else:
            await self._mark_running(request, outcome, job_name)

    async def _mark_running(self, request: dict[str, Any], outcome: d.JobOutcome, job_name: str) -> None:
        status = request.get("status") or {}
        reason = "JobRunning" if outcome.state == "Running" else "JobPending"
        message = f"Job {job_name}: {outcome.message}" + (f" (attempt {outcome.attempts})" if outcome.attempts else "")
        conditions = d.set_condition(status.get("conditions"), kind=d.RUNNING, status=True, reason=reason,
                                     message=message, generation=request["metadata"].get("generation"), now=self.now)
        previous = d.find_condition(status.get("conditions"), d.RUNNING)
        if outcome.state == "Running" and (previous is None or previous.get("reason") != "JobRunning"):
            _event(request, warning=False, reason="JobRunning", message=message)
        self.requests[request["metadata"]["name"]] = await self.reconciler.write_request(
            request, conditions=conditions, attempts=outcome.attempts or None, startTime=outcome.start_time)

    async def _conclude(self, request: dict[str, Any], manifest: dict[str, Any], outcome: d.JobOutcome) -> None:
        """Run the collapse guard on a committed step; promote it or halt the lineage."""
        verdict = check_collapse(self.base, manifest, self.spec.collapse_guard)
        self._observe_job(request, outcome, result="collapsed" if verdict.collapsed else "promoted")
        if verdict.collapsed:
            message = f"step {manifest['step_id']} collapsed the model and was not promoted: {verdict.message}"
            await self._finish_request(request, manifest, reason="Collapsed", message=message,
                                       guard={"collapsed": True, "message": verdict.message}, outcome=outcome)
            self._set(d.HALTED, True, "Collapsed",
                      f"{message}; delete request {request['metadata']['name']} or set annotation "
                      f"{d.RESUME_ANNOTATION} to resume with the head unchanged")
            await self._patch_lineage(activeRequest=None, activeStep=None, haltedBy=request["metadata"]["name"])
            return

        step = manifest["step_id"]
        if (self.head or {}).get("step_id") != step:
            self.head = await asyncio.to_thread(self.store.set_head, step, "promote",
                                                {"request": request["metadata"]["name"]})
        await self._finish_request(request, manifest, reason="Promoted",
                                   message=f"step {step} promoted to head of lineage {self.name}",
                                   guard={"collapsed": False, "message": verdict.message}, outcome=outcome)
        history = d.append_history(self.status.get("history"), d.history_entry(manifest, promoted_at=self.now),
                                   limit=self.spec.history_limit)
        _event(self.lineage, warning=False, reason="HeadMoved",
               message=f"head moved to step {step} of request {request['metadata']['name']}")
        await self._patch_lineage(activeRequest=None, activeStep=None, history=history,
                                  head=d.head_status(self.head, manifest))

    async def _finish_request(self, request: dict[str, Any], manifest: Mapping[str, Any], *, reason: str,
                              message: str, guard: Mapping[str, Any] | None = None,
                              outcome: d.JobOutcome | None = None) -> None:
        status = request.get("status") or {}
        generation = request["metadata"].get("generation")
        collapsed = reason == "Collapsed"
        conditions = d.set_condition(status.get("conditions"), kind=d.SUCCEEDED if not collapsed else d.FAILED,
                                     status=True, reason=reason, message=message, generation=generation, now=self.now)
        conditions = d.remove_condition(conditions, d.GATED)
        if d.find_condition(conditions, d.RUNNING):
            conditions = d.set_condition(conditions, kind=d.RUNNING, status=False, reason="JobFinished",
                                         message="the trainer Job finished", generation=generation, now=self.now)
        task_vector = manifest["objects"]["task_vector"]
        fields: dict[str, Any] = {
            "figures": d.step_figures(manifest),
            "artifacts": {"manifestUri": self.store.url(f"steps/{manifest['step_id']}/manifest.json"),
                          "taskVectorUri": self.store.url(task_vector["key"]),
                          "taskVectorSha256": task_vector["sha256"]},
            "sequence": int(manifest["sequence"]),
            "stepId": manifest["step_id"],
            "completionTime": status.get("completionTime") or self.now,
        }
        if guard is not None:
            fields["guard"] = dict(guard)
        if collapsed:
            fields["lastFailure"] = {"reason": "Collapsed", "message": message, "time": self.now}
        if outcome is not None and outcome.attempts:
            fields["attempts"] = outcome.attempts
        if not d.find_condition(status.get("conditions"), d.SUCCEEDED if not collapsed else d.FAILED):
            _event(request, warning=collapsed, reason=reason, message=message)
            metrics.requests_finished.labels(self.namespace, self.name, self._method(request),
                                             "collapsed" if collapsed else "promoted").inc()
        self.requests[request["metadata"]["name"]] = await self.reconciler.write_request(request, conditions=conditions,
                                                                               **fields)

    async def _fail(self, request: dict[str, Any], outcome: d.JobOutcome, *, reason: str | None = None,
                    message: str | None = None) -> None:
        failure = d.failure_details(outcome, now=self.now)
        if reason:
            failure["reason"] = reason
        if message:
            failure["message"] = message
        status = request.get("status") or {}
        generation = request["metadata"].get("generation")
        conditions = d.set_condition(status.get("conditions"), kind=d.FAILED, status=True, reason=failure["reason"],
                                     message=failure["message"], generation=generation, now=self.now)
        conditions = d.set_condition(conditions, kind=d.RUNNING, status=False, reason="JobFinished",
                                     message="the trainer Job finished", generation=generation, now=self.now)
        if not d.condition_is(status.get("conditions"), d.FAILED):
            _event(request, warning=True, reason=failure["reason"], message=failure["message"])
            metrics.requests_finished.labels(self.namespace, self.name, self._method(request), "failed").inc()
            self._observe_job(request, outcome, result="failed")
        self.requests[request["metadata"]["name"]] = await self.reconciler.write_request(
            request, conditions=conditions, lastFailure=failure, attempts=outcome.attempts or None,
            completionTime=status.get("completionTime") or self.now)

        halt = d.halts_lineage(failure_reason=failure["reason"], on_failure=self.spec.on_failure)
        if halt:
            self._set(d.HALTED, True, "RequestFailed",
                      f"request {request['metadata']['name']} failed ({failure['message']}); delete it or set "
                      f"annotation {d.RESUME_ANNOTATION} to resume with the head unchanged")
            await self._patch_lineage(activeRequest=None, activeStep=None, haltedBy=request["metadata"]["name"])
        else:
            _event(self.lineage, warning=True, reason="RequestFailed",
                   message=f"request {request['metadata']['name']} failed; onFailure is Continue, so the next "
                           "request starts from the unchanged head")
            await self._patch_lineage(activeRequest=None, activeStep=None)

    def _method(self, request: Mapping[str, Any]) -> str:
        try:
            return parse_request(request).method.name
        except SpecError:
            return "unknown"

    def _observe_job(self, request: Mapping[str, Any], outcome: d.JobOutcome, *, result: str) -> None:
        start = d.parse_time(outcome.start_time)
        end = d.parse_time(outcome.completion_time) or d.parse_time(self.now)
        method = self._method(request)
        if start is not None and end is not None:
            metrics.job_duration_seconds.labels(self.namespace, self.name, method, result).observe(
                max(0.0, (end - start).total_seconds()))
        if outcome.failed_pods:
            metrics.job_restarts.labels(self.namespace, self.name, method).inc(outcome.failed_pods)

    # ------------------------------------------------------------------
    # Summary

    def _phase_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for request in self.requests.values():
            phase = d.request_phase((request.get("status") or {}).get("conditions"))
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    async def _write_lineage_summary(self, candidates: Mapping[str, d.Candidate]) -> None:
        candidates = self._refresh(candidates)
        gate = self._gate()
        queue = [c.name for c in d.gate_queue(candidates.values(), active=gate.active)]
        head_manifest = None
        head_step = (self.head or {}).get("step_id")
        if head_step:
            head_manifest = await asyncio.to_thread(self.store.read_step, head_step)
        fields: dict[str, Any] = {"queue": queue, "queueDepth": len(queue),
                                  "head": d.head_status(self.head, head_manifest)}
        if self.base is not None:
            self._set(d.INITIALISED, True, "BaseRecorded", f"theta_0 is recorded in {self.store.uri}")
            fields["base"] = {"checkpointSha256": self.base["objects"]["checkpoint"]["sha256"],
                              "created": str(self.base.get("created", ""))}
        await self._patch_lineage(**fields)

        halted = d.find_condition(self.status.get("conditions"), d.HALTED)
        is_halted = bool(halted and halted.get("status") == "True")
        metrics.set_lineage_state(namespace=self.namespace, lineage=self.name, phase_counts=self._phase_counts(),
                                  queue=len(queue), is_active=bool(self.status.get("activeRequest")),
                                  is_halted=is_halted, is_collapsed=is_halted and halted.get("reason") == "Collapsed")
        metrics.set_head(namespace=self.namespace, lineage=self.name,
                         sequence=int(fields["head"].get("sequence", 0)),
                         figures=d.step_figures(head_manifest) if head_manifest else {})


__all__ = ["LineageReconciler", "request_lineage"]

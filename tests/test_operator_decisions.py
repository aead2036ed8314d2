"""Unit tests of the operator's pure parts: decisions, the Job builder, settings and metrics names.

No cluster and no store: every function here takes dicts and returns dicts.
"""

from __future__ import annotations

import json

import pytest

from lethe_operator import decisions as d
from lethe_operator import jobs, metrics
from lethe_operator.settings import OperatorSettings, from_environment, parse_command

NOW = "2026-01-02T03:04:05Z"
LATER = "2026-01-02T03:05:05Z"


def lineage(name: str = "demo", **spec) -> dict:
    return {"apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage",
            "metadata": {"name": name, "namespace": "default", "uid": "lineage-uid", "generation": 1},
            "spec": {"baseModel": {"uri": "s3://models/base/"}, **spec}}


def request(name: str = "forget-a", *, created: str = NOW, status: dict | None = None, **spec) -> dict:
    body = {"apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest",
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "generation": 1,
                         "creationTimestamp": created},
            "spec": {"lineageRef": {"name": "demo"}, "forget": {"uri": "s3://works/a.txt"}, **spec}}
    if status is not None:
        body["status"] = status
    return body


# ---------------------------------------------------------------------------
# Conditions and phases


def test_set_condition_adds_new_condition():
    conditions = d.set_condition([], kind=d.VALIDATED, status=True, reason="SpecValid", message="ok",
                                 generation=3, now=NOW)
    assert conditions == [{"type": "Validated", "status": "True", "reason": "SpecValid", "message": "ok",
                           "lastTransitionTime": NOW, "observedGeneration": 3}]


def test_set_condition_keeps_time_when_status_unchanged():
    first = d.set_condition([], kind=d.GATED, status=True, reason="WaitingForPredecessor", message="a",
                            generation=1, now=NOW)
    second = d.set_condition(first, kind=d.GATED, status=True, reason="LineageHalted", message="b",
                             generation=1, now=LATER)
    assert second[0]["lastTransitionTime"] == NOW
    assert second[0]["reason"] == "LineageHalted"
    assert second[0]["message"] == "b"


def test_set_condition_moves_time_on_flip():
    first = d.set_condition([], kind=d.GATED, status=True, reason="WaitingForPredecessor", message="a",
                            generation=1, now=NOW)
    second = d.set_condition(first, kind=d.GATED, status=False, reason="Admitted", message="b",
                             generation=1, now=LATER)
    assert second[0]["lastTransitionTime"] == LATER
    assert second[0]["status"] == "False"


def test_set_condition_rejects_unknown_reason():
    with pytest.raises(ValueError, match="not one of"):
        d.set_condition([], kind=d.FAILED, status=True, reason="Oops", message="", generation=1, now=NOW)


def test_reasons_are_camel_case():
    for kind, reasons in d.REASONS.items():
        for reason in reasons:
            assert reason[0].isupper(), (kind, reason)
            assert reason.isalnum(), (kind, reason)


def test_same_conditions_ignores_order_and_times():
    a = d.set_condition([], kind=d.VALIDATED, status=True, reason="SpecValid", message="", generation=1, now=NOW)
    a = d.set_condition(a, kind=d.GATED, status=True, reason="Suspended", message="", generation=1, now=NOW)
    b = list(reversed([dict(c, lastTransitionTime=LATER) for c in a]))
    assert d.same_conditions(a, b)
    assert not d.same_conditions(a, a[:1])


@pytest.mark.parametrize("conditions, phase", [
    ([], "Pending"),
    ([("Validated", "False", "InvalidSpec")], "Invalid"),
    ([("Validated", "True", "SpecValid"), ("Gated", "True", "WaitingForPredecessor")], "Queued"),
    ([("Validated", "True", "SpecValid"), ("Gated", "True", "Suspended")], "Suspended"),
    ([("Gated", "False", "Admitted"), ("Running", "True", "JobRunning")], "Running"),
    ([("Running", "False", "JobFinished"), ("Succeeded", "True", "Promoted")], "Succeeded"),
    ([("Running", "False", "JobFinished"), ("Failed", "True", "Collapsed")], "Failed"),
    ([("Validated", "False", "ImmutableFieldChanged"), ("Succeeded", "True", "Promoted")], "Succeeded"),
    ([("Validated", "True", "SpecValid"), ("Rendered", "True", "DryRun")], "Rendered"),
])
def test_request_phase_from_conditions(conditions, phase):
    listed = [{"type": t, "status": s, "reason": r} for t, s, r in conditions]
    assert d.request_phase(listed) == phase


@pytest.mark.parametrize("conditions, active, phase", [
    ([], None, "Pending"),
    ([("Validated", "False", "InvalidSpec")], None, "Invalid"),
    ([("Validated", "True", "SpecValid"), ("Initialised", "False", "InitJobRunning")], None, "Initialising"),
    ([("Validated", "True", "SpecValid"), ("Initialised", "False", "InitJobFailed")], None, "Failed"),
    ([("Validated", "True", "SpecValid"), ("Initialised", "True", "BaseRecorded")], None, "Ready"),
    ([("Validated", "True", "SpecValid"), ("Initialised", "True", "BaseRecorded")], "r1", "Running"),
    ([("Initialised", "True", "BaseRecorded"), ("Halted", "True", "Collapsed")], None, "Halted"),
    ([("Initialised", "True", "BaseRecorded"), ("Halted", "False", "Resumed")], None, "Ready"),
])
def test_lineage_phase_from_conditions(conditions, active, phase):
    listed = [{"type": t, "status": s, "reason": r} for t, s, r in conditions]
    assert d.lineage_phase(listed, active_request=active) == phase


def test_phases_match_crd_enums():
    import yaml
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for file, phases in (("unlearnrequests.yaml", d.REQUEST_PHASES), ("modellineages.yaml", d.LINEAGE_PHASES)):
        crd = yaml.safe_load((root / "crds" / file).read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["status"]["properties"]["phase"]["enum"] == list(phases), file


# ---------------------------------------------------------------------------
# Validation


def test_validate_request_accepts_valid_request():
    verdict = d.validate_request(request(), lineage=lineage())
    assert verdict.ok
    assert verdict.reason == "SpecValid"


def test_validate_request_reports_spec_error():
    verdict = d.validate_request(request(method={"name": "Magic"}), lineage=lineage())
    assert not verdict.ok
    assert verdict.reason == "InvalidSpec"
    assert "spec.method.name 'Magic'" in verdict.message
    assert "use one of SSU, TaskVector" in verdict.message


def test_validate_request_reports_unknown_lineage():
    verdict = d.validate_request(request(), lineage=None)
    assert verdict.reason == "LineageNotFound"
    assert "names no ModelLineage in namespace 'default'" in verdict.message


def test_validate_request_names_lineage_in_other_namespace():
    verdict = d.validate_request(request(), lineage=None, lineage_namespaces=["team-b", "default"])
    assert verdict.reason == "LineageNotFound"
    assert "team-b" in verdict.message
    assert "only name a lineage in its own namespace" in verdict.message


def test_validate_request_reports_unreadable_work():
    verdict = d.validate_request(request(), lineage=lineage(), work_problem="was not found in the bucket")
    assert verdict.reason == "WorkNotReadable"
    assert verdict.message == "spec.forget.uri 's3://works/a.txt' was not found in the bucket"


def test_validate_request_rejects_changed_lineage_ref():
    verdict = d.validate_request(request(status={"lineage": "other"}), lineage=lineage())
    assert verdict.reason == "ImmutableFieldChanged"
    assert "spec.lineageRef.name 'demo' differs from 'other'" in verdict.message


def test_validate_request_rejects_changed_work_after_admission():
    admitted = request(status={"lineage": "demo", "sequence": 2, "forgetUri": "s3://works/old.txt"})
    verdict = d.validate_request(admitted, lineage=lineage())
    assert verdict.reason == "ImmutableFieldChanged"
    assert "spec.forget.uri" in verdict.message


def test_validate_request_allows_work_change_before_admission():
    queued = request(status={"lineage": "demo", "forgetUri": "s3://works/old.txt"})
    assert d.validate_request(queued, lineage=lineage()).ok


def test_validate_lineage_rejects_changed_base_model():
    body = lineage()
    body["status"] = {"baseModelUri": "s3://models/other/"}
    verdict = d.validate_lineage(body)
    assert verdict.reason == "ImmutableFieldChanged"


def test_validate_lineage_reports_spec_error():
    verdict = d.validate_lineage(lineage(onFailure="Retry"))
    assert verdict.reason == "InvalidSpec"
    assert "spec.onFailure 'Retry'" in verdict.message


# ---------------------------------------------------------------------------
# The gate


def candidate(name: str, created: str = NOW, **flags) -> d.Candidate:
    return d.Candidate(name=name, uid=f"uid-{name}", created=created, valid=flags.pop("valid", True),
                       finished=flags.pop("finished", False), **flags)


def test_gate_order_is_creation_time_then_name():
    ordered = d.gate_order([candidate("b", LATER), candidate("c", NOW), candidate("a", NOW)])
    assert [c.name for c in ordered] == ["a", "c", "b"]


def test_gate_queue_skips_finished_invalid_suspended_and_dry_runs():
    queue = d.gate_queue([candidate("a"), candidate("b", finished=True), candidate("c", valid=False),
                          candidate("d", suspended=True), candidate("e", dry_run=True), candidate("f")])
    assert [c.name for c in queue] == ["a", "f"]


def test_gate_queue_excludes_active_request():
    queue = d.gate_queue([candidate("a"), candidate("b")], active="a")
    assert [c.name for c in queue] == ["b"]


def test_next_request_is_head_of_queue():
    queue = d.gate_queue([candidate("b", LATER), candidate("a", NOW)])
    assert d.next_request(queue, gate=d.GateState()).name == "a"


@pytest.mark.parametrize("gate", [
    d.GateState(active="x"),
    d.GateState(halted=True),
    d.GateState(initialised=False),
    d.GateState(ready=False),
])
def test_next_request_waits_while_gate_closed(gate):
    assert d.next_request([candidate("a")], gate=gate) is None


def test_next_request_none_for_empty_queue():
    assert d.next_request([], gate=d.GateState()) is None


def test_gated_reason_names_predecessor():
    queue = d.gate_queue([candidate("b"), candidate("c")], active="a")
    gate = d.GateState(active="a")
    reason, message = d.gated_reason(queue, "b", gate=gate, lineage="demo")
    assert reason == "WaitingForPredecessor"
    assert message.startswith("waiting for a: position 1 of 2")
    reason, message = d.gated_reason(queue, "c", gate=gate, lineage="demo")
    assert message.startswith("waiting for b: position 2 of 2")
    assert "a is running" in message


def test_gated_reason_for_halted_lineage_says_how_to_resume():
    reason, message = d.gated_reason([candidate("b")], "b", gate=d.GateState(halted=True, halted_message="x"),
                                     lineage="demo")
    assert reason == "LineageHalted"
    assert "lethe.dev/resume" in message


def test_gated_reason_while_initialising():
    reason, _ = d.gated_reason([candidate("b")], "b", gate=d.GateState(initialised=False), lineage="demo")
    assert reason == "LineageInitialising"


def test_step_id_matches_local_runner_form():
    assert d.step_id(sequence=3, request="forget-a") == "0003-forget-a"


def test_halts_lineage():
    assert d.halts_lineage(failure_reason="Collapsed", on_failure="Continue")
    assert d.halts_lineage(failure_reason="JobFailed", on_failure="Halt")
    assert not d.halts_lineage(failure_reason="JobFailed", on_failure="Continue")


def test_resume_token_only_when_new():
    body = lineage()
    body["metadata"]["annotations"] = {d.RESUME_ANNOTATION: "1"}
    assert d.resume_token(body) == "1"
    body["status"] = {"resumeToken": "1"}
    assert d.resume_token(body) is None
    assert d.resume_token(lineage()) is None


def test_gate_wait_seconds():
    assert d.gate_wait_seconds(created=NOW, admitted=LATER) == 60.0
    assert d.gate_wait_seconds(created=None, admitted=LATER) == 0.0


# ---------------------------------------------------------------------------
# Job outcomes


def job(conditions=(), **status) -> dict:
    return {"metadata": {"name": "j"}, "status": {"conditions": list(conditions), **status}}


def pod(phase: str, *, exit_code: int | None = None, message: str = "", finished: str = NOW) -> dict:
    state = {"running": {}} if exit_code is None else {
        "terminated": {"exitCode": exit_code, "message": message, "finishedAt": finished}}
    return {"status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_job_outcome_missing():
    assert d.job_outcome(None).state == "Missing"


def test_job_outcome_pending_and_running():
    assert d.job_outcome(job(active=1), [pod("Pending")]).state == "Pending"
    outcome = d.job_outcome(job(active=1, startTime=NOW), [pod("Running")])
    assert outcome.state == "Running"
    assert outcome.attempts == 1
    assert outcome.start_time == NOW


def test_job_outcome_succeeded():
    outcome = d.job_outcome(job([{"type": "Complete", "status": "True"}], succeeded=1, completionTime=LATER),
                            [pod("Succeeded", exit_code=0, message='{"result": "Committed"}')])
    assert outcome.state == "Succeeded"
    assert outcome.completion_time == LATER
    assert outcome.finished


def test_job_outcome_failed_uses_last_pod_message():
    pods = [pod("Failed", exit_code=1, message='{"message": "first"}', finished=NOW),
            pod("Failed", exit_code=1, message='{"message": "second"}', finished=LATER)]
    outcome = d.job_outcome(job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                  "message": "Job has reached the specified backoff limit"}], failed=2), pods)
    assert outcome.state == "Failed"
    assert outcome.failed_pods == 2
    assert outcome.exit_code == 1
    assert outcome.termination_message == '{"message": "second"}'
    assert "backoff limit" in outcome.message


def test_failure_details_quotes_trainer_message():
    outcome = d.JobOutcome("Failed", "Job failed: BackoffLimitExceeded", exit_code=1,
                           termination_message=json.dumps({"result": "Failed", "message": "RuntimeError: boom"}))
    details = d.failure_details(outcome, now=NOW)
    assert details["reason"] == "JobFailed"
    assert details["exitCode"] == 1
    assert details["message"].endswith("trainer: RuntimeError: boom")
    assert json.loads(details["terminationMessage"])["message"] == "RuntimeError: boom"


def test_failure_details_exit_2_is_invalid_input():
    outcome = d.JobOutcome("Failed", "Job failed", exit_code=2, termination_message="not json at all")
    details = d.failure_details(outcome, now=NOW)
    assert details["reason"] == "InvalidInput"
    assert "trainer output: not json at all" in details["message"]


# ---------------------------------------------------------------------------
# Step results


def manifest(step: str = "0002-forget-b", *, parent: str | None = "0001-forget-a") -> dict:
    def scores(rouge1, rouge_l):
        return {"rouge1": {"mean": rouge1}, "rougeL": {"mean": rouge_l}}
    return {
        "step_id": step, "sequence": 2, "parent_step_id": parent,
        "request": {"namespace": "default", "name": "forget-b"},
        "inputs": {"forget": {"uri": "s3://works/b.txt"}},
        "objects": {"task_vector": {"key": "objects/sha256/abc.safetensors", "sha256": "abc", "size": 3}},
        "figures": {"forget": scores(0.1, 0.2), "previous": scores(0.3, 0.4), "retain": scores(0.5, 0.6),
                    "forget_before": scores(0.7, 0.8), "held_out": {"perplexity": 12.5},
                    "accuracy": {"accuracy": float("nan")}},
    }


def test_step_figures_names_and_drops_non_finite():
    figures = d.step_figures(manifest())
    assert figures == {"forgetRouge1": 0.1, "forgetRougeL": 0.2, "previousRouge1": 0.3, "previousRougeL": 0.4,
                       "retainRouge1": 0.5, "retainRougeL": 0.6, "forgetBeforeRougeL": 0.8, "perplexity": 12.5}


def test_history_entry_fields():
    entry = d.history_entry(manifest(), promoted_at=NOW)
    assert entry["sequence"] == 2
    assert entry["request"] == "forget-b"
    assert entry["stepId"] == "0002-forget-b"
    assert entry["parentStepId"] == "0001-forget-a"
    assert entry["taskVectorSha256"] == "abc"
    assert entry["forgetUri"] == "s3://works/b.txt"
    assert entry["figures"]["forgetRougeL"] == 0.2


def test_append_history_is_idempotent_and_bounded():
    first = d.history_entry(manifest("0001-a", parent=None), promoted_at=NOW)
    second = d.history_entry(manifest("0002-b"), promoted_at=NOW)
    history = d.append_history([], first, limit=10)
    history = d.append_history(history, second, limit=10)
    assert d.append_history(history, second, limit=10) == history
    assert [h["stepId"] for h in d.append_history(history, second, limit=1)] == ["0002-b"]


def test_head_status_for_theta_0_and_step():
    assert d.head_status(None, None) == {"sequence": 0}
    head = d.head_status({"step_id": "0002-forget-b", "time": NOW}, manifest())
    assert head == {"stepId": "0002-forget-b", "sequence": 2, "request": "forget-b", "taskVectorSha256": "abc",
                    "time": NOW}


# ---------------------------------------------------------------------------
# Jobs


SETTINGS = OperatorSettings(trainer_image="registry.example/lethe-trainer:1", trainer_command=("lethe-trainer",),
                            store_uri="s3://store/lethe", s3_endpoint_url="http://127.0.0.1:8333")


def step_job(**job_spec) -> dict:
    body = request(job=job_spec) if job_spec else request()
    return jobs.build_step_job(request=body, lineage=lineage(), settings=SETTINGS, store_uri="s3://store/lethe",
                               step_id="0002-forget-a", sequence=2, parent_step_id="0001-x")


def test_job_name_is_deterministic_and_short():
    name = jobs.job_name(request="a" * 63, uid="u1")
    assert name == jobs.job_name(request="a" * 63, uid="u1")
    assert name != jobs.job_name(request="a" * 63, uid="u2")
    assert len(name) <= 63
    assert jobs.job_name(request="forget-a", uid="u1").startswith("lethe-forget-a-")


def test_step_job_command():
    job = step_job()
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["lethe-trainer"]
    args = container["args"]
    assert args[0] == "step"
    assert args[args.index("--store") + 1] == "s3://store/lethe"
    assert args[args.index("--step-id") + 1] == "0002-forget-a"
    assert args[args.index("--sequence") + 1] == "2"
    assert args[args.index("--parent-step-id") + 1] == "0001-x"
    passed_request = json.loads(args[args.index("--request") + 1])
    assert passed_request["spec"]["forget"]["uri"] == "s3://works/a.txt"
    assert "status" not in passed_request
    assert json.loads(args[args.index("--lineage") + 1])["metadata"]["name"] == "demo"


def test_step_job_without_parent_omits_option():
    job = jobs.build_step_job(request=request(), lineage=lineage(), settings=SETTINGS, store_uri="s3://s/p",
                              step_id="0001-forget-a", sequence=1, parent_step_id=None)
    assert "--parent-step-id" not in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_step_job_defaults():
    job = step_job()
    spec = job["spec"]
    pod_spec = spec["template"]["spec"]
    container = pod_spec["containers"][0]
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "lethe.dev/v1alpha1", "kind": "UnlearnRequest", "name": "forget-a", "uid": "uid-forget-a",
        "controller": True, "blockOwnerDeletion": True}]
    assert job["metadata"]["labels"][d.LABEL_MANAGED_BY] == d.MANAGED_BY
    assert job["metadata"]["labels"][d.LABEL_LINEAGE] == "demo"
    assert d.LABEL_QUEUE not in job["metadata"]["labels"]
    assert pod_spec["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 2
    assert container["image"] == "registry.example/lethe-trainer:1"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert {"name": "AWS_ENDPOINT_URL_S3", "value": "http://127.0.0.1:8333"} in container["env"]
    assert "envFrom" not in container
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]


def test_step_job_carries_every_job_setting():
    job = step_job(
        image="registry.example/custom:2", gpus=4,
        resources={"limits": {"memory": "64Gi"}, "requests": {"cpu": 8}},
        nodeSelector={"gpu": "h100"}, tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        imagePullSecrets=[{"name": "regcred"}], serviceAccountName="trainer", activeDeadlineSeconds=3600,
        backoffLimit=5, ttlSecondsAfterFinished=600, queueName="gpu-queue", credentialsSecret="s3-creds",
        env=[{"name": "HF_HOME", "value": "/cache"}, {"name": "AWS_ENDPOINT_URL_S3", "value": "http://other"}],
    )
    spec = job["spec"]
    pod_spec = spec["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["image"] == "registry.example/custom:2"
    assert container["resources"] == {"limits": {"memory": "64Gi", "nvidia.com/gpu": "4"}, "requests": {"cpu": "8"}}
    assert pod_spec["nodeSelector"] == {"gpu": "h100"}
    assert pod_spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeAffinity" in pod_spec["affinity"]
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod_spec["serviceAccountName"] == "trainer"
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["backoffLimit"] == 5
    assert spec["ttlSecondsAfterFinished"] == 600
    assert job["metadata"]["labels"][d.LABEL_QUEUE] == "gpu-queue"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    endpoints = [v["value"] for v in container["env"] if v["name"] == "AWS_ENDPOINT_URL_S3"]
    assert endpoints == ["http://other"]
    assert {"name": "HF_HOME", "value": "/cache"} in container["env"]


def test_step_job_takes_operator_trainer_defaults():
    defaults = from_environment({
        "LETHE_TRAINER_GPU_RESOURCE": "amd.com/gpu",
        "LETHE_TRAINER_NODE_SELECTOR": '{"pool": "gpu"}',
        "LETHE_TRAINER_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
        "LETHE_TRAINER_IMAGE_PULL_SECRETS": '[{"name": "regcred"}]',
        "LETHE_TRAINER_SERVICE_ACCOUNT": "trainer",
        "LETHE_TRAINER_IMAGE_PULL_POLICY": "Always",
        "LETHE_PUSHGATEWAY_URL": "http://pushgateway:9091",
    })
    job = jobs.build_step_job(request=request(), lineage=lineage(), settings=defaults, store_uri="s3://s/p",
                              step_id="0001-a", sequence=1, parent_step_id=None)
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"] == {"limits": {"amd.com/gpu": "1"}}
    assert pod_spec["nodeSelector"] == {"pool": "gpu"}
    assert pod_spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod_spec["serviceAccountName"] == "trainer"
    assert container["imagePullPolicy"] == "Always"
    assert {"name": "LETHE_PUSHGATEWAY_URL", "value": "http://pushgateway:9091"} in container["env"]


def test_request_job_settings_override_operator_defaults():
    defaults = from_environment({"LETHE_TRAINER_NODE_SELECTOR": '{"pool": "gpu"}',
                                          "LETHE_TRAINER_SERVICE_ACCOUNT": "trainer"})
    body = request(job={"nodeSelector": {"pool": "h100"}, "serviceAccountName": "special"})
    job = jobs.build_step_job(request=body, lineage=lineage(), settings=defaults, store_uri="s3://s/p",
                              step_id="0001-a", sequence=1, parent_step_id=None)
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"pool": "h100"}
    assert pod_spec["serviceAccountName"] == "special"


def test_trainer_default_with_wrong_json_type_is_rejected():
    with pytest.raises(ValueError, match="LETHE_TRAINER_TOLERATIONS"):
        from_environment({"LETHE_TRAINER_TOLERATIONS": '{"key": "gpu"}'})


def test_step_job_zero_gpus_sets_no_gpu_limit():
    assert step_job(gpus=0)["spec"]["template"]["spec"]["containers"][0]["resources"] == {}


def test_init_job():
    job = jobs.build_init_job(lineage=lineage(), settings=SETTINGS, store_uri="s3://store/lethe")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"].startswith("lethe-init-demo-")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "ModelLineage"
    assert job["metadata"]["labels"][d.LABEL_ROLE] == "init"
    assert container["args"][:1] == ["init"]
    assert container["args"][container["args"].index("--store") + 1] == "s3://store/lethe"


# ---------------------------------------------------------------------------
# Settings and metrics


def test_parse_command_forms():
    assert parse_command('["python", "-m", "lethe_trainer.job"]') == ("python", "-m", "lethe_trainer.job")
    assert parse_command("python -m lethe_trainer.job") == ("python", "-m", "lethe_trainer.job")
    with pytest.raises(ValueError, match="empty"):
        parse_command("  ")


def test_settings_from_environment():
    settings = from_environment({"LETHE_TRAINER_IMAGE": "img:1", "LETHE_STORE_URI": "file:///tmp/store",
                                 "LETHE_METRICS_PORT": "9100", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"})
    assert settings.trainer_image == "img:1"
    assert settings.store_uri == "file:///tmp/store"
    assert settings.metrics_port == 9100
    assert settings.s3_endpoint_url == "http://127.0.0.1:1"


def test_metric_names_and_labels():
    from prometheus_client import generate_latest

    metrics.set_lineage_state(namespace="ns", lineage="demo", phase_counts={"Queued": 2}, queue=2, is_active=True,
                              is_halted=False, is_collapsed=False)
    metrics.set_head(namespace="ns", lineage="demo", sequence=3, figures={"forgetRougeL": 0.25})
    text = generate_latest(metrics.registry).decode()
    assert 'lethe_requests{lineage="demo",namespace="ns",phase="Queued"} 2.0' in text
    assert 'lethe_lineage_active{lineage="demo",namespace="ns"} 1.0' in text
    assert 'lethe_head_forget_rouge_l{lineage="demo",namespace="ns"} 0.25' in text
    assert 'lethe_head_sequence{lineage="demo",namespace="ns"} 3.0' in text
    for name in metrics.METRIC_NAMES:
        assert name.startswith("lethe_")
    metrics.forget_lineage(namespace="ns", lineage="demo")
    assert 'lineage="demo"' not in generate_latest(metrics.registry).decode()

"""The CRDs' CEL rules and schema, checked without an API server.

The test API server (Kubernetes 1.20) drops ``x-kubernetes-validations``, so
each CEL rule is compiled and evaluated here with cel-python against objects
that must pass and objects that must fail. Values are converted to CEL types
as the API server does, from the schema (a ``number`` field contains a double
even when the YAML writes ``0``). The schema tests check that the CRDs and
``lethe_trainer.spec`` agree on patterns and enums, and that every field has
a description for ``kubectl explain``.

Not covered: CEL cost estimation, which only a Kubernetes 1.25+ API server
performs when the CRD is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lethe_trainer.spec import (METHODS, NAME_PATTERN, ON_FAILURE_POLICIES, URI_PATTERN, SpecError, parse_lineage,
                               parse_method)

celpy = pytest.importorskip("celpy", reason="cel-python is not installed: pip install cel-python")

CRD_DIR = Path(__file__).resolve().parents[1] / "crds"


def load_schema(file: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRD_DIR / file).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


REQUEST_SCHEMA = load_schema("unlearnrequests.yaml")
LINEAGE_SCHEMA = load_schema("modellineages.yaml")


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (path, schema) for the schema and every nested property and item schema."""
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def schema_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for found, node in walk(schema):
        if found == path:
            return node
    raise KeyError(path)


def rules_at(schema: dict[str, Any], path: str) -> list[dict[str, str]]:
    return schema_at(schema, path).get("x-kubernetes-validations") or []


def typed(value: Any, schema: dict[str, Any]) -> Any:
    """Convert a YAML value as the API server does before it evaluates CEL: number fields become doubles."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        return {key: typed(item, properties.get(key) or schema.get("additionalProperties") or {})
                for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item, schema.get("items") or {}) for item in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def evaluate(rule: str, schema: dict[str, Any], value: Any, old: Any = None) -> bool:
    environment = celpy.Environment()
    program = environment.program(environment.compile(rule))
    activation = {"self": celpy.json_to_cel(typed(value, schema))}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(typed(old, schema))
    result = program.evaluate(activation)
    assert isinstance(result, celpy.celtypes.BoolType), f"rule {rule!r} returned {result!r}, not a bool"
    return bool(result)


def check(schema: dict[str, Any], path: str, value: Any, old: Any = None) -> bool:
    """Return whether VALUE at PATH passes every rule there (transition rules only when OLD is given)."""
    node = schema_at(schema, path)
    results = []
    for rule in rules_at(schema, path):
        if "oldSelf" in rule["rule"] and old is None:
            continue
        results.append(evaluate(rule["rule"], node, value, old))
    assert results, f"no rule evaluated at {path}"
    return all(results)


# ---------------------------------------------------------------------------
# Every rule compiles and has a message


@pytest.mark.parametrize("schema", [REQUEST_SCHEMA, LINEAGE_SCHEMA], ids=["UnlearnRequest", "ModelLineage"])
def test_every_rule_compiles(schema):
    environment = celpy.Environment()
    rules = [(path, rule) for path, node in walk(schema) for rule in node.get("x-kubernetes-validations") or []]
    assert len(rules) >= 3
    for path, rule in rules:
        environment.compile(rule["rule"])
        assert rule.get("message"), f"rule at {path} has no message"


# ---------------------------------------------------------------------------
# Shared rules


@pytest.mark.parametrize("uri, ok", [
    ("s3://works/books/a.txt", True),
    ("file:///data/a.txt", True),
    ("demo:sherlock-holmes", True),
    ("file:///data/../etc/passwd", False),
    ("s3://works/a/..", False),
])
def test_uri_rule(uri, ok):
    assert check(REQUEST_SCHEMA, ".spec.forget.uri", uri) is ok


@pytest.mark.parametrize("name, ok", [
    ("forget-a", True),
    ("a", True),
    ("a" * 63, True),
    ("a" * 64, False),
    ("Forget-A", False),
    ("forget.a", False),
    ("-forget", False),
])
@pytest.mark.parametrize("schema", [REQUEST_SCHEMA, LINEAGE_SCHEMA], ids=["UnlearnRequest", "ModelLineage"])
def test_name_rule_matches_parser(schema, name, ok):
    rule = schema["x-kubernetes-validations"][0]["rule"]
    assert evaluate(rule, schema, {"metadata": {"name": name}}) is ok
    assert (NAME_PATTERN.match(name) is not None and len(name) <= 63) is ok


# ---------------------------------------------------------------------------
# UnlearnRequest


def test_lineage_ref_immutable():
    assert check(REQUEST_SCHEMA, ".spec.lineageRef", {"name": "a"}, {"name": "a"})
    assert not check(REQUEST_SCHEMA, ".spec.lineageRef", {"name": "b"}, {"name": "a"})


@pytest.mark.parametrize("method, ok", [
    ({}, True),
    ({"forgetWeight": 0.5}, True),
    ({"forgetWeight": 0}, True),
    ({"forgetWeight": 0, "randomLabelWeight": 1}, True),
    ({"forgetWeight": 0, "name": "SSU", "randomLabelWeight": 0.2}, True),
    ({"forgetWeight": 0, "randomLabelWeight": 0}, False),
    ({"forgetWeight": 0, "name": "TaskVector"}, False),
    ({"forgetWeight": 0, "name": "TaskVector", "randomLabelWeight": 1}, False),
])
def test_method_loss_rule_matches_parser(method, ok):
    assert check(REQUEST_SCHEMA, ".spec.method", method) is ok
    try:
        parse_method(method)
        parsed = True
    except SpecError:
        parsed = False
    assert parsed is ok


def admitted(forget: dict, method: dict | None, *, sequence: int | None = 1) -> dict:
    body: dict[str, Any] = {"metadata": {"name": "r"}, "spec": {"lineageRef": {"name": "l"}, "forget": forget}}
    if method is not None:
        body["spec"]["method"] = method
    if sequence is not None:
        body["status"] = {"sequence": sequence, "phase": "Running"}
    return body


def root_transition_rule(schema: dict[str, Any]) -> str:
    rules = [rule["rule"] for rule in schema["x-kubernetes-validations"] if "oldSelf" in rule["rule"]]
    assert len(rules) == 1
    return rules[0]


@pytest.mark.parametrize("old, new, ok", [
    # Not admitted yet: anything may change.
    (admitted({"uri": "demo:a"}, None, sequence=None), admitted({"uri": "demo:b"}, {"epochs": 2}, sequence=None),
     True),
    # Admitted: forget and method are fixed.
    (admitted({"uri": "demo:a"}, {"epochs": 1}), admitted({"uri": "demo:a"}, {"epochs": 1}), True),
    (admitted({"uri": "demo:a"}, None), admitted({"uri": "demo:a"}, None), True),
    (admitted({"uri": "demo:a"}, None), admitted({"uri": "demo:b"}, None), False),
    (admitted({"uri": "demo:a", "title": "A"}, None), admitted({"uri": "demo:a", "title": "B"}, None), False),
    (admitted({"uri": "demo:a"}, {"epochs": 1}), admitted({"uri": "demo:a"}, {"epochs": 2}), False),
    (admitted({"uri": "demo:a"}, None), admitted({"uri": "demo:a"}, {"epochs": 2}), False),
    (admitted({"uri": "demo:a"}, {"epochs": 1}), admitted({"uri": "demo:a"}, None), False),
])
def test_forget_and_method_fixed_after_admission(old, new, ok):
    new = dict(new, status=old.get("status")) if "status" in old else new
    assert evaluate(root_transition_rule(REQUEST_SCHEMA), REQUEST_SCHEMA, new, old) is ok


# ---------------------------------------------------------------------------
# ModelLineage


def test_base_model_immutable():
    assert check(LINEAGE_SCHEMA, ".spec.baseModel", {"uri": "demo:m"}, {"uri": "demo:m"})
    assert not check(LINEAGE_SCHEMA, ".spec.baseModel", {"uri": "demo:n"}, {"uri": "demo:m"})


@pytest.mark.parametrize("old, new, ok", [
    ({}, {}, True),
    ({"store": {"uri": "s3://bucket/a"}}, {"store": {"uri": "s3://bucket/a"}}, True),
    ({"store": {"uri": "s3://bucket/a"}}, {"store": {"uri": "s3://bucket/b"}}, False),
    ({"store": {"uri": "s3://bucket/a"}}, {}, False),
    ({}, {"store": {"uri": "s3://bucket/a"}}, False),
])
def test_store_immutable(old, new, ok):
    base = {"baseModel": {"uri": "demo:m"}}
    assert check(LINEAGE_SCHEMA, ".spec", {**base, **new}, {**base, **old}) is ok


# ---------------------------------------------------------------------------
# Schema agrees with lethe_trainer.spec


@pytest.mark.parametrize("schema", [REQUEST_SCHEMA, LINEAGE_SCHEMA], ids=["UnlearnRequest", "ModelLineage"])
def test_uri_patterns_match_parser(schema):
    uri_fields = [(path, node) for path, node in walk(schema) if path.endswith(".uri") and ".status" not in path]
    assert uri_fields
    for path, node in uri_fields:
        assert node.get("pattern") == URI_PATTERN.pattern, path


def test_enums_match_parser():
    assert schema_at(REQUEST_SCHEMA, ".spec.method.name")["enum"] == list(METHODS)
    assert schema_at(LINEAGE_SCHEMA, ".spec.onFailure")["enum"] == list(ON_FAILURE_POLICIES)
    assert schema_at(REQUEST_SCHEMA, ".spec.lineageRef.name")["pattern"] == NAME_PATTERN.pattern


@pytest.mark.parametrize("schema", [REQUEST_SCHEMA, LINEAGE_SCHEMA], ids=["UnlearnRequest", "ModelLineage"])
def test_every_field_has_description(schema):
    missing = [path for path, node in walk(schema)
               if path and not path.endswith("{}") and path not in (".metadata",) and not node.get("description")
               and not path.endswith("[]")]
    assert missing == []


@pytest.mark.parametrize("schema", [REQUEST_SCHEMA, LINEAGE_SCHEMA], ids=["UnlearnRequest", "ModelLineage"])
def test_status_keeps_no_unknown_fields_at_top(schema):
    status = schema["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert "conditions" in status["properties"]
    assert "phase" in status["properties"]


# Dataclass fields of lethe_trainer.spec that the CRD spells differently.
_RENAMED = {".spec.evaluation.mmlu_uri": ".spec.evaluation.mmlu.uri",
            ".spec.evaluation.mmlu_questions": ".spec.evaluation.mmlu.questions",
            ".spec.method.name": ".spec.method.name"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@pytest.mark.parametrize("schema, prefix, cls", [
    (LINEAGE_SCHEMA, ".spec.evaluation", "Evaluation"),
    (LINEAGE_SCHEMA, ".spec.collapseGuard", "CollapseGuard"),
    (LINEAGE_SCHEMA, ".spec.preparation", "Preparation"),
    (REQUEST_SCHEMA, ".spec.method", "MethodSpec"),
    (REQUEST_SCHEMA, ".spec.method.calibration", "Calibration"),
    (REQUEST_SCHEMA, ".spec.job", "JobSpec"),
])
def test_crd_declares_every_spec_field(schema, prefix, cls):
    """A spec field without a CRD property would be pruned by the API server before the operator sees it."""
    import dataclasses

    from lethe_trainer import spec

    if not hasattr(spec, cls):
        pytest.skip(f"lethe_trainer.spec has no {cls}")
    declared = {path for path, _ in walk(schema)}
    missing = []
    for field in dataclasses.fields(getattr(spec, cls)):
        path = f"{prefix}.{_camel(field.name)}"
        path = _RENAMED.get(f"{prefix}.{field.name}", path)
        if path not in declared:
            missing.append(path)
    assert missing == []


@pytest.mark.parametrize("spec, ok", [
    ({"preparation": {"works": [{"uri": "demo:a"}]}}, True),
    ({"preparation": {"works": [{"uri": "demo:a"}], "mixWorks": [{"uri": "demo:b"}]}, "heldOut": {"uri": "demo:c"}},
     True),
    ({"preparation": {"works": [{"uri": "demo:a"}], "mixWorks": [{"uri": "demo:a"}]}}, False),
    ({"preparation": {"works": [{"uri": "demo:a"}], "mixWorks": [{"uri": "demo:c"}]}, "heldOut": {"uri": "demo:c"}},
     False),
])
def test_mix_works_rule_matches_parser(spec, ok):
    body = {"baseModel": {"uri": "demo:m"}, **spec}
    node = schema_at(LINEAGE_SCHEMA, ".spec")
    rules = [rule["rule"] for rule in node["x-kubernetes-validations"] if "mixWorks" in rule["rule"]]
    if "mixWorks" not in str(schema_at(LINEAGE_SCHEMA, ".spec.preparation")):
        pytest.skip("the CRD has no spec.preparation.mixWorks")
    assert len(rules) == 1
    assert evaluate(rules[0], node, body) is ok
    resource = {"apiVersion": "lethe.dev/v1alpha1", "kind": "ModelLineage", "metadata": {"name": "m"}, "spec": body}
    try:
        parse_lineage(resource)
        parsed = True
    except SpecError:
        parsed = False
    assert parsed is ok

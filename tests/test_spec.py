"""Spec validation: every bad value is rejected with its field, the value and a fix."""

from __future__ import annotations

import copy

import pytest

from lethe_trainer.spec import METHODS, SpecError, parse_lineage, parse_request

LINEAGE = {
    "apiVersion": "lethe.dev/v1alpha1",
    "kind": "ModelLineage",
    "metadata": {"name": "books", "namespace": "team-a"},
    "spec": {"baseModel": {"uri": "s3://models/smollm2/"}, "retain": {"works": [{"uri": "file:///data/emma.txt"}]}},
}

REQUEST = {
    "apiVersion": "lethe.dev/v1alpha1",
    "kind": "UnlearnRequest",
    "metadata": {"name": "forget-holmes", "namespace": "team-a"},
    "spec": {"lineageRef": {"name": "books"}, "forget": {"uri": "s3://works/holmes.txt"},
             "method": {"name": "SSU", "learningRate": 1e-3}},
}


def with_value(resource: dict, path: str, value) -> dict:
    changed = copy.deepcopy(resource)
    target = changed
    *parents, last = path.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value
    return changed


def test_valid_resources_parse():
    lineage = parse_lineage(LINEAGE)
    request = parse_request(REQUEST)
    assert lineage.name == "books"
    assert lineage.retain_uris == ("file:///data/emma.txt",)
    assert request.method.name == "SSU"
    assert request.method.learning_rate == 1e-3
    assert request.method.saliency_std == 1.0
    assert request.lineage == "books"


@pytest.mark.parametrize(("path", "value", "field", "fix_word"), [
    ("spec.method.learningRate", 0, "spec.method.learningRate", "greater than 0"),
    ("spec.method.learningRate", -1e-4, "spec.method.learningRate", "greater than 0"),
    ("spec.method.learningRate", "fast", "spec.method.learningRate", "set a number"),
    ("spec.method.saliencyStd", -0.5, "spec.method.saliencyStd", "at least 0"),
    ("spec.method.name", "GradientMagic", "spec.method.name", "SSU"),
    ("spec.method.maxChunks", 1, "spec.method.maxChunks", "at least 2"),
    ("spec.method.epochs", 1.5, "spec.method.epochs", "integer"),
    ("spec.method.negationScale", 0, "spec.method.negationScale", "greater than 0"),
    ("spec.method.device", "tpu", "spec.method.device", "cuda"),
    ("spec.forget.uri", "s3:/x", "spec.forget.uri", "s3://BUCKET/KEY"),
    ("spec.forget.uri", "s3://", "spec.forget.uri", "s3://BUCKET/KEY"),
    ("spec.forget.uri", "s3://bucket/../x", "spec.forget.uri", "s3://BUCKET/KEY"),
    ("spec.forget.uri", "ftp://host/book.txt", "spec.forget.uri", "s3://BUCKET/KEY"),
    ("spec.forget.uri", None, "spec.forget.uri", "set a URI"),
    ("spec.lineageRef.name", "Books_1", "spec.lineageRef.name", "lowercase"),
])
def test_bad_request_value_names_field_value_and_fix(path, value, field, fix_word):
    with pytest.raises(SpecError) as raised:
        parse_request(with_value(REQUEST, path, value))
    message = str(raised.value)
    assert raised.value.field == field
    assert message.startswith(field)
    assert repr(value) in message
    assert fix_word in message


def test_unknown_method_lists_supported_ones():
    with pytest.raises(SpecError) as raised:
        parse_request(with_value(REQUEST, "spec.method.name", "NPO2"))
    for method in METHODS:
        assert method in str(raised.value)


def test_empty_loss_is_rejected():
    bad = with_value(REQUEST, "spec.method.forgetWeight", 0)
    bad["spec"]["method"]["randomLabelWeight"] = 0
    with pytest.raises(SpecError) as raised:
        parse_request(bad)
    assert raised.value.field == "spec.method.forgetWeight"


@pytest.mark.parametrize(("path", "value", "field"), [
    ("spec.baseModel.uri", None, "spec.baseModel.uri"),
    ("spec.evaluation.topP", 1.5, "spec.evaluation.topP"),
    ("spec.evaluation.forgetChunks", 0, "spec.evaluation.forgetChunks"),
    ("spec.collapseGuard.minRetainRougeFraction", 2, "spec.collapseGuard.minRetainRougeFraction"),
    ("spec.onFailure", "Retry", "spec.onFailure"),
    ("spec.preparation.works", [], "spec.preparation.works"),
])
def test_bad_lineage_value_names_field(path, value, field):
    with pytest.raises(SpecError) as raised:
        parse_lineage(with_value(LINEAGE, path, value))
    assert raised.value.field == field
    assert field in str(raised.value)


@pytest.mark.parametrize(("key", "value"), [("mergeFraction", 0), ("mergeFraction", 1.5), ("retainKlWeight", -1)])
def test_bad_preparation_value_names_field(key, value):
    prepared = with_value(LINEAGE, "spec.preparation.works", [{"uri": "file:///data/holmes.txt"}])
    assert parse_lineage(prepared).preparation.merge_fraction == 1.0
    with pytest.raises(SpecError) as raised:
        parse_lineage(with_value(prepared, f"spec.preparation.{key}", value))
    assert raised.value.field == f"spec.preparation.{key}"
    assert str(value) in str(raised.value)


def test_chunks_per_work_defaults_to_scored_and_validation():
    prepared = with_value(LINEAGE, "spec.preparation.works", [{"uri": "file:///data/holmes.txt"}])
    prepared = with_value(prepared, "spec.evaluation", {"forgetChunks": 12, "validationChunks": 5})
    assert parse_lineage(prepared).preparation.chunks_per_work == 17
    explicit = with_value(prepared, "spec.preparation.chunksPerWork", 40)
    assert parse_lineage(explicit).preparation.chunks_per_work == 40


def test_wrong_kind_and_version_are_rejected():
    with pytest.raises(SpecError) as raised:
        parse_request(with_value(REQUEST, "kind", "ModelLineage"))
    assert raised.value.field == "kind"
    with pytest.raises(SpecError) as raised:
        parse_request(with_value(REQUEST, "apiVersion", "lethe.dev/v1"))
    assert "lethe.dev/v1alpha1" in str(raised.value)


def test_error_within_resource_names_it():
    error = SpecError("spec.forget.uri", "x", "is not a valid URI", "fix it").within("UnlearnRequest 'a'")
    assert str(error).startswith("UnlearnRequest 'a': spec.forget.uri 'x'")


@pytest.mark.parametrize(("resource", "path", "field", "suggestion"), [
    (REQUEST, "spec.method.learningrate", "spec.method.learningrate", "learningRate"),
    (REQUEST, "spec.methods", "spec.methods", "method"),
    (REQUEST, "spec.job.gpu", "spec.job.gpu", "gpus"),
    (LINEAGE, "spec.evaluation.forgetChunk", "spec.evaluation.forgetChunk", "forgetChunks"),
    (LINEAGE, "spec.retainWorks", "spec.retainWorks", "did you mean retain?"),
    (LINEAGE, "spec.zzz", "spec.zzz", "use one of baseModel"),
])
def test_unknown_field_is_rejected_with_suggestion(resource, path, field, suggestion):
    parse = parse_request if resource is REQUEST else parse_lineage
    with pytest.raises(SpecError) as raised:
        parse(with_value(resource, path, 1))
    assert raised.value.field == field
    assert "is not a known field" in str(raised.value)
    assert suggestion in str(raised.value)


def test_known_fields_match_crd_schemas():
    """The parser accepts exactly the fields the CRDs declare, so local runs and clusters agree."""
    import pathlib

    import yaml

    from lethe_trainer.spec import KNOWN_FIELDS

    root = pathlib.Path(__file__).resolve().parents[1] / "crds"
    for kind, file in (("ModelLineage", "modellineages.yaml"), ("UnlearnRequest", "unlearnrequests.yaml")):
        crd = yaml.safe_load((root / file).read_text())
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for schema, fields in KNOWN_FIELDS.items():
            if not schema.startswith(kind + "."):
                continue
            node = spec
            for part in schema.split(".")[2:]:
                node = node["properties"][part]
            assert set(node["properties"]) == set(fields), schema

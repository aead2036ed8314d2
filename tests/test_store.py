"""Tests of the artifact store, run against a local directory and against SeaweedFS's S3 gateway."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lethe_trainer import taskvector
from lethe_trainer.store import (ConflictError, IntegrityError, ObjectRef, StoreError, open_lineage_store,
                                 parse_store_uri)
from lethe_trainer.store.cli import main as store_cli
from tests.support.seaweedfs import SeaweedFS, s3_credentials, seaweedfs  # noqa: F401 - pytest fixtures

TRAINER_ROOT = Path(__file__).resolve().parents[1] / "trainer"
SHAPES = {  # (out, in) of the weights the task vectors touch, plus one they never touch
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.v_proj.weight": (4, 8),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.embed_tokens.weight": (16, 8),
}
TOUCHED = [name for name in SHAPES if "proj" in name]
RANK = 2
SHARED_BUCKET = "lethe-store-tests"


@pytest.fixture(autouse=True)
def _no_instance_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keeps botocore's credential chain from probing the instance metadata address.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.seaweedfs)])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        return f"file://{root}"
    server: SeaweedFS = request.getfixturevalue("s3_credentials")
    # One bucket for the suite: SeaweedFS gives each bucket its own volumes.
    if SHARED_BUCKET not in server.list_buckets():
        server.create_bucket(SHARED_BUCKET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
    return f"s3://{SHARED_BUCKET}/runs/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(store_uri: str):
    return open_lineage_store(store_uri, namespace="default", lineage="demo")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _vector(seed: int) -> taskvector.TaskVector:
    generator = torch.Generator().manual_seed(1000 + seed)
    vector = taskvector.TaskVector()
    for name in TOUCHED:
        out_features, in_features = SHAPES[name]
        vector.factors[name] = taskvector.LoraFactors(
            a=torch.randn(RANK, in_features, generator=generator) * 0.1,
            b=torch.randn(out_features, RANK, generator=generator) * 0.1,
            scale=32 / RANK,
        )
    return vector


def _save_vector(vector: taskvector.TaskVector, directory: Path, name: str) -> Path:
    path = directory / f"{name}.safetensors"
    vector.save(path)
    return path


def _save_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path))
    return path


def _manifest(step_id: str, sequence: int, parent: str | None, objects: dict[str, ObjectRef],
              negation_scale: float = 1.0) -> dict:
    return {
        "step_id": step_id,
        "sequence": sequence,
        "parent_step_id": parent,
        "objects": {role: ref.to_dict() for role, ref in objects.items()},
        "method": {"name": "SSU", "negation_scale": negation_scale},
        "request": {"name": f"forget-{step_id}"},
    }


def _commit(store, tmp_path: Path, step_id: str, sequence: int, parent: str | None, seed: int,
            negation_scale: float = 1.0) -> dict:
    ref = store.put_object(_save_vector(_vector(seed), tmp_path, step_id), suffix=".safetensors")
    return store.commit_step(step_id, _manifest(step_id, sequence, parent, {"task_vector": ref}, negation_scale))


def _write_base(store, tmp_path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    state = _state(seed)
    ref = store.put_object(_save_state(state, tmp_path / "base.safetensors"), suffix=".safetensors")
    store.write_base({"objects": {"checkpoint": ref.to_dict()}, "model": {"uri": "demo:tiny"}})
    return state


def _all_keys(store) -> list[str]:
    return sorted(info.key for info in store.backend.list(store.prefix + "/"))


# ---------------------------------------------------------------------------


def test_round_trip_vector_and_checkpoint(store, tmp_path: Path) -> None:
    vector = _vector(1)
    state = _state(1)
    vector_path = _save_vector(vector, tmp_path, "tv")
    state_path = _save_state(state, tmp_path / "ckpt.safetensors")

    vector_ref = store.put_object(vector_path, suffix=".safetensors")
    state_ref = store.put_object(state_path, suffix=".safetensors")
    assert vector_ref.sha256 == hashlib.sha256(vector_path.read_bytes()).hexdigest()
    assert vector_ref.key == f"objects/sha256/{vector_ref.sha256}.safetensors"
    assert vector_ref.size == vector_path.stat().st_size
    assert ObjectRef.from_dict(vector_ref.to_dict()) == vector_ref
    assert store.put_object(vector_path, suffix=".safetensors") == vector_ref  # idempotent

    out = tmp_path / "out"
    out.mkdir()
    loaded = taskvector.TaskVector.load(store.get_object(vector_ref, out / "tv.safetensors"))
    for name in TOUCHED:
        assert torch.equal(loaded.factors[name].a, vector.factors[name].a)
        assert torch.equal(loaded.factors[name].b, vector.factors[name].b)
        assert loaded.factors[name].scale == vector.factors[name].scale
    restored = load_file(str(store.get_object(state_ref.to_dict(), out)))  # a directory destination
    assert all(torch.equal(restored[name], state[name]) for name in state)

    small = store.put_object(b"{}", suffix=".json")
    assert store.get_object(small, out / "small.json").read_bytes() == b"{}"


def test_corrupted_object_error_names_key(store, store_uri: str, tmp_path: Path) -> None:
    path = _save_vector(_vector(2), tmp_path, "tv")
    ref = store.put_object(path, suffix=".safetensors")
    corrupted = bytearray(path.read_bytes())
    corrupted[-1] ^= 0xFF
    full_key = f"{store.prefix}/{ref.key}"
    if store_uri.startswith("file://"):
        (Path(parse_store_uri(store_uri).prefix) / full_key).write_bytes(bytes(corrupted))
    else:
        location = parse_store_uri(store_uri)
        store.backend.client.put_object(Bucket=location.bucket, Key=f"{location.prefix}/{full_key}",
                                        Body=bytes(corrupted))

    destination = tmp_path / "fetched.safetensors"
    with pytest.raises(IntegrityError) as caught:
        store.get_object(ref, destination)
    message = str(caught.value)
    assert ref.key in message
    assert ref.sha256 in message
    assert hashlib.sha256(bytes(corrupted)).hexdigest() in message
    assert not destination.exists()

    report = store.verify()
    assert report["ok"]  # nothing names the object yet
    assert ref.key in report["orphans"]

    # Uploading the intact file again repairs the stored copy.
    assert store.put_object(path, suffix=".safetensors") == ref
    store.commit_step("s1", _manifest("s1", 1, None, {"task_vector": ref}))
    assert store.verify()["ok"]


def test_verify_reports_corrupted_object(store, store_uri: str, tmp_path: Path) -> None:
    manifest = _commit(store, tmp_path, "s1", 1, None, seed=1)
    ref = ObjectRef.from_dict(manifest["objects"]["task_vector"])
    location = parse_store_uri(store_uri)
    body = b"\0" * ref.size
    if location.scheme == "file":
        (Path(location.prefix) / store.prefix / ref.key).write_bytes(body)
    else:
        store.backend.client.put_object(Bucket=location.bucket, Key=f"{location.prefix}/{store.prefix}/{ref.key}",
                                        Body=body)
    report = store.verify()
    assert not report["ok"]
    assert any(ref.key in problem and ref.sha256 in problem for problem in report["problems"])


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from lethe_trainer.store import open_lineage_store
    store = open_lineage_store(sys.argv[1], namespace="default", lineage="demo")
    for path in sys.argv[2:]:
        store.put_object(path, suffix=".safetensors")
    os.kill(os.getpid(), signal.SIGKILL)  # dies after the uploads, before commit_step
""")


def test_killed_upload_keeps_previous_step(store, store_uri: str, tmp_path: Path) -> None:
    _commit(store, tmp_path, "s1", 1, None, seed=1)
    store.set_head("s1", "promote")
    vector_path = _save_vector(_vector(2), tmp_path, "s2")
    checkpoint_path = _save_state(_state(2), tmp_path / "s2-ckpt.safetensors")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TRAINER_ROOT),
                                                                    os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, store_uri, str(vector_path),
                             str(checkpoint_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr

    assert [m["step_id"] for m in store.list_steps()] == ["s1"]
    assert store.head()["step_id"] == "s1"
    assert store.read_step("s2") is None
    report = store.verify()
    assert report["ok"], report["problems"]
    assert len(report["orphans"]) == 2  # the uploads nothing names yet

    # The rerun finds its objects already stored and commits.
    vector_ref = store.put_object(vector_path, suffix=".safetensors")
    checkpoint_ref = store.put_object(checkpoint_path, suffix=".safetensors")
    store.commit_step("s2", _manifest("s2", 2, "s1", {"task_vector": vector_ref, "checkpoint": checkpoint_ref}))
    store.set_head("s2", "promote")
    assert [m["step_id"] for m in store.list_steps()] == ["s1", "s2"]
    assert store.head()["step_id"] == "s2"
    assert store.verify()["orphans"] == []


def test_commit_rejects_missing_objects(store, tmp_path: Path) -> None:
    ref = ObjectRef(key="objects/sha256/" + "ab" * 32 + ".safetensors", sha256="ab" * 32, size=10)
    with pytest.raises(StoreError, match=ref.key):
        store.commit_step("s1", _manifest("s1", 1, None, {"task_vector": ref}))
    assert store.list_steps() == []


def test_rebuild_matches_stepwise_negation(store, tmp_path: Path) -> None:
    base = _write_base(store, tmp_path)
    scales = [1.0, 0.5, 2.0]
    vectors = [_vector(seed) for seed in (1, 2, 3)]
    stepwise = dict(base)
    parent = None
    for index, (vector, scale) in enumerate(zip(vectors, scales), start=1):
        step_id = f"s{index}"
        ref = store.put_object(_save_vector(vector, tmp_path, step_id), suffix=".safetensors")
        store.commit_step(step_id, _manifest(step_id, index, parent, {"task_vector": ref}, scale))
        stepwise = taskvector.negate(stepwise, vector, scale)  # what the trainer computes step by step
        parent = step_id

    rebuilt = store.rebuild("s3")
    assert set(rebuilt) == set(base)
    # Bit-exact: the same negate() on the same float32 tensors, in the same order.
    for name in base:
        assert torch.equal(rebuilt[name], stepwise[name]), name

    # Against an independent float64 computation of theta_0 - sum(lambda_t * B_t A_t * scale).
    for name in base:
        reference = base[name].double()
        for vector, scale in zip(vectors, scales):
            if name in vector.factors:
                factors = vector.factors[name]
                reference = reference - scale * factors.scale * (factors.b.double() @ factors.a.double())
        torch.testing.assert_close(rebuilt[name].double(), reference, atol=1e-6, rtol=0)
    assert torch.equal(rebuilt["model.embed_tokens.weight"], base["model.embed_tokens.weight"])

    theta_0 = store.rebuild(None)
    assert all(torch.equal(theta_0[name], base[name]) for name in base)


def test_rollback_keeps_old_steps(store, tmp_path: Path) -> None:
    _write_base(store, tmp_path)
    _commit(store, tmp_path, "s1", 1, None, seed=1)
    store.set_head("s1", "promote")
    old_s2 = _commit(store, tmp_path, "s2", 2, "s1", seed=2)
    store.set_head("s2", "promote")

    store.rollback("s1")
    assert store.head()["step_id"] == "s1"
    new_s2 = _commit(store, tmp_path, "s2b", 2, "s1", seed=22)
    store.set_head("s2b", "promote", {"evaluation": {"rouge": 0.1}})

    assert store.read_step("s2") == old_s2
    assert store.read_step("s2b") == new_s2
    assert [m["step_id"] for m in store.list_steps()] == ["s1", "s2", "s2b"]
    assert [m["step_id"] for m in store.chain("s2b")] == ["s1", "s2b"]
    assert [m["step_id"] for m in store.chain("s2")] == ["s1", "s2"]
    history = [(r["number"], r["reason"], r["previous_step_id"], r["step_id"]) for r in store.head_history()]
    assert history == [(1, "promote", None, "s1"), (2, "promote", "s1", "s2"), (3, "rollback", "s2", "s1"),
                       (4, "promote", "s1", "s2b")]
    assert store.head()["detail"] == {"evaluation": {"rouge": 0.1}}
    report = store.verify()
    assert report["ok"], report["problems"]
    assert report["steps"] == 3
    assert report["heads"] == 4

    # Committed steps never change; re-committing the same manifest is a no-op.
    assert store.commit_step("s2", old_s2) == old_s2
    with pytest.raises(ConflictError, match="s2"):
        store.commit_step("s2", dict(old_s2, request={"name": "other"}))
    with pytest.raises(StoreError, match="not committed"):
        store.set_head("s9", "promote")
    with pytest.raises(StoreError, match="parent"):
        _commit(store, tmp_path, "s4", 4, "missing", seed=4)
    assert store.rollback(None)["step_id"] is None
    assert store.verify()["ok"]


def test_gc_removes_only_unnamed_objects(store, tmp_path: Path) -> None:
    _write_base(store, tmp_path)
    manifest = _commit(store, tmp_path, "s1", 1, None, seed=1)
    store.set_head("s1", "promote")
    orphan = store.put_object(b"left behind by an interrupted step", suffix=".bin")
    before = _all_keys(store)

    assert store.garbage_collect(False) == []  # the orphan is younger than the default grace period
    assert store.garbage_collect(True, min_age_seconds=0) == [orphan.key]
    assert _all_keys(store) == before
    assert store.garbage_collect(False, min_age_seconds=0) == [orphan.key]

    after = _all_keys(store)
    assert sorted(set(before) - set(after)) == [f"{store.prefix}/{orphan.key}"]
    named = {ObjectRef.from_dict(ref).key for ref in manifest["objects"].values()}
    named.add(store.read_base()["objects"]["checkpoint"]["key"])
    assert all(store.backend.head(f"{store.prefix}/{key}") is not None for key in named)
    report = store.verify()
    assert report["ok"]
    assert report["orphans"] == []


@pytest.mark.parametrize("uri", ["s3:/x", "s3://", "s3://bucket/../x", "ftp://x", "file://relative/path",
                                 "relative/path", "s3://Bucket/x", "s3://bucket//x", "file:///tmp/../etc"])
def test_malformed_uri_is_rejected(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as caught:
        open_lineage_store(uri, namespace="default", lineage="demo")
    message = str(caught.value)
    assert repr(uri) in message
    assert "expected s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "store"
    with pytest.raises(StoreError, match="does not exist"):
        open_lineage_store(f"file://{missing}", lineage="demo")
    assert list(tmp_path.iterdir()) == []
    store = open_lineage_store(f"file://{missing}", lineage="demo", create=True)
    assert missing.is_dir()
    assert store.list_steps() == []


def test_invalid_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="lineage"):
        open_lineage_store(f"file://{tmp_path}", lineage="../up")
    store = open_lineage_store(f"file://{tmp_path}", lineage="demo")
    with pytest.raises(StoreError, match="step id"):
        store.read_step("../../x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.seaweedfs
def test_missing_bucket_not_created(s3_credentials: SeaweedFS) -> None:
    buckets = s3_credentials.list_buckets()
    with pytest.raises(StoreError) as caught:
        open_lineage_store("s3://lethe-no-such-bucket/p", lineage="demo",
                           s3_endpoint_url=s3_credentials.endpoint_url)
    message = str(caught.value)
    assert "lethe-no-such-bucket" in message
    assert s3_credentials.endpoint_url in message
    assert "does not exist" in message
    assert s3_credentials.list_buckets() == buckets


@pytest.mark.seaweedfs
def test_denied_credentials_write_nothing(s3_credentials: SeaweedFS,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    bucket = f"lethe-{uuid.uuid4().hex[:16]}"
    s3_credentials.create_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-known-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    uri = f"s3://{bucket}/p"
    with pytest.raises(StoreError) as caught:
        open_lineage_store(uri, lineage="demo", s3_endpoint_url=s3_credentials.endpoint_url, max_attempts=1)
    message = str(caught.value)
    assert "denied" in message
    assert bucket in message
    assert s3_credentials.endpoint_url in message

    # Skipping the bucket check, the first write fails the same way.
    store = open_lineage_store(uri, lineage="demo", s3_endpoint_url=s3_credentials.endpoint_url, max_attempts=1,
                               check_bucket=False)
    with pytest.raises(StoreError, match="denied"):
        store.put_object(b"payload", suffix=".bin")
    assert s3_credentials.list_keys(bucket) == []


@pytest.mark.seaweedfs
def test_multipart_upload_and_download(s3_credentials: SeaweedFS, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    bucket = f"lethe-{uuid.uuid4().hex[:16]}"
    s3_credentials.create_bucket(bucket)
    store = open_lineage_store(f"s3://{bucket}/p", lineage="demo", s3_endpoint_url=s3_credentials.endpoint_url,
                               multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(11 * 2**20))
    ref = store.put_object(path, suffix=".bin")
    location = f"p/{store.prefix}/{ref.key}"
    etag = store.backend.client.head_object(Bucket=bucket, Key=location)["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts
    fetched = store.get_object(ref, tmp_path / "fetched.bin")
    assert fetched.read_bytes() == path.read_bytes()


def test_store_imports_without_torch() -> None:
    code = ("import sys, lethe_trainer.store, lethe_trainer.store.cli; "
            "heavy = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(TRAINER_ROOT)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_cli_commands_on_file_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    root.mkdir()
    uri = f"file://{root}"
    store = open_lineage_store(uri, lineage="demo")
    base = _write_base(store, tmp_path)
    _commit(store, tmp_path, "s1", 1, None, seed=1)
    store.set_head("s1", "promote")
    _commit(store, tmp_path, "s2", 2, "s1", seed=2)
    store.set_head("s2", "promote")
    common = ["--store", uri, "--lineage", "demo"]

    assert store_cli(["store", "history", *common]) == 0
    out = capsys.readouterr().out
    assert "s1" in out
    assert "* " in out  # the head's marker
    assert "promote" in out
    assert store_cli(["store", "verify", *common]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    assert store_cli(["store", "rollback", "s1", *common]) == 0
    assert "s2 -> s1" in capsys.readouterr().out
    assert store.head()["step_id"] == "s1"

    output = tmp_path / "rebuilt"
    assert store_cli(["store", "rebuild", "s2", "--output", str(output), *common]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(output / "model.safetensors")
    rebuilt = load_file(printed)
    expected = store.rebuild("s2")
    assert all(torch.equal(rebuilt[name], expected[name]) for name in base)

    orphan = store.put_object(b"orphan", suffix=".bin")
    assert store_cli(["store", "gc", "--dry-run", "--min-age-hours", "0", *common]) == 0
    assert orphan.key in capsys.readouterr().out
    assert store_cli(["store", "rollback", "nope", *common]) == 2
    assert "not committed" in capsys.readouterr().err

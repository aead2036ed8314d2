"""A lineage's history in object storage: base model, committed steps, head records.

Layout under the store URI's prefix (the contract between the trainer, which
writes a step, and the orchestrator, which reads it and moves the head)::

    lineages/<namespace>/<lineage>/
        base.json                         theta_0: {"objects": {"checkpoint": ObjectRef, ...}, ...}
        objects/sha256/<hex><suffix>      content-addressed blobs (task vectors, checkpoints)
        steps/<step_id>/manifest.json     one committed step
        heads/<NNNNNN>.json               append-only head records, highest number wins

A step is committed when its manifest exists, and the manifest is written
last, after every object it names has been uploaded and checked. Readers
only look at committed manifests, so an interrupted upload leaves objects
that nothing names (``garbage_collect`` removes them later) and never a half
step. Head records are never rewritten: a rollback appends a record, and
every earlier step stays readable.

Not promised: more than one writer per step id at a time (exclusive creates
make a second, different commit fail rather than overwrite, on servers that
honour ``If-None-Match``), or cross-lineage deduplication of objects.

Nothing here imports torch at module import time; ``rebuild`` imports it
when called.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lethe_trainer.store.errors import ConflictError, IntegrityError, ObjectMissingError, StoreError
from lethe_trainer.store.objects import Backend, ObjectRef, open_backend, sha256_file, temporary_path
from lethe_trainer.store.uri import check_name, check_step_id, check_suffix, join_key, parse_store_uri

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_HEAD_NAME = re.compile(r"^(\d{6,})\.json$")
_REASON = re.compile(r"^[a-z][a-z0-9\-]{0,62}$")
_HEAD_ATTEMPTS = 5
_READ_BACK_LIMIT = 256 * 2**20


def _canonical(record: Any, what: str) -> bytes:
    try:
        return (json.dumps(record, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as error:
        raise StoreError(f"{what} cannot be stored as JSON ({error}); use only dicts, lists, strings, "
                         "finite numbers, booleans and None") from error


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LineageStore:
    """One lineage of one store. Make it with ``open_lineage_store``."""

    def __init__(self, backend: Backend, *, namespace: str, lineage: str) -> None:
        self.backend = backend
        self.namespace = check_name(namespace, "namespace")
        self.lineage = check_name(lineage, "lineage")
        self.prefix = join_key("lineages", self.namespace, self.lineage)

    def __repr__(self) -> str:
        return f"LineageStore({self.uri!r})"

    @property
    def uri(self) -> str:
        return self.backend.url(self.prefix)

    def _key(self, relative: str) -> str:
        return join_key(self.prefix, relative)

    def url(self, relative: str) -> str:
        """Return the full URI of a key relative to this lineage, for messages and logs."""
        return self.backend.url(self._key(relative))

    # ------------------------------------------------------------------
    # Objects

    def put_object(self, source: Path | str | bytes, suffix: str = "", *,
                   verify_content: bool | None = None) -> ObjectRef:
        """Upload a file (path) or bytes under its sha256, check it arrived, and return its reference.

        Uploading content that is already stored intact does nothing. After
        the upload the size and sha256 are checked. With ``verify_content``
        the object is read back and hashed; that is the default on file://
        and for objects up to 256 MiB (task vectors). Larger objects on S3 are
        compared with the digest recorded at upload, because reading them back
        doubles the traffic. botocore's transfer checksums cover the bytes in
        flight, and every download hashes the content again.
        """
        suffix = check_suffix(suffix)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            digest, size, path = hashlib.sha256(data).hexdigest(), len(data), None
        else:
            path = Path(source)
            if not path.is_file():
                raise StoreError(f"cannot upload {path}: it is not a file; pass the path of the file to store")
            data, digest, size = None, sha256_file(path), path.stat().st_size
        ref = ObjectRef(key=f"objects/sha256/{digest}{suffix}", sha256=digest, size=size)
        if self._object_problem(ref) is None:
            logger.debug("%s already stored", self.url(ref.key))
            return ref
        started = time.monotonic()
        if data is not None:
            self.backend.put_bytes(self._key(ref.key), data)
        else:
            self.backend.put_file(self._key(ref.key), path, sha256=digest)
        if verify_content is None:
            verify_content = size <= _READ_BACK_LIMIT
        problem = self._object_problem(ref, deep=verify_content)
        if problem is not None:
            raise IntegrityError(f"upload of {self.url(ref.key)} did not verify: {problem}; retry the upload, and "
                                 "if it fails again check the storage server")
        logger.info("stored %s (%d bytes) in %.1f s", self.url(ref.key), size, time.monotonic() - started)
        return ref

    def _object_problem(self, ref: ObjectRef, *, deep: bool = False) -> str | None:
        """Why the stored object does not match ``ref``, or None if it does.

        Compares the size, then the sha256: the digest recorded at upload when
        the backend keeps one and ``deep`` is off, else the digest of the bytes
        read back (always on file://, where reading is cheap).
        """
        info = self.backend.head(self._key(ref.key))
        if info is None:
            return "it does not exist"
        if info.size != ref.size:
            return f"size is {info.size} bytes, expected {ref.size}"
        if deep or info.sha256 is None:
            actual, _ = self.backend.digest(self._key(ref.key))
            source = "content"
        else:
            actual, source = info.sha256, "recorded"
        if actual != ref.sha256:
            return f"{source} sha256 is {actual}, expected {ref.sha256}"
        return None

    def get_object(self, ref: ObjectRef | Mapping[str, Any], dest_path: Path | str) -> Path:
        """Download an object to ``dest_path`` (a file, or a directory to put it in) and check its sha256."""
        ref = ObjectRef.from_dict(ref)
        destination = Path(dest_path)
        if destination.is_dir():
            destination = destination / ref.key.rsplit("/", 1)[-1]
        with temporary_path(destination.parent, destination.name) as temp:
            self.backend.download(self._key(ref.key), temp)
            actual = sha256_file(temp)
            size = temp.stat().st_size
            if actual != ref.sha256 or size != ref.size:
                raise IntegrityError(
                    f"object {self.url(ref.key)} is corrupted: expected sha256 {ref.sha256} ({ref.size} bytes), "
                    f"got sha256 {actual} ({size} bytes); re-upload it from its source with put_object, or roll "
                    "the head back before the steps that name it")
            temp.replace(destination)
        return destination

    # ------------------------------------------------------------------
    # Records

    def _read_record(self, relative: str) -> dict[str, Any] | None:
        raw = self.backend.read_bytes(self._key(relative))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError as error:
            raise StoreError(f"record {self.url(relative)} is not valid JSON ({error}); restore it from a backup "
                             "or remove it, then run `lethe store verify`") from error
        if not isinstance(record, dict):
            raise StoreError(f"record {self.url(relative)} is not a JSON object; restore it from a backup "
                             "or remove it, then run `lethe store verify`")
        return record

    def _check_objects(self, record: Mapping[str, Any], what: str, *, required: tuple[str, ...] = ()) -> None:
        objects = record.get("objects")
        if not isinstance(objects, Mapping):
            raise StoreError(f"{what} has no 'objects' mapping of role to ObjectRef dict; add it")
        for role in required:
            if role not in objects:
                raise StoreError(f"{what} names no {role!r} object; upload it with put_object and add its "
                                 f"ObjectRef dict under objects.{role}")
        for role, data in objects.items():
            ref = ObjectRef.from_dict(data)
            problem = self._object_problem(ref)
            if problem is not None:
                error = ObjectMissingError if problem == "it does not exist" else IntegrityError
                raise error(f"{what}: object {role!r} at {self.url(ref.key)} cannot be used: {problem}; "
                            "upload it with put_object before committing")

    def write_base(self, record: Mapping[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Record the lineage's theta_0; its objects (at least "checkpoint" for rebuild) must be uploaded first.

        Writing the same record again does nothing. A different record needs
        ``replace=True`` and is refused once steps are committed.
        """
        what = f"base record {self.url('base.json')}"
        data = _canonical(record, what)
        normalized = json.loads(data)
        self._check_objects(normalized, what)
        existing = self.read_base()
        if existing == normalized:
            return normalized
        if existing is not None:
            if not replace:
                raise ConflictError(f"{what} already contains a different base; pass replace=True to change it "
                                    "before any step is committed")
            if self.list_steps():
                raise ConflictError(f"{what} cannot be replaced: this lineage has committed steps built on it; "
                                    "start a new lineage for a new base model")
        self.backend.put_bytes(self._key("base.json"), data, exclusive=existing is None)
        logger.info("wrote %s", what)
        return normalized

    def read_base(self) -> dict[str, Any] | None:
        return self._read_record("base.json")

    def commit_step(self, step_id: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Make a step visible: check its objects, then write its manifest (the commit point).

        Committing the same manifest again is a no-op; a different manifest
        for a committed step id raises ConflictError.
        """
        step_id = check_step_id(step_id)
        relative = f"steps/{step_id}/manifest.json"
        what = f"manifest {self.url(relative)}"
        if not isinstance(manifest, Mapping):
            raise StoreError(f"{what}: the manifest is a {type(manifest).__name__}, not a dict")
        data = _canonical(manifest, what)
        normalized = json.loads(data)
        self._check_manifest_fields(normalized, step_id, what)
        existing = self.read_step(step_id)
        if existing is not None:
            if existing == normalized:
                logger.info("step %s is already committed with this manifest", step_id)
                return existing
            raise ConflictError(f"{what} is already committed with a different manifest; a committed step never "
                                "changes: commit the new result under a new step id")
        self._check_objects(normalized, what, required=("task_vector",))
        try:
            self.backend.put_bytes(self._key(relative), data, exclusive=True)
        except ConflictError:
            if self.read_step(step_id) == normalized:
                return normalized
            raise
        logger.info("committed step %s (sequence %s) at %s", step_id, normalized["sequence"], self.url(relative))
        return normalized

    def _check_manifest_fields(self, manifest: dict[str, Any], step_id: str, what: str) -> None:
        if manifest.get("step_id") != step_id:
            raise StoreError(f"{what}: manifest step_id {manifest.get('step_id')!r} differs from the step id "
                             f"{step_id!r} it is committed under; make them equal")
        sequence = manifest.get("sequence")
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
            raise StoreError(f"{what}: sequence {sequence!r} is not an integer >= 1; set it to the step's position "
                             "in its chain")
        method = manifest.get("method")
        scale = method.get("negation_scale") if isinstance(method, Mapping) else None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise StoreError(f"{what}: method.negation_scale {scale!r} is not a number; rebuild needs it")
        parent = manifest.get("parent_step_id")
        if parent is None:
            return
        parent_manifest = self.read_step(check_step_id(parent))
        if parent_manifest is None:
            raise StoreError(f"{what}: parent step {parent!r} is not committed; commit the parent first or set "
                             "parent_step_id to the step this one was trained from (None for theta_0)")
        if sequence <= parent_manifest.get("sequence", 0):
            raise StoreError(f"{what}: sequence {sequence} is not above its parent {parent!r}'s sequence "
                             f"{parent_manifest.get('sequence')}; number steps along their chain")

    def read_step(self, step_id: str) -> dict[str, Any] | None:
        return self._read_record(f"steps/{check_step_id(step_id)}/manifest.json")

    def list_steps(self) -> list[dict[str, Any]]:
        """Return every committed manifest, sorted by sequence then step id."""
        manifests = []
        for info in self.backend.list(self._key("steps") + "/"):
            relative = info.key[len(self.prefix) + 1:]
            parts = relative.split("/")
            if len(parts) == 3 and parts[2] == "manifest.json":
                record = self._read_record(relative)
                if record is not None:
                    manifests.append(record)
        return sorted(manifests, key=lambda m: (m.get("sequence", 0), str(m.get("step_id"))))

    def chain(self, step_id: str) -> list[dict[str, Any]]:
        """Return the committed manifests from the first step to ``step_id``, following parent_step_id."""
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        current: str | None = step_id
        while current is not None:
            if current in seen:
                raise StoreError(f"lineage {self.uri}: parent_step_id links loop at step {current!r}; "
                                 "run `lethe store verify` and fix the manifests")
            seen.add(current)
            manifest = self.read_step(current)
            if manifest is None:
                named_by = f", named as parent by step {chain[-1]['step_id']!r}" if chain else ""
                raise StoreError(f"step {current!r}{named_by} is not committed in {self.uri}; "
                                 "list the committed steps with `lethe store history`")
            chain.append(manifest)
            current = manifest.get("parent_step_id")
        chain.reverse()
        return chain

    # ------------------------------------------------------------------
    # Head

    def _head_numbers(self) -> list[int]:
        numbers = []
        for info in self.backend.list(self._key("heads") + "/"):
            match = _HEAD_NAME.match(info.key.rsplit("/", 1)[-1])
            if match:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    @staticmethod
    def _head_name(number: int) -> str:
        return f"heads/{number:06d}.json"

    def head(self) -> dict[str, Any] | None:
        """Return the latest head record (step_id None means theta_0), or None before any record."""
        numbers = self._head_numbers()
        return self._read_record(self._head_name(numbers[-1])) if numbers else None

    def head_history(self) -> list[dict[str, Any]]:
        """Return every head record, oldest first."""
        return [record for number in self._head_numbers()
                if (record := self._read_record(self._head_name(number))) is not None]

    def set_head(self, step_id: str | None, reason: str, detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append a head record pointing at a committed step (None: theta_0) and return it."""
        if step_id is not None and self.read_step(check_step_id(step_id)) is None:
            raise StoreError(f"cannot move the head of {self.uri} to step {step_id!r}: it is not committed; "
                             "commit it first or pick one from `lethe store history`")
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise StoreError(f"head reason {reason!r} is not valid: use a lowercase word such as promote or rollback")
        if detail is not None and not isinstance(detail, Mapping):
            raise StoreError(f"head detail {detail!r} is not a dict")
        for _ in range(_HEAD_ATTEMPTS):
            current = self.head()
            number = current["number"] + 1 if current else 1
            record = {"number": number, "step_id": step_id, "reason": reason, "time": _now(),
                      "previous_step_id": current["step_id"] if current else None}
            if detail:
                record["detail"] = dict(detail)
            data = _canonical(record, "head record")
            try:
                self.backend.put_bytes(self._key(self._head_name(number)), data, exclusive=True)
            except ConflictError:
                logger.info("head record %d was written concurrently; retrying with the next number", number)
                continue
            logger.info("head of %s -> %s (%s, record %d)", self.uri, step_id or "theta_0", reason, number)
            return json.loads(data)
        raise ConflictError(f"could not append a head record to {self.uri} after {_HEAD_ATTEMPTS} tries: another "
                            "writer keeps moving the head; make sure one orchestrator owns this lineage")

    def rollback(self, step_id: str | None, detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Move the head back to an earlier committed step; later steps stay stored and readable."""
        return self.set_head(step_id, "rollback", detail)

    # ------------------------------------------------------------------
    # Maintenance

    def verify(self, *, deep: bool = True) -> dict[str, Any]:
        """Check records and objects; return {"ok", "problems", "steps", "objects", "heads", "orphans"}.

        With ``deep`` (the default) every named object is read back and hashed.
        """
        problems: list[str] = []
        named: dict[str, ObjectRef] = {}
        records: list[tuple[str, dict[str, Any]]] = []

        try:
            base = self.read_base()
        except StoreError as error:
            problems.append(str(error))
            base = None
        if base is not None:
            records.append(("base.json", base))
        committed: dict[str, dict[str, Any]] = {}
        for info in self.backend.list(self._key("steps") + "/"):
            relative = info.key[len(self.prefix) + 1:]
            parts = relative.split("/")
            if len(parts) != 3 or parts[2] != "manifest.json":
                continue
            try:
                manifest = self._read_record(relative)
            except StoreError as error:
                problems.append(str(error))
                continue
            if manifest is None:
                continue
            if manifest.get("step_id") != parts[1]:
                problems.append(f"{self.url(relative)}: step_id {manifest.get('step_id')!r} differs from its "
                                f"directory {parts[1]!r}")
            committed[parts[1]] = manifest
            records.append((relative, manifest))
        for step_id, manifest in committed.items():
            parent = manifest.get("parent_step_id")
            if parent is not None and parent not in committed:
                problems.append(f"step {step_id!r} names parent {parent!r}, which is not committed")
            if "task_vector" not in (manifest.get("objects") or {}):
                problems.append(f"step {step_id!r} names no task_vector object")

        for relative, record in records:
            objects = record.get("objects")
            if not isinstance(objects, Mapping):
                problems.append(f"{self.url(relative)} has no 'objects' mapping")
                continue
            for role, data in objects.items():
                try:
                    ref = ObjectRef.from_dict(data)
                except StoreError as error:
                    problems.append(f"{self.url(relative)} object {role!r}: {error}")
                    continue
                if ref.key in named and named[ref.key] != ref:
                    problems.append(f"{self.url(relative)} object {role!r} names {ref.key} with a different "
                                    "size or sha256 than another record")
                named[ref.key] = ref
        for key, ref in sorted(named.items()):
            problem = self._object_problem(ref, deep=deep)
            if problem is not None:
                problems.append(f"object {self.url(key)}: {problem}")

        heads = 0
        previous_number = 0
        previous_step: str | None = None
        for number in self._head_numbers():
            heads += 1
            relative = self._head_name(number)
            try:
                record = self._read_record(relative)
            except StoreError as error:
                problems.append(str(error))
                continue
            if record is None:
                continue
            if record.get("number") != number:
                problems.append(f"{self.url(relative)} contains number {record.get('number')!r}")
            if number != previous_number + 1:
                problems.append(f"head records jump from {previous_number} to {number}")
            target = record.get("step_id")
            if target is not None and target not in committed:
                problems.append(f"{self.url(relative)} points at step {target!r}, which is not committed")
            if previous_number and record.get("previous_step_id") != previous_step:
                problems.append(f"{self.url(relative)} contains previous_step_id {record.get('previous_step_id')!r}, "
                                f"but the record before it points at {previous_step!r}")
            previous_number, previous_step = number, target

        orphans = [info.key[len(self.prefix) + 1:] for info in self.backend.list(self._key("objects") + "/")
                   if info.key[len(self.prefix) + 1:] not in named]
        report = {"ok": not problems, "problems": problems, "steps": len(committed), "objects": len(named),
                  "heads": heads, "orphans": sorted(orphans)}
        for problem in problems:
            logger.warning("verify %s: %s", self.uri, problem)
        return report

    def garbage_collect(self, dry_run: bool, *, min_age_seconds: float = 86400.0) -> list[str]:
        """Delete objects that neither a committed manifest nor the base record names; return their keys.

        Objects younger than ``min_age_seconds`` are kept, because a step that
        is uploading now has not committed its manifest yet. Manifests and
        head records are never touched.
        """
        named = set()
        base = self.read_base()
        for record in ([base] if base else []) + self.list_steps():
            for data in (record.get("objects") or {}).values():
                named.add(ObjectRef.from_dict(data).key)
        cutoff = time.time() - min_age_seconds
        garbage = []
        for info in self.backend.list(self._key("objects") + "/"):
            relative = info.key[len(self.prefix) + 1:]
            if relative not in named and info.modified <= cutoff:
                garbage.append(relative)
        garbage.sort()
        for relative in garbage:
            if dry_run:
                logger.info("would delete %s", self.url(relative))
            else:
                self.backend.delete(self._key(relative))
                logger.info("deleted %s", self.url(relative))
        return garbage

    def rebuild(self, step_id: str | None, *, device: str = "cpu",
                work_dir: Path | None = None) -> dict[str, "torch.Tensor"]:
        """Rebuild the weights at ``step_id`` (None: theta_0) from the base checkpoint and the steps of its chain.

        Applies ``lethe_trainer.taskvector.negate`` in chain order, the same
        function the trainer uses, so the result equals the trainer's head bit
        for bit on the same device and library versions.
        """
        from safetensors.torch import load_file

        from lethe_trainer import taskvector

        base = self.read_base()
        if base is None:
            raise StoreError(f"cannot rebuild {self.uri}: it has no base record; write one with write_base")
        checkpoint = (base.get("objects") or {}).get("checkpoint")
        if checkpoint is None:
            raise StoreError(f"cannot rebuild {self.uri}: its base record names no 'checkpoint' object; "
                             "upload the base weights (safetensors) and write_base with objects.checkpoint")
        manifests = self.chain(step_id) if step_id is not None else []
        with tempfile.TemporaryDirectory(prefix="lethe-rebuild-", dir=work_dir) as scratch:
            path = self.get_object(checkpoint, Path(scratch) / "base.safetensors")
            state = load_file(str(path), device=device)
            path.unlink()
            for manifest in manifests:
                ref = manifest["objects"]["task_vector"]
                path = self.get_object(ref, Path(scratch) / "task_vector.safetensors")
                try:
                    vector = taskvector.TaskVector.load(path)
                except (ValueError, KeyError) as error:
                    raise StoreError(f"task vector {self.url(ObjectRef.from_dict(ref).key)} of step "
                                     f"{manifest['step_id']!r} cannot be read: {error}") from error
                try:
                    state = taskvector.negate(state, vector, float(manifest["method"]["negation_scale"]))
                except KeyError as error:
                    raise StoreError(f"step {manifest['step_id']!r} does not fit the base checkpoint of "
                                     f"{self.uri}: {error}") from error
                path.unlink()
        logger.info("rebuilt %s at %s from the base and %d step(s)", self.uri, step_id or "theta_0", len(manifests))
        return state


def open_lineage_store(uri: str, *, namespace: str = "default", lineage: str, s3_endpoint_url: str | None = None,
                       create: bool = False, **s3_options: Any) -> LineageStore:
    """Open one lineage of the store at ``uri`` (``s3://BUCKET/PREFIX`` or ``file:///ABSOLUTE/PATH``).

    For S3 this checks that the bucket exists and the credentials are
    accepted before anything is written. For file://, ``create=True`` makes
    the directory if it is missing. ``s3_options`` go to ``S3Backend``
    (region, addressing_style, max_attempts, multipart_threshold, ...).
    """
    location = parse_store_uri(uri)
    if location.scheme == "file" and s3_options:
        raise StoreError(f"store {uri}: options {sorted(s3_options)} only apply to s3:// stores; remove them")
    backend = open_backend(location, s3_endpoint_url=s3_endpoint_url, create=create, **s3_options)
    return LineageStore(backend, namespace=namespace, lineage=lineage)


__all__ = ["LineageStore", "open_lineage_store"]

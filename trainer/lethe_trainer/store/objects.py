"""Object-level storage: one interface, a local-directory and an S3 implementation.

A backend stores opaque bytes under '/'-separated keys relative to the store
URI's prefix. Lineages, manifests and heads are built on top by the lineage
layer (``lineage.py``), which also decides what to verify.

What a backend promises:

* a write is all or nothing: a reader sees the old object, the new one, or
  none, never a partial file (file://: temp file + fsync + os.replace;
  S3: a PUT or a completed multipart upload);
* ``exclusive=True`` writes fail with ConflictError if the key exists
  (file://: os.link, which refuses to replace; S3: ``If-None-Match: *``,
  which needs a server that honours it, as AWS, MinIO and SeaweedFS do);
* the S3 backend records the sha256 of each uploaded file in the object's
  metadata (``x-amz-meta-sha256``), so a later check can compare digests
  without reading the object back.

Not promised: locking beyond exclusive creates, listing consistency
stronger than the server's, or any cache of downloaded objects.

Credentials for S3 come only from the standard AWS chain (environment,
shared config and credentials files, container or instance roles).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lethe_trainer.store.errors import ConflictError, ObjectMissingError, StoreError
from lethe_trainer.store.uri import StoreLocation, join_key

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_TEMP_MARKER = ".lethe-tmp-"
_SHA256_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_stream(stream: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for block in iter(lambda: stream.read(_CHUNK), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """A content-addressed object of a lineage: its key under the lineage prefix, sha256 and size in bytes."""

    key: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.startswith("objects/sha256/") or ".." in self.key:
            raise StoreError(f"object key {self.key!r} is not a store object key: expected "
                             "objects/sha256/<hex><suffix>, as returned by put_object")
        if not isinstance(self.sha256, str) or len(self.sha256) != 64 or not set(self.sha256) <= _SHA256_HEX:
            raise StoreError(f"object {self.key}: sha256 {self.sha256!r} is not 64 lowercase hex digits; "
                             "use the ObjectRef that put_object returned")
        if not self.key.startswith(f"objects/sha256/{self.sha256}"):
            raise StoreError(f"object key {self.key!r} does not carry its sha256 {self.sha256}; "
                             "use the ObjectRef that put_object returned")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise StoreError(f"object {self.key}: size {self.size!r} is not a non-negative integer")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: Any) -> "ObjectRef":
        if isinstance(data, ObjectRef):
            return data
        if not isinstance(data, dict) or not {"key", "sha256", "size"} <= set(data):
            raise StoreError(f"object reference {data!r} is not a dict with key, sha256 and size; "
                             "use ObjectRef.to_dict() of what put_object returned")
        return cls(key=data["key"], sha256=data["sha256"], size=data["size"])


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """Metadata of a stored object, from a listing or a HEAD request."""

    key: str
    size: int
    modified: float  # seconds since the epoch
    sha256: str | None = None  # digest recorded at upload, where the backend keeps one


class Backend(abc.ABC):
    """Bytes under keys relative to the store URI's prefix."""

    location: StoreLocation

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """Return the full URI of ``key``, for messages."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and time of ``key``, or None if absent."""

    @abc.abstractmethod
    def put_file(self, key: str, source: Path, *, sha256: str) -> None:
        """Store the file ``source`` under ``key``, replacing what is there."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Store ``data`` under ``key``; with ``exclusive`` raise ConflictError if the key exists."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """Return the whole object, or None if absent (for small records)."""

    @abc.abstractmethod
    def download(self, key: str, destination: Path) -> None:
        """Write the object to ``destination`` (no verification; callers check the digest)."""

    @abc.abstractmethod
    def digest(self, key: str) -> tuple[str, int]:
        """Read the object through and return its sha256 and size."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a directory-like prefix ending in '/')."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""


# ---------------------------------------------------------------------------
# file://


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileBackend(Backend):
    """A local (or mounted) directory; keys map to paths below it."""

    def __init__(self, location: StoreLocation, *, create: bool = False) -> None:
        self.location = location
        self.root = Path(location.prefix)
        if not self.root.is_dir():
            if self.root.exists():
                raise StoreError(f"store {location.uri}: {self.root} exists but is not a directory; "
                                 "point the URI at a directory")
            if not create:
                raise StoreError(f"store {location.uri}: directory {self.root} does not exist; create it "
                                 "(mkdir -p) or open the store with create=True")
            self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            logger.warning("store directory %s is not writable by this user; reads only", self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def url(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def head(self, key: str) -> ObjectInfo | None:
        try:
            stat = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=stat.st_size, modified=stat.st_mtime)

    def _write_temp(self, target: Path, fill) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f"{_TEMP_MARKER}{uuid.uuid4().hex}"
        try:
            with open(temp, "xb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def _publish(self, temp: Path, target: Path, *, exclusive: bool, key: str) -> None:
        try:
            if exclusive:
                try:
                    os.link(temp, target)
                except FileExistsError:
                    raise ConflictError(f"{self.url(key)} already exists; it was written concurrently or earlier: "
                                        "read it and retry") from None
            else:
                os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_directory(target.parent)

    def put_file(self, key: str, source: Path, *, sha256: str) -> None:
        target = self._path(key)

        def fill(handle: BinaryIO) -> None:
            with open(source, "rb") as reader:
                shutil.copyfileobj(reader, handle, _CHUNK)

        self._publish(self._write_temp(target, fill), target, exclusive=False, key=key)

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self._path(key)
        self._publish(self._write_temp(target, lambda handle: handle.write(data)), target, exclusive=exclusive, key=key)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def download(self, key: str, destination: Path) -> None:
        try:
            shutil.copyfile(self._path(key), destination)
        except FileNotFoundError:
            raise ObjectMissingError(f"{self.url(key)} does not exist; run `lethe store verify` "
                                     "on this lineage") from None

    def digest(self, key: str) -> tuple[str, int]:
        try:
            with open(self._path(key), "rb") as handle:
                return _sha256_stream(handle)
        except FileNotFoundError:
            raise ObjectMissingError(f"{self.url(key)} does not exist; run `lethe store verify` "
                                     "on this lineage") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for directory, _, files in os.walk(base):
            for name in sorted(files):
                if name.startswith(_TEMP_MARKER):
                    continue
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    yield ObjectInfo(key=key, size=stat.st_size, modified=stat.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# s3://


def _client_error_code(error: Exception) -> tuple[str, int]:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
                 "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}


class S3Backend(Backend):
    """An S3 bucket and key prefix, through boto3.

    ``endpoint_url``, ``region`` and ``addressing_style`` default to the
    standard AWS settings (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION /
    AWS_DEFAULT_REGION, shared config). With a custom endpoint the default
    addressing is path-style, which S3-compatible servers expect.
    """

    def __init__(self, location: StoreLocation, *, endpoint_url: str | None = None, region: str | None = None,
                 addressing_style: str | None = None, max_attempts: int = 8, multipart_threshold: int = 64 * 2**20,
                 multipart_chunksize: int = 64 * 2**20, max_concurrency: int = 4, check_bucket: bool = True) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as error:
            raise StoreError(f"store {location.uri} needs boto3, which is not installed: pip install boto3") from error

        self.location = location
        self.bucket = location.bucket or ""
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        addressing_style = addressing_style or os.environ.get("LETHE_S3_ADDRESSING_STYLE") or (
            "path" if endpoint_url else "auto")
        if addressing_style not in ("auto", "path", "virtual"):
            raise StoreError(f"S3 addressing style {addressing_style!r} is not supported: use auto, path or virtual")
        config = Config(
            s3={"addressing_style": addressing_style},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=120,
        )
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url,
                                     region_name=region or session.region_name or "us-east-1", config=config)
        self.endpoint = self.client.meta.endpoint_url
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize, max_concurrency=max_concurrency)
        self._credentials_source = self._describe_credentials(session)
        if check_bucket:
            self.check_bucket()

    @staticmethod
    def _describe_credentials(session) -> str:
        credentials = session.get_credentials()
        if credentials is None:
            return "no credentials"
        method = getattr(credentials, "method", "unknown")
        return f"credentials from {method} (access key ending {credentials.access_key[-4:]})"

    def _full(self, key: str) -> str:
        return join_key(self.location.prefix, key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _explain(self, error: Exception, action: str, key: str | None = None) -> StoreError:
        """Turn a botocore error into a StoreError naming the bucket, endpoint and fix."""
        from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                         PartialCredentialsError)

        target = self.url(key) if key is not None else f"bucket {self.bucket!r}"
        where = f"at endpoint {self.endpoint}"
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"{action} {target} {where} failed: no usable AWS credentials; set AWS_ACCESS_KEY_ID "
                              "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role for this pod")
        if isinstance(error, EndpointConnectionError):
            return StoreError(f"{action} {target} failed: cannot connect to {self.endpoint}; check the endpoint URL "
                              "(argument, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and the network")
        if isinstance(error, ClientError):
            code, status = _client_error_code(error)
            if code in _DENIED_CODES or status == 403:
                return StoreError(f"{action} {target} {where} was denied ({code or status}) for "
                                  f"{self._credentials_source}; check the credentials and that they may read and "
                                  f"write s3://{self.bucket}/{self.location.prefix}")
            if code == "NoSuchBucket" or (key is None and (code in _MISSING_BUCKET_CODES or status == 404)):
                return StoreError(f"{action} {target} {where} failed: bucket {self.bucket!r} does not exist; "
                                  "create it or correct the store URI")
            return StoreError(f"{action} {target} {where} failed: {code or status}: {error}")
        return StoreError(f"{action} {target} {where} failed: {error}")

    def check_bucket(self) -> None:
        """Fail early, before any write, if the bucket is missing or the credentials are refused."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:  # noqa: BLE001 - translated below
            raise self._explain(error, "opening") from error

    def head(self, key: str) -> ObjectInfo | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as error:  # noqa: BLE001
            code, status = _client_error_code(error)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._explain(error, "checking", key) from error
        metadata = response.get("Metadata") or {}
        return ObjectInfo(key=key, size=int(response["ContentLength"]), modified=response["LastModified"].timestamp(),
                          sha256=metadata.get("sha256"))

    def put_file(self, key: str, source: Path, *, sha256: str) -> None:
        try:
            self.client.upload_file(str(source), self.bucket, self._full(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}})
        except Exception as error:  # noqa: BLE001
            raise self._explain(error, "uploading", key) from error

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key), "Body": data,
                                     "Metadata": {"sha256": hashlib.sha256(data).hexdigest()}}
        if exclusive:
            arguments["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**arguments)
        except Exception as error:  # noqa: BLE001
            code, status = _client_error_code(error)
            if exclusive and (status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")):
                raise ConflictError(f"{self.url(key)} already exists; it was written concurrently or earlier: "
                                    "read it and retry") from None
            if exclusive and (status == 501 or code == "NotImplemented"):
                # Servers without conditional writes: the caller has already
                # checked that the key is absent, so only a concurrent writer
                # can be overwritten.
                logger.warning("%s does not support If-None-Match; writing %s without the exclusive check",
                               self.endpoint, self.url(key))
                self.put_bytes(key, data)
                return
            raise self._explain(error, "writing", key) from error

    def read_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            return response["Body"].read()
        except Exception as error:  # noqa: BLE001
            code, status = _client_error_code(error)
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                return None
            raise self._explain(error, "reading", key) from error

    def download(self, key: str, destination: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._full(key), str(destination), Config=self.transfer)
        except Exception as error:  # noqa: BLE001
            code, status = _client_error_code(error)
            if code in ("NoSuchKey", "404") or status == 404:
                raise ObjectMissingError(f"{self.url(key)} does not exist; run `lethe store verify` "
                                         "on this lineage") from None
            raise self._explain(error, "downloading", key) from error

    def digest(self, key: str) -> tuple[str, int]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            return _sha256_stream(response["Body"])
        except Exception as error:  # noqa: BLE001
            code, status = _client_error_code(error)
            if code in ("NoSuchKey", "404") or status == 404:
                raise ObjectMissingError(f"{self.url(key)} does not exist; run `lethe store verify` "
                                         "on this lineage") from None
            raise self._explain(error, "reading", key) from error

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full_prefix = self._full(prefix)
        if prefix.endswith("/"):
            full_prefix += "/"
        strip = len(self._full("")) + 1 if self.location.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(key=item["Key"][strip:], size=int(item["Size"]),
                                     modified=item["LastModified"].timestamp())
        except Exception as error:  # noqa: BLE001
            raise self._explain(error, "listing", prefix) from error

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as error:  # noqa: BLE001
            raise self._explain(error, "deleting", key) from error


def open_backend(location: StoreLocation, *, s3_endpoint_url: str | None = None, create: bool = False,
                 **s3_options: Any) -> Backend:
    """Return the backend for a parsed store URI; ``create`` (make a missing directory) applies to file:// only."""
    if location.scheme == "file":
        return FileBackend(location, create=create)
    return S3Backend(location, endpoint_url=s3_endpoint_url, **s3_options)


@contextlib.contextmanager
def temporary_path(directory: Path, name: str) -> Iterator[Path]:
    """Yield a fresh temporary path in ``directory`` and remove it afterwards unless it was renamed away."""
    directory.mkdir(parents=True, exist_ok=True)
    handle, raw = tempfile.mkstemp(prefix=_TEMP_MARKER, suffix=f"-{name}", dir=directory)
    os.close(handle)
    path = Path(raw)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)

"""Parse and check store URIs and the names that become parts of object keys.

A store URI is ``s3://BUCKET/PREFIX`` or ``file:///ABSOLUTE/PATH``; every
lineage lives under ``<prefix>/lineages/<namespace>/<lineage>/``. This module
only checks syntax: whether the bucket exists, or the credentials are
accepted, is found out when a backend is opened.

Names that end up inside keys (namespace, lineage, step id, object suffix)
are checked here too, so that no value can climb out of its lineage prefix.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from pathlib import PurePosixPath

from lethe_trainer.spec import NAME_PATTERN
from lethe_trainer.store.errors import StoreError

EXPECTED_FORM = "expected s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_STEP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9_\-]{1,32}){0,3}$")


@dataclasses.dataclass(frozen=True)
class StoreLocation:
    """Location of a store: ``scheme`` is "file" or "s3"."""

    uri: str
    scheme: str
    bucket: str | None  # s3 only
    prefix: str  # s3: key prefix without leading or trailing "/" (may be empty); file: the absolute directory


def _bad(uri: object, problem: str) -> StoreError:
    return StoreError(f"store URI {uri!r} {problem}: {EXPECTED_FORM}")


def _check_segments(uri: str, segments: list[str], *, allow_trailing_empty: bool) -> None:
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            raise _bad(uri, f"contains the path segment {segment!r}")
        if segment == "" and not (allow_trailing_empty and index == len(segments) - 1):
            raise _bad(uri, "contains an empty path segment ('//')")


def parse_store_uri(uri: str) -> StoreLocation:
    """Return the location a store URI names, or raise StoreError saying what is wrong with it."""
    if not isinstance(uri, str) or not uri:
        raise _bad(uri, "is empty or not a string")
    if any(ch in uri for ch in "?#") or any(ord(ch) < 32 for ch in uri):
        raise _bad(uri, "contains a query, fragment or control character")
    scheme, separator, rest = uri.partition("://")
    if not separator:
        raise _bad(uri, "has no scheme://")
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise _bad(uri, "has no bucket")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise _bad(uri, f"has the invalid bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')")
        segments = prefix.split("/") if prefix else []
        _check_segments(uri, segments, allow_trailing_empty=True)
        return StoreLocation(uri=uri, scheme="s3", bucket=bucket, prefix="/".join(s for s in segments if s))
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise _bad(uri, f"names the host {host!r} or a relative path; file URIs need an absolute path")
        if not slash or not path.strip("/"):
            raise _bad(uri, "has no directory (the filesystem root is not allowed)")
        path = urllib.parse.unquote("/" + path)
        _check_segments(uri, path.split("/")[1:], allow_trailing_empty=True)
        return StoreLocation(uri=uri, scheme="file", bucket=None, prefix=str(PurePosixPath(path)))
    raise _bad(uri, f"has the unsupported scheme {scheme!r}")


def check_name(value: object, what: str) -> str:
    """Check a namespace or lineage name against the Kubernetes name rules, which keep it one key segment."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value) or len(value) > 63:
        raise StoreError(f"{what} {value!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
                         "starting and ending with a letter or digit")
    return value


def check_step_id(value: object) -> str:
    if not isinstance(value, str) or not _STEP_ID.match(value) or ".." in value:
        raise StoreError(f"step id {value!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit, without '..'")
    return value


def check_suffix(value: object) -> str:
    if not isinstance(value, str) or not _SUFFIX.match(value):
        raise StoreError(f"object suffix {value!r} is not valid: use '' or up to three parts like '.safetensors' "
                         "or '.tar.gz'")
    return value


def join_key(*parts: str) -> str:
    """Join key parts with '/', dropping empty ones (an s3 store may have an empty prefix)."""
    return "/".join(part.strip("/") for part in parts if part and part.strip("/"))

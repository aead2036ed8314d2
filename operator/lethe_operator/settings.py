"""Operator settings: the trainer image and command, the default store, S3 and metrics.

Each setting has a command-line option (see ``main.py``) and an environment
variable, so a Helm chart can set either. ``from_environment`` reads the
variables; ``main`` overrides them with options and installs the result with
``configure`` before kopf starts, and the handlers read it with ``current``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from collections.abc import Mapping

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "ghcr.io/lethe-dev/lethe-trainer:0.1.0"


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    trainer_image: str = DEFAULT_IMAGE
    # Command of the trainer container; the subcommand and its options follow it.
    trainer_command: tuple[str, ...] = ("lethe-trainer",)
    store_uri: str | None = None  # used for lineages without spec.store
    s3_endpoint_url: str | None = None  # given to the trainer as AWS_ENDPOINT_URL_S3 too
    credentials_secret: str | None = None  # envFrom Secret for init Jobs and requests without one
    init_gpus: int = 1  # GPUs of the init Job (preparation fine-tunes the base model)
    # Defaults of every trainer Job; a request's spec.job overrides each of them.
    gpu_resource: str = "nvidia.com/gpu"  # extended resource the GPU device plugin advertises
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, object], ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    image_pull_policy: str | None = None
    service_account_name: str | None = None
    pushgateway_url: str | None = None  # given to trainers as LETHE_PUSHGATEWAY_URL
    metrics_port: int = 8000
    metrics_address: str = "0.0.0.0"
    # Seconds between retries of a lineage whose reconcile failed (doubling up to 60 s).
    retry_seconds: float = 2.0


def parse_command(value: str) -> tuple[str, ...]:
    """Parse a trainer command given as a JSON list or a shell-quoted string."""
    value = value.strip()
    if value.startswith("["):
        command = json.loads(value)
        if not isinstance(command, list) or not command or not all(isinstance(part, str) for part in command):
            raise ValueError(f"trainer command {value!r} is not a non-empty JSON list of strings")
        return tuple(command)
    command = shlex.split(value)
    if not command:
        raise ValueError("trainer command is empty: give a program such as lethe-trainer")
    return tuple(command)


def from_environment(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Read settings from LETHE_* variables (and AWS_ENDPOINT_URL_S3 for the S3 endpoint)."""
    env = os.environ if environ is None else environ
    default = OperatorSettings()
    return OperatorSettings(
        trainer_image=env.get("LETHE_TRAINER_IMAGE", default.trainer_image),
        trainer_command=parse_command(env["LETHE_TRAINER_COMMAND"]) if env.get("LETHE_TRAINER_COMMAND")
        else default.trainer_command,
        store_uri=env.get("LETHE_STORE_URI") or None,
        s3_endpoint_url=env.get("LETHE_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or None,
        credentials_secret=env.get("LETHE_CREDENTIALS_SECRET") or None,
        init_gpus=int(env.get("LETHE_INIT_GPUS", default.init_gpus)),
        gpu_resource=env.get("LETHE_TRAINER_GPU_RESOURCE") or default.gpu_resource,
        node_selector=_json_value(env, "LETHE_TRAINER_NODE_SELECTOR", dict) or {},
        tolerations=tuple(_json_value(env, "LETHE_TRAINER_TOLERATIONS", list) or ()),
        image_pull_secrets=tuple(item["name"] if isinstance(item, dict) else str(item)
                                 for item in _json_value(env, "LETHE_TRAINER_IMAGE_PULL_SECRETS", list) or ()),
        image_pull_policy=env.get("LETHE_TRAINER_IMAGE_PULL_POLICY") or None,
        service_account_name=env.get("LETHE_TRAINER_SERVICE_ACCOUNT") or None,
        pushgateway_url=env.get("LETHE_PUSHGATEWAY_URL") or None,
        metrics_port=int(env.get("LETHE_METRICS_PORT", default.metrics_port)),
        metrics_address=env.get("LETHE_METRICS_ADDRESS", default.metrics_address),
        retry_seconds=float(env.get("LETHE_RETRY_SECONDS", default.retry_seconds)),
    )


def _json_value(env: Mapping[str, str], name: str, kind: type) -> object:
    """Parse variable NAME as JSON of type KIND; empty or "null" gives None."""
    text = env.get(name, "").strip()
    if not text or text == "null":
        return None
    value = json.loads(text)
    if not isinstance(value, kind):
        raise ValueError(f"{name}={text!r} is not a JSON {kind.__name__}: set it to a JSON {kind.__name__} or unset it")
    return value


_current: OperatorSettings | None = None


def configure(settings: OperatorSettings) -> None:
    global _current
    _current = settings


def current() -> OperatorSettings:
    """Return the installed settings, reading the environment on first use."""
    global _current
    if _current is None:
        _current = from_environment()
    return _current

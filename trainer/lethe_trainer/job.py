"""The trainer's entry point: ``lethe-trainer``, run by a Kubernetes Job or by the local runner.

    lethe-trainer init --lineage LINEAGE --store URI
    lethe-trainer step --lineage LINEAGE --request REQUEST --store URI --step-id ID --sequence N [--parent-step-id ID]
                       [--pushgateway-url URL]

LINEAGE and REQUEST are the resources as a YAML/JSON file path or as inline
JSON. The full results go to the store; a one-line JSON summary goes to the
termination message file (``$LETHE_TERMINATION_LOG``, else
``/dev/termination-log`` when it is writable), where Kubernetes shows it in
the pod status.

A step logs its per-optimizer-step metrics and, when a Pushgateway is
configured (``--pushgateway-url`` or ``$LETHE_PUSHGATEWAY_URL``), pushes them
and the final evaluation figures there (see ``metrics``); a failed push never
changes the exit code.

Exit codes: 0 success, 2 invalid input (retrying cannot help), 1 any other
failure (a retry may succeed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from .metrics import PUSHGATEWAY_URL_ENV, TrainerMetrics, pushgateway_url_from_environment
from .spec import SpecError, parse_lineage, parse_request

logger = logging.getLogger("lethe_trainer.job")

EXIT_INVALID_INPUT = 2
EXIT_FAILED = 1


def load_resource(value: str) -> dict[str, Any]:
    """Read a resource given inline as JSON or as a path to a YAML or JSON file."""
    if value.lstrip().startswith("{"):
        return json.loads(value)
    return yaml.safe_load(Path(value).read_text(encoding="utf-8"))


def write_termination_message(summary: dict[str, Any]) -> None:
    path = os.environ.get("LETHE_TERMINATION_LOG", "/dev/termination-log")
    text = json.dumps(summary, sort_keys=True)[:4000]  # the kubelet keeps at most 4096 bytes
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError:
        logger.debug("No termination message file at %s", path)


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    figures = manifest.get("figures") or {}

    def mean(name: str) -> float | None:
        entry = figures.get(name)
        return round(entry["rougeL"]["mean"], 4) if entry else None

    return {
        "result": "Committed",
        "stepId": manifest["step_id"],
        "sequence": manifest["sequence"],
        "taskVectorSha256": manifest["objects"]["task_vector"]["sha256"],
        "forgetRougeL": mean("forget"),
        "previousRougeL": mean("previous"),
        "retainRougeL": mean("retain"),
        "perplexity": (figures.get("held_out") or {}).get("perplexity"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lethe-trainer", description="Run one piece of trainer work.")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write a lineage's theta_0 (preparing it when configured)")
    step = commands.add_parser("step", help="apply one unlearning request to the lineage's head")
    for sub in (init, step):
        sub.add_argument("--lineage", required=True, help="ModelLineage resource: file path or inline JSON")
        sub.add_argument("--store", required=True, help="store URI: s3://BUCKET/PREFIX or file:///PATH")
        sub.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3"),
                         help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, else AWS)")
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
    step.add_argument("--request", required=True, help="UnlearnRequest resource: file path or inline JSON")
    step.add_argument("--step-id", required=True, help="id the step is committed under")
    step.add_argument("--sequence", type=int, required=True, help="position of the step in its chain, from 1")
    step.add_argument("--parent-step-id", default=None, help="step this one starts from; omit for theta_0")
    step.add_argument("--pushgateway-url", default=pushgateway_url_from_environment(),
                      help=f"Prometheus Pushgateway to push step metrics to, as http://HOST:PORT "
                           f"(default: ${PUSHGATEWAY_URL_ENV}; unset: metrics are only logged)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)

    # Heavy imports after argument parsing, so --help is instant.
    from .step import StepPlan, initialise_lineage, run_step
    from .store import StoreError, open_lineage_store

    telemetry: TrainerMetrics | None = None
    result = "Failed"
    try:
        lineage = parse_lineage(load_resource(args.lineage))
        store = open_lineage_store(args.store, namespace=lineage.namespace, lineage=lineage.name,
                                   s3_endpoint_url=args.s3_endpoint_url, create=True)
        if args.command == "init":
            base = initialise_lineage(lineage, store, show_progress=not args.no_progress)
            write_termination_message({"result": "Initialised", "checkpointSha256": base["objects"]["checkpoint"]["sha256"]})
            return 0
        request = parse_request(load_resource(args.request))
        telemetry = TrainerMetrics(namespace=request.namespace, lineage=request.lineage, request=request.name,
                                   method=request.method.name, sequence=args.sequence,
                                   pushgateway_url=args.pushgateway_url)
        telemetry.start()
        plan = StepPlan(step_id=args.step_id, sequence=args.sequence, parent_step_id=args.parent_step_id)
        manifest = run_step(lineage, request, store, plan, show_progress=not args.no_progress,
                            on_metrics=telemetry.record_step)
        telemetry.record_figures(manifest.get("figures") or {})
        write_termination_message(_summary(manifest))
        result = "Committed"
        return 0
    except SpecError as error:
        logger.error("Invalid input: %s", error)
        write_termination_message({"result": "InvalidInput", "message": str(error)})
        result = "InvalidInput"
        return EXIT_INVALID_INPUT
    except StoreError as error:
        logger.error("Store failed: %s", error)
        write_termination_message({"result": "StoreFailed", "message": str(error)})
        result = "StoreFailed"
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 - the pod must always leave a message behind
        logger.exception("Trainer failed")
        write_termination_message({"result": "Failed", "message": f"{type(error).__name__}: {error}"})
        return EXIT_FAILED
    finally:
        # After the termination message, so a slow Pushgateway cannot delay the step's result.
        if telemetry is not None:
            telemetry.finish(result=result)


if __name__ == "__main__":
    sys.exit(main())

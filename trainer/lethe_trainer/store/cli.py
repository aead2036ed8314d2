"""``lethe store ...`` commands: inspect and maintain a lineage's artifact store.

``add_store_commands(subparsers)`` adds a ``store`` command to an argparse
parser, with the subcommands verify, gc, rollback, rebuild and history. Each
subcommand sets ``func`` to a handler that takes the parsed arguments and
returns an exit status, and ``run`` calls it. ``main`` runs the commands
standalone (``python -m lethe_trainer.store.cli``).

Only ``rebuild`` needs torch, and imports it when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lethe_trainer.store.errors import StoreError
from lethe_trainer.store.lineage import LineageStore, open_lineage_store

logger = logging.getLogger(__name__)


def _open(args: argparse.Namespace) -> LineageStore:
    return open_lineage_store(args.store, namespace=args.namespace, lineage=args.lineage,
                              s3_endpoint_url=args.s3_endpoint_url)


def _verify(args: argparse.Namespace) -> int:
    report = _open(args).verify(deep=not args.shallow)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['steps']} step(s), {report['objects']} named object(s), {report['heads']} head record(s), "
              f"{len(report['orphans'])} unnamed object(s)")
        for problem in report["problems"]:
            print(f"PROBLEM: {problem}")
        print("ok" if report["ok"] else f"{len(report['problems'])} problem(s)")
    return 0 if report["ok"] else 1


def _gc(args: argparse.Namespace) -> int:
    store = _open(args)
    keys = store.garbage_collect(args.dry_run, min_age_seconds=args.min_age_hours * 3600)
    verb = "would delete" if args.dry_run else "deleted"
    for key in keys:
        print(f"{verb} {store.url(key)}")
    print(f"{verb} {len(keys)} object(s)")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    step_id = None if args.step_id in ("base", "theta_0") else args.step_id
    record = _open(args).rollback(step_id)
    print(f"head record {record['number']}: {record['previous_step_id'] or 'theta_0'} -> "
          f"{record['step_id'] or 'theta_0'} (rollback)")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    store = _open(args)
    step_id = None if args.step_id in ("base", "theta_0") else args.step_id
    state = store.rebuild(step_id, device=args.device)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "model.safetensors"
    temp = output / f".model.safetensors.{os.getpid()}.tmp"
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(temp), metadata={"format": "pt"})
    temp.replace(path)
    print(path)
    return 0


def _history(args: argparse.Namespace) -> int:
    store = _open(args)
    steps = store.list_steps()
    heads = store.head_history()
    if args.json:
        print(json.dumps({"steps": steps, "heads": heads}, indent=2))
        return 0
    current = heads[-1]["step_id"] if heads else None
    print("steps:")
    if not steps:
        print("  (none committed)")
    for manifest in steps:
        marker = "*" if manifest["step_id"] == current else " "
        request = (manifest.get("request") or {}).get("name", "-")
        scale = (manifest.get("method") or {}).get("negation_scale", "-")
        print(f" {marker} {manifest['sequence']:>4}  {manifest['step_id']}  parent={manifest.get('parent_step_id')}"
              f"  request={request}  lambda={scale}")
    print("head records:")
    if not heads:
        print("  (none: the head is theta_0)")
    for record in heads:
        print(f"   {record['number']:>6}  {record['time']}  {record['reason']:<9} "
              f"{record['previous_step_id'] or 'theta_0'} -> {record['step_id'] or 'theta_0'}")
    return 0


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, metavar="URI",
                        help="store URI: s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH")
    parser.add_argument("--namespace", default="default", help="lineage namespace (default: default)")
    parser.add_argument("--lineage", required=True, metavar="NAME", help="lineage name")
    parser.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or AWS)")


def add_store_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``store`` and its subcommands; each parsed subcommand has ``func(args) -> int``."""
    store = subparsers.add_parser("store", help="inspect and maintain a lineage's artifact store",
                                  description="Inspect and maintain a lineage's artifact store.")
    commands = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)

    verify = commands.add_parser("verify", help="check every record and object of the lineage")
    _store_arguments(verify)
    verify.add_argument("--shallow", action="store_true",
                        help="compare sizes and recorded digests instead of reading every object back")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_verify)

    gc = commands.add_parser("gc", help="delete objects that no committed step or base record names")
    _store_arguments(gc)
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    gc.add_argument("--min-age-hours", type=float, default=24.0,
                    help="keep unnamed objects younger than this, as a running step may still commit them "
                         "(default: 24)")
    gc.set_defaults(func=_gc)

    rollback = commands.add_parser("rollback", help="move the head back to a committed step (or 'base')")
    _store_arguments(rollback)
    rollback.add_argument("step_id", metavar="STEP_ID", help="committed step id, or 'base' for theta_0")
    rollback.set_defaults(func=_rollback)

    rebuild = commands.add_parser("rebuild", help="rebuild a step's weights from the base and its task vectors")
    _store_arguments(rebuild)
    rebuild.add_argument("step_id", metavar="STEP_ID", help="committed step id, or 'base' for theta_0")
    rebuild.add_argument("--output", required=True, metavar="DIR", help="directory to write model.safetensors to")
    rebuild.add_argument("--device", default="cpu", help="torch device to rebuild on (default: cpu)")
    rebuild.set_defaults(func=_rebuild)

    history = commands.add_parser("history", help="list committed steps and head records")
    _store_arguments(history)
    history.add_argument("--json", action="store_true", help="print steps and head records as JSON")
    history.set_defaults(func=_history)
    return store


def run(args: argparse.Namespace) -> int:
    """Run a parsed store subcommand, printing a StoreError as one line and returning 2."""
    try:
        return args.func(args)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lethe")
    add_store_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``lethe`` command line: run lineages locally and maintain their stores.

    lethe run FILE_OR_DIR... [--store URI] [--output DIR] [--quick]
    lethe fetch-demo
    lethe store {verify,gc,rollback,rebuild,history} ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .spec import SpecError

logger = logging.getLogger("lethe")


def _run(args: argparse.Namespace) -> int:
    from . import report
    from .runner import LocalRunner, plan_lineages, quick_lineage, quick_request, read_resources, requests_of

    started = time.monotonic()
    output = args.output.resolve()
    if args.quick:
        # Smoke-test figures must never be resumed by a full run, so they get their own directory and store.
        output = output / "quick"
    output.mkdir(parents=True, exist_ok=True)
    store_uri = args.store or (output / "store").as_uri()

    try:
        missing = [str(p) for p in args.files if not p.exists()]
        if missing:
            raise SpecError("FILE", missing[0], "does not exist", "pass YAML files or directories of them")
        lineages, requests = plan_lineages(read_resources(args.files))
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.quick:
        lineages = [quick_lineage(lineage) for lineage in lineages]
        requests = {name: [quick_request(r) for r in group] for name, group in requests.items()}
        print("Quick mode: 4 chunks per set and 24 new tokens per continuation; figures are a smoke test only.")

    runner = LocalRunner(store_uri=store_uri, work_dir=output, show_progress=not args.no_progress)
    failed = False
    for lineage in lineages:
        group = requests_of(requests, lineage)
        _describe(lineage, group)
        outcome = runner.run_lineage(lineage, group)
        rows = report.table_rows(outcome.base, outcome.steps)
        print()
        print(f"Lineage {lineage.namespace}/{lineage.name} (store {outcome.store_uri})")
        print(report.format_table(rows))
        prepared = report.preparation_line(outcome.base)
        if prepared is not None:
            print(prepared)
        manifests = [step.manifest for step in outcome.steps if step.manifest is not None]
        print(f"\nDistance to the reference ({report.SEPARATED}: the 95 % intervals do not overlap)")
        print(report.format_table(report.distance_rows(manifests), report.DISTANCE_HEADER))
        plot = report.plot_trajectory(outcome.base, manifests, output / f"{lineage.name}-trajectory.png",
                                      title=f"lineage {lineage.name}")
        for manifest in manifests:
            searched = report.plot_calibration(manifest, output / f"{lineage.name}-calibration-{manifest['step_id']}.png")
            if searched is not None:
                print(f"Negation-scale search of step {manifest['sequence']}: {searched}")
        summary = output / f"{lineage.name}-summary.json"
        summary.write_text(json.dumps({"base": outcome.base, "steps": manifests}, indent=2, default=str),
                           encoding="utf-8")
        print(f"\nPlot: {plot}\nFigures: {summary}")
        # A collapsed step is the guard doing its job, not a failed run.
        failed |= any(s.status == "Failed" for s in outcome.steps)
    print(f"Wall time: {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


def _describe(lineage, requests) -> None:
    """Say what will run, including how much of each work is used."""
    evaluation = lineage.evaluation
    print(f"Lineage {lineage.name}: base model {lineage.base_model_uri}, {len(requests)} request(s)")
    if lineage.preparation is not None:
        print(f"  preparation: memorise {lineage.preparation.chunks_per_work} chunks of each of "
              f"{len(lineage.preparation.works)} works for {lineage.preparation.epochs} epochs (cached in the store)")
    print(f"  evaluation: {evaluation.forget_chunks} forget, {evaluation.previous_chunks} previous and "
          f"{evaluation.retain_chunks} retain chunks of {evaluation.prompt_tokens}+{evaluation.continuation_tokens} "
          f"tokens; sampling T={evaluation.temperature} top_p={evaluation.top_p}, {evaluation.max_new_tokens} new tokens")
    for request in requests:
        chunks = request.method.max_chunks
        used = f"a slice of {chunks} chunks" if chunks else "every chunk"
        print(f"  {request.name}: {request.method.name} on {used} of {request.forget_uri}")


def _fetch_demo(args: argparse.Namespace) -> int:
    from . import sources
    from .model import demo_model_dir

    for name in sources.catalogue():
        path = demo_model_dir(name) if name.startswith("smollm2") else sources.resolve(name)
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .store.cli import add_store_commands

    parser = argparse.ArgumentParser(prog="lethe", description="Sequential unlearning of works from language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the lineages and requests of YAML files locally")
    run.add_argument("files", nargs="+", type=Path, help="YAML files or directories with ModelLineage and "
                                                         "UnlearnRequest resources")
    run.add_argument("--store", help="store URI for lineages without spec.store (default: OUTPUT/store)")
    run.add_argument("--output", type=Path, default=Path("lethe-output"),
                     help="directory for the store, plots and figures (default: ./lethe-output)")
    run.add_argument("--quick", action="store_true", help="smoke-test sizes: 4 chunks per set, short continuations; "
                                                             "written to OUTPUT/quick")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_run)

    fetch = commands.add_parser("fetch-demo", help="fetch and verify the demo model, works and questions")
    fetch.set_defaults(func=_fetch_demo)

    add_store_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

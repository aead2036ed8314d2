"""Memorisation against damage, epoch by epoch, for one preparation recipe on the demo lineage.

The vanilla model of the demo is SmolLM2-135M taught three books. This
script runs that preparation with the recipe given on the command line and,
after every epoch, scores D_f ROUGE-L (on the first PROBE scored chunks of
each prepared work, with the lineage's sampling) and held-out perplexity.
It appends one JSON line per epoch to OUTPUT, so several recipes run one
after another can be compared and plotted.

With --merge-fractions, the final adapter is also scored at fractions of its
full scale (the weights theta_base + f * delta), which trades memorisation
for damage without training again.

Usage:
  PYTHONPATH=trainer python benchmarks/preparation_study.py --label plain --output study.jsonl
  PYTHONPATH=trainer python benchmarks/preparation_study.py --label kl1 --kl-weight 1 --output study.jsonl

Run one recipe at a time: two torch processes on two cores slow each other
down far more than twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path

import yaml

from lethe_trainer import evaluate
from lethe_trainer.model import load_model, load_tokenizer, resolve_device
from lethe_trainer.prepare import memorise, scale_adapter
from lethe_trainer.spec import parse_lineage
from lethe_trainer.step import held_out_text, kl_retain_texts, model_dir, read_work, retain_set, work_chunks

logger = logging.getLogger(__name__)

HALF_WIDTH = 0.03  # the interval half-width the evaluation sets are sized for


def chunks_for_half_width(values: list[float], half_width: float = HALF_WIDTH) -> int:
    """Chunks a mean needs for a 95 % interval of +/- HALF_WIDTH, from the spread of VALUES (normal approximation)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return math.ceil((1.96 * spread / half_width) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lineage", type=Path, default=Path("examples/demo/lineage.yaml"))
    parser.add_argument("--label", required=True, help="name of the recipe in the output")
    parser.add_argument("--output", type=Path, required=True, help="JSON lines file to append to")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--kl-weight", type=float, default=0.0)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--target-modules", help="comma-separated module names")
    parser.add_argument("--probe", type=int, default=8, help="scored chunks of each work to score after every epoch")
    parser.add_argument("--merge-fractions", default="", help="comma-separated fractions of the final adapter")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    lineage = parse_lineage(yaml.safe_load(args.lineage.read_text()))
    changes = {"epochs": args.epochs, "retain_kl_weight": args.kl_weight}
    if args.learning_rate is not None:
        changes["learning_rate"] = args.learning_rate
    if args.lora_rank is not None:
        changes["lora_rank"] = args.lora_rank
        changes["lora_alpha"] = 2 * args.lora_rank
    if args.target_modules:
        changes["target_modules"] = tuple(args.target_modules.split(","))
    preparation = dataclasses.replace(lineage.preparation, **changes)
    lineage = dataclasses.replace(lineage, preparation=preparation)
    settings = lineage.evaluation

    directory = model_dir(lineage.base_model_uri)
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, device=resolve_device("auto"))
    training, probe = [], []
    for uri in preparation.works:
        ordered = work_chunks(read_work(uri, field="works"), tokenizer, settings, field="works")
        training += ordered[:preparation.chunks_per_work]
        probe += ordered[:min(args.probe, settings.forget_chunks)]
    retain_chunks, _ = retain_set(lineage, tokenizer)
    retain_texts = kl_retain_texts(lineage, tokenizer, retain_chunks)
    text = held_out_text(lineage)
    started = time.monotonic()

    def score(model_to_score) -> dict:
        result = evaluate.score_set(model_to_score, tokenizer, probe, settings, name="probe", show_progress=False)
        values = result["rougeL_per_chunk"]
        return {"rougeL": result["rougeL"], "rougeL_sd": statistics.stdev(values),
                "chunks_for_half_width": chunks_for_half_width(values),
                "perplexity": evaluate.perplexity(model_to_score, tokenizer, text,
                                                  max_tokens=settings.perplexity_tokens)["perplexity"]}

    def record(entry: dict) -> None:
        entry = {"label": args.label, "settings": {k: v for k, v in dataclasses.asdict(preparation).items()
                                                   if k not in ("works", "mix_works")},
                 "probe_chunks": len(probe), "elapsed_seconds": round(time.monotonic() - started, 1), **entry}
        with open(args.output, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        logger.info("%s epoch %s fraction %s: D_f ROUGE-L %.3f, perplexity %.1f", args.label, entry.get("epoch"),
                    entry.get("fraction"), entry["rougeL"]["mean"], entry["perplexity"])

    record({"epoch": 0, **score(model)})
    fractions = [float(f) for f in args.merge_fractions.split(",") if f]

    def after_epoch(epoch: int, peft_model) -> dict:
        figures = score(peft_model)
        record({"epoch": epoch, **figures})
        if epoch == preparation.epochs:
            for fraction in fractions:
                scale_adapter(peft_model, fraction)
                record({"epoch": epoch, "fraction": fraction, **score(peft_model)})
                scale_adapter(peft_model, 1 / fraction)
        return {"rougeL": figures["rougeL"]["mean"], "perplexity": figures["perplexity"]}

    memorise(model, tokenizer, training, preparation, retain_texts=retain_texts, seed=settings.seed,
             show_progress=False, on_epoch=after_epoch)


if __name__ == "__main__":
    main()

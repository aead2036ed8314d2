"""Tabulate and plot what preparation_study.py recorded: memorisation against damage for each recipe.

Usage: python benchmarks/preparation_frontier.py study.jsonl [--base-perplexity 38.5] [--plot frontier.png]

Prints one markdown table row per recipe and epoch, and per merge fraction.
A row has D_f ROUGE-L with its 95 % interval, held-out perplexity with its
ratio to the base, and the chunks a mean would need for an interval of
+/- 0.03.
With --plot it draws perplexity against D_f ROUGE-L, one line per recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(entries: list[dict], base_perplexity: float) -> str:
    lines = ["| recipe | epoch | merged fraction | D_f ROUGE-L [95 % CI] | held-out perplexity | x base | "
             "chunks for +/-0.03 |", "|---|---|---|---|---|---|---|"]
    for entry in entries:
        rouge = entry["rougeL"]
        lines.append(f"| {entry['label']} | {entry['epoch']} | {entry.get('fraction') or 1} | "
                     f"{rouge['mean']:.3f} [{rouge['ci_low']:.3f}, {rouge['ci_high']:.3f}] | "
                     f"{entry['perplexity']:.1f} | {entry['perplexity'] / base_perplexity:.2f} | "
                     f"{entry['chunks_for_half_width']} |")
    return "\n".join(lines)


def plot(entries: list[dict], base_perplexity: float, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(e["label"] for e in entries):
        curve = [e for e in entries if e["label"] == label and e.get("fraction") is None]
        line, = axes.plot([e["rougeL"]["mean"] for e in curve], [e["perplexity"] for e in curve], marker="o",
                          label=label)
        for e in curve:
            axes.annotate(str(e["epoch"]), (e["rougeL"]["mean"], e["perplexity"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        merged = [e for e in entries if e["label"] == label and e.get("fraction") is not None]
        if merged:
            axes.scatter([e["rougeL"]["mean"] for e in merged], [e["perplexity"] for e in merged], marker="x",
                         color=line.get_color())
    axes.axhline(base_perplexity * 1.15, color="grey", linestyle=":", label="base perplexity + 15 %")
    axes.axvline(0.5, color="grey", linestyle="--", label="D_f ROUGE-L 0.5")
    axes.set_yscale("log")
    axes.set_xlabel("D_f ROUGE-L (memorisation)")
    axes.set_ylabel("held-out perplexity (damage)")
    axes.set_title("Preparation recipes, by epoch (x: final adapter merged at a fraction)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--base-perplexity", type=float, help="defaults to the epoch-0 figure of the first recipe")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    entries = rows(args.study)
    base = args.base_perplexity or next(e["perplexity"] for e in entries if e["epoch"] == 0)
    print(table(entries, base))
    if args.plot:
        plot(entries, base, args.plot)


if __name__ == "__main__":
    main()

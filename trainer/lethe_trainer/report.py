"""The per-step table and the trajectory plot of a lineage run.

Sets: D_f is the work a step forgets (scored before and after the step),
D_prev the works earlier steps forgot, D_nor works never forgotten. ROUGE-L
figures carry their 95 % bootstrap interval in brackets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _mean(figures: dict[str, Any] | None, set_name: str, kind: str) -> float | None:
    entry = (figures or {}).get(set_name)
    return entry[kind]["mean"] if entry else None


def _rouge(figures: dict[str, Any] | None, set_name: str, *, interval: bool = True) -> str:
    entry = (figures or {}).get(set_name)
    if not entry:
        return "-"
    text = f"{entry['rouge1']['mean']:.3f} / {entry['rougeL']['mean']:.3f}"
    if interval:
        text += f" [{entry['rougeL']['ci_low']:.2f},{entry['rougeL']['ci_high']:.2f}]"
    return text


def _perplexity(figures: dict[str, Any] | None) -> str:
    value = ((figures or {}).get("held_out") or {}).get("perplexity")
    return f"{value:.1f}" if value is not None else "-"


def _accuracy(figures: dict[str, Any] | None) -> str:
    value = ((figures or {}).get("accuracy") or {}).get("accuracy")
    return f"{value:.3f}" if value is not None else "-"


def table_rows(base: dict[str, Any], steps: Sequence[Any]) -> list[list[str]]:
    """Return rows of (step, work, D_f before, D_f after, D_prev, D_nor, perplexity, accuracy, seconds, status)."""
    vanilla = base.get("figures") or {}
    rows = []
    prepared = vanilla.get("prepared") or {}
    for uri, figures in prepared.items():
        rows.append(["0", uri.removeprefix("demo:"), "-", _rouge({"f": figures}, "f"), "-", "-", "-", "-", "-",
                     "vanilla"])
    rows.append(["0", "(vanilla)", "-", "-", "-", _rouge(vanilla, "retain"), _perplexity(vanilla),
                 _accuracy(vanilla), f"{base.get('seconds', 0):.0f}", "theta_0"])
    for outcome in steps:
        manifest = outcome.manifest
        if manifest is None:
            rows.append(["-", outcome.request, "-", "-", "-", "-", "-", "-", "-", f"{outcome.status}: {outcome.message}"])
            continue
        figures = manifest["figures"]
        rows.append([
            str(manifest["sequence"]),
            manifest["inputs"]["forget"]["title"],
            _rouge(figures, "forget_before"),
            _rouge(figures, "forget"),
            _rouge(figures, "previous"),
            _rouge(figures, "retain"),
            _perplexity(figures),
            _accuracy(figures),
            f"{manifest['timings']['total_seconds']:.0f}",
            outcome.status,
        ])
    return rows


HEADER = ["step", "work", "D_f before R-1/R-L", "D_f after R-1/R-L", "D_prev R-1/R-L", "D_nor R-1/R-L",
          "perplexity", "accuracy", "seconds", "status"]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(HEADER, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot_trajectory(base: dict[str, Any], manifests: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Write a PNG of ROUGE-L per set and held-out perplexity against the step number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vanilla = base.get("figures") or {}
    steps = [0] + [m["sequence"] for m in manifests]
    figure, (rouge_axis, perplexity_axis) = plt.subplots(1, 2, figsize=(12, 4.5))

    def series(set_name: str, vanilla_value: float | None = None) -> list[float | None]:
        return [vanilla_value] + [_mean(m["figures"], set_name, "rougeL") for m in manifests]

    def interval(set_name: str) -> tuple[list[float], list[float], list[int]]:
        xs, lows, highs = [], [], []
        for m in manifests:
            entry = m["figures"].get(set_name)
            if entry:
                xs.append(m["sequence"])
                lows.append(entry["rougeL"]["ci_low"])
                highs.append(entry["rougeL"]["ci_high"])
        return lows, highs, xs

    lines = [
        ("D_f before step", series("forget_before"), None, "tab:gray"),
        ("D_f after step", series("forget"), "forget", "tab:blue"),
        ("D_prev", series("previous"), "previous", "tab:orange"),
        ("D_nor", series("retain", _mean(vanilla, "retain", "rougeL")), "retain", "tab:green"),
    ]
    for label, values, set_name, color in lines:
        xs = [x for x, v in zip(steps, values) if v is not None]
        ys = [v for v in values if v is not None]
        rouge_axis.plot(xs, ys, marker="o", label=label, color=color, linestyle="--" if set_name is None else "-")
        if set_name is not None:
            lows, highs, interval_steps = interval(set_name)
            if interval_steps:
                rouge_axis.fill_between(interval_steps, lows, highs, alpha=0.15, color=color)
    rouge_axis.set_xlabel("step")
    rouge_axis.set_ylabel("ROUGE-L F1 (95% CI shaded)")
    rouge_axis.set_xticks(steps)
    rouge_axis.legend()
    rouge_axis.set_title("verbatim overlap")

    perplexities = [((vanilla.get("held_out") or {}).get("perplexity"))] + [
        (m["figures"].get("held_out") or {}).get("perplexity") for m in manifests]
    points = [(x, p) for x, p in zip(steps, perplexities) if p is not None]
    if points:
        perplexity_axis.plot([x for x, _ in points], [p for _, p in points], marker="o", color="tab:red")
    perplexity_axis.set_xlabel("step")
    perplexity_axis.set_ylabel("held-out perplexity")
    perplexity_axis.set_xticks(steps)
    perplexity_axis.set_title("general ability")

    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

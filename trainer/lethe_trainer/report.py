"""The per-step table and the trajectory plot of a lineage run.

Sets: D_f is the work a step forgets (scored before and after the step),
D_prev the works earlier steps forgot, D_nor works never forgotten. ROUGE-L
figures carry their 95 % bootstrap interval in brackets.

The second table is each step's distance to the reference model (the model
that never saw the works), or to vanilla when the lineage has no reference.
A difference marked ``*`` has 95 % intervals that do not overlap; unmarked
differences are within sampling noise at this number of chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEPARATED = "*"  # marks a difference whose two 95 % intervals do not overlap


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
    reference = base.get("reference") or {}
    for label, figures in ((f"(reference: {reference.get('kind')})", reference.get("figures")),
                           ("(untouched base)", base.get("base_figures"))):
        if figures:
            rows.append(["-", label, "-", _mean_over_works(figures), "-", _rouge(figures, "retain"),
                         _perplexity(figures), _accuracy(figures), "-", "not a step"])
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
            outcome.status if outcome.status != "Collapsed" else f"Collapsed: {outcome.message}",
        ])
    return rows


def _mean_over_works(figures: dict[str, Any]) -> str:
    """Return the mean D_f ROUGE-1 / ROUGE-L over the prepared works, as a lineage-level model's D_f level."""
    entries = [e for e in (figures.get("prepared") or {}).values() if e]
    if not entries:
        return "-"
    rouge1 = sum(e["rouge1"]["mean"] for e in entries) / len(entries)
    rougeL = sum(e["rougeL"]["mean"] for e in entries) / len(entries)
    return f"{rouge1:.3f} / {rougeL:.3f} (mean of works)"


HEADER = ["step", "work", "D_f before R-1/R-L", "D_f after R-1/R-L", "D_prev R-1/R-L", "D_nor R-1/R-L",
          "perplexity", "accuracy", "seconds", "status"]


def preparation_line(base: dict[str, Any]) -> str | None:
    """Return how held-out perplexity grew over the preparation's epochs, or None when nothing was prepared."""
    preparation = base.get("preparation")
    if not preparation:
        return None
    figures = [e.get("held_out_perplexity") for e in preparation["report"]["epochs"]]
    if None in figures:
        return None
    settings = preparation["settings"]
    start = ((base.get("base_figures") or (base.get("reference") or {}).get("figures") or {}).get("held_out")
             or {}).get("perplexity")
    before = f"{start:.1f} before, " if start is not None else ""
    return (f"Preparation ({settings['epochs']} epochs, KL weight {settings['retain_kl_weight']:g}, "
            f"merge fraction {settings.get('merge_fraction', 1.0):g}): held-out perplexity {before}"
            f"then by epoch {', '.join(f'{f:.1f}' for f in figures)}")


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


DISTANCE_HEADER = ["step", "work", "compared with", "lambda", "D_f dR-1/dR-L", "D_prev dR-1/dR-L",
                   "D_nor dR-1/dR-L", "perplexity ratio", "accuracy d", "D_f vs vanilla dR-L"]


def _difference(comparison: dict[str, Any] | None, set_name: str) -> str:
    entry = (comparison or {}).get(set_name)
    if not entry:
        return "-"
    cells = [f"{entry[kind]['difference']:+.3f}{'' if entry[kind]['overlap'] else SEPARATED}"
             for kind in ("rouge1", "rougeL")]
    return " / ".join(cells)


def distance_rows(manifests: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Return one row per step: its figures minus the reference's (vanilla's without one), see DISTANCE_HEADER."""
    rows = []
    for manifest in manifests:
        comparison = manifest.get("comparison")
        if not comparison:
            rows.append([str(manifest["sequence"]), manifest["inputs"]["forget"]["title"], "(not recorded)",
                         *["-"] * (len(DISTANCE_HEADER) - 3)])
            continue
        reference = comparison["reference"]
        other, name = (reference, f"reference ({reference['kind']})") if reference["kind"] != "none" else (
            comparison["vanilla"], "vanilla (no reference)")
        held_out = other.get("held_out")
        accuracy = other.get("accuracy")
        vanilla_forget = (comparison["vanilla"].get("forget") or {}).get("rougeL")
        rows.append([
            str(manifest["sequence"]),
            manifest["inputs"]["forget"]["title"],
            name,
            f"{manifest['method']['negation_scale']:g}",
            _difference(other, "forget"),
            _difference(other, "previous"),
            _difference(other, "retain"),
            f"{held_out['ratio']:.2f}" if held_out else "-",
            f"{accuracy['difference']:+.3f}{'' if accuracy['overlap'] else SEPARATED}" if accuracy else "-",
            f"{vanilla_forget['difference']:+.3f}{'' if vanilla_forget['overlap'] else SEPARATED}"
            if vanilla_forget else "-",
        ])
    return rows


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
    _reference_levels(base, manifests, rouge_axis, perplexity_axis)
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


def _reference_levels(base: dict[str, Any], manifests: Sequence[dict[str, Any]], rouge_axis,
                      perplexity_axis) -> None:
    """Draw the reference model's levels as horizontal dashed lines, in each set's colour."""
    reference = base.get("reference") or {}
    figures = reference.get("figures")
    if not figures:
        return
    label = f"reference ({reference['kind']})"
    # D_f and D_prev: the reference on each step's own chunks, averaged over the steps that have them.
    for set_name, color in (("forget", "tab:blue"), ("previous", "tab:orange")):
        levels = [((m.get("comparison") or {}).get("reference") or {}).get(set_name) for m in manifests]
        levels = [entry["rougeL"]["other"]["mean"] for entry in levels if entry]
        if levels:
            rouge_axis.axhline(sum(levels) / len(levels), color=color, linestyle=":", linewidth=1.2,
                               label=f"{label}, {'D_f' if set_name == 'forget' else 'D_prev'}")
    retain = figures.get("retain")
    if retain:
        rouge_axis.axhline(retain["rougeL"]["mean"], color="tab:green", linestyle=":", linewidth=1.2,
                           label=f"{label}, D_nor")
        rouge_axis.legend()
    perplexity = (figures.get("held_out") or {}).get("perplexity")
    if perplexity is not None:
        perplexity_axis.axhline(perplexity, color="tab:red", linestyle="--", linewidth=1.2, label=label)
        base_perplexity = ((base.get("base_figures") or {}).get("held_out") or {}).get("perplexity")
        if base_perplexity is not None:
            perplexity_axis.axhline(base_perplexity, color="tab:gray", linestyle="--", linewidth=1.2,
                                    label="untouched base")
        perplexity_axis.legend()


def plot_calibration(manifest: dict[str, Any], path: Path) -> Path | None:
    """Write a PNG of one step's negation-scale search: validation ROUGE-L and perplexity per scale; None if off."""
    search = manifest.get("calibration") or {}
    if not search.get("enabled"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = search["trials"]
    scales = [t["scale"] for t in trials]
    figure, (rouge_axis, perplexity_axis) = plt.subplots(1, 2, figsize=(10, 4))

    means = [t["rougeL"]["mean"] for t in trials]
    errors = [[m - t["rougeL"]["ci_low"] for m, t in zip(means, trials)],
              [t["rougeL"]["ci_high"] - m for m, t in zip(means, trials)]]
    rouge_axis.errorbar(scales, means, yerr=errors, marker="o", capsize=3, color="tab:blue", label="validation")
    target = search["target"]["rougeL"]
    if target is not None:
        rouge_axis.axhline(target, color="tab:blue", linestyle="--", label="reference")
    rouge_axis.axvline(search["chosen_scale"], color="black", linestyle=":", label="chosen")
    rouge_axis.set_xlabel("negation scale lambda")
    rouge_axis.set_ylabel("validation ROUGE-L F1 (95% CI)")
    rouge_axis.legend()

    points = [(t["scale"], t["perplexity"]) for t in trials if t["perplexity"] is not None]
    if points:
        perplexity_axis.plot([x for x, _ in points], [p for _, p in points], marker="o", color="tab:red")
        perplexity_axis.set_yscale("log")
    bound = search["perplexity_bound"]["max_perplexity"]
    if bound is not None:
        perplexity_axis.axhline(bound, color="tab:red", linestyle="--",
                                label=f"bound ({search['perplexity_bound']['max_ratio']:g} x "
                                      f"{search['perplexity_bound']['basis']})")
        perplexity_axis.legend()
    perplexity_axis.axvline(search["chosen_scale"], color="black", linestyle=":")
    perplexity_axis.set_xlabel("negation scale lambda")
    perplexity_axis.set_ylabel("held-out perplexity")

    figure.suptitle(f"step {manifest['sequence']}: {manifest['inputs']['forget']['title']}, "
                    f"lambda = {search['chosen_scale']:g}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""The collapse guard: decide whether a step's model may become the lineage's head.

A model counts as collapsed when its general ability falls too far below the
vanilla model's: held-out perplexity rises past a ratio, retain-set ROUGE-L
falls below a fraction, or accuracy falls below a fraction. ROUGE on the
retain set alone misses damage on small models (it stays flat while
perplexity grows tenfold), so perplexity and accuracy are checked too.

Pure functions of the base record and a step manifest, free of heavy imports:
the operator calls them as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .spec import CollapseGuard


@dataclasses.dataclass(frozen=True)
class GuardResult:
    collapsed: bool
    reasons: tuple[str, ...]  # one sentence per tripped threshold

    @property
    def message(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "within the collapse guard"


def _mean(figures: Mapping[str, Any], set_name: str, kind: str) -> float | None:
    entry = figures.get(set_name)
    if not entry or kind not in entry:
        return None
    return float(entry[kind]["mean"])


def check_collapse(base: Mapping[str, Any], manifest: Mapping[str, Any], guard: CollapseGuard) -> GuardResult:
    """Compare a step's figures with theta_0's and return which thresholds they break."""
    vanilla = base.get("figures") or {}
    current = manifest.get("figures") or {}
    reasons = []

    vanilla_perplexity = (vanilla.get("held_out") or {}).get("perplexity")
    perplexity = (current.get("held_out") or {}).get("perplexity")
    if vanilla_perplexity and perplexity is not None:
        ratio = perplexity / vanilla_perplexity
        if ratio > guard.max_perplexity_ratio:
            reasons.append(f"held-out perplexity {perplexity:.1f} is {ratio:.2f}x the vanilla {vanilla_perplexity:.1f}, "
                           f"above maxPerplexityRatio {guard.max_perplexity_ratio}")

    vanilla_retain = _mean(vanilla, "retain", "rougeL")
    retain = _mean(current, "retain", "rougeL")
    if vanilla_retain and retain is not None:
        fraction = retain / vanilla_retain
        if fraction < guard.min_retain_rouge_fraction:
            reasons.append(f"retain-set ROUGE-L {retain:.3f} is {fraction:.2f} of the vanilla {vanilla_retain:.3f}, "
                           f"below minRetainRougeFraction {guard.min_retain_rouge_fraction}")

    vanilla_accuracy = (vanilla.get("accuracy") or {}).get("accuracy")
    accuracy = (current.get("accuracy") or {}).get("accuracy")
    if vanilla_accuracy and accuracy is not None:
        fraction = accuracy / vanilla_accuracy
        if fraction < guard.min_accuracy_fraction:
            reasons.append(f"accuracy {accuracy:.3f} is {fraction:.2f} of the vanilla {vanilla_accuracy:.3f}, "
                           f"below minAccuracyFraction {guard.min_accuracy_fraction}")

    return GuardResult(collapsed=bool(reasons), reasons=tuple(reasons))

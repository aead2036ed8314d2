"""Choose a step's negation scale lambda by searching a grid on a validation split.

After a step's task vector tau is computed, every scale of the request's grid
is applied (theta_(t-1) - lambda * tau) and scored on

- ROUGE-L of continuations of the validation chunks: the chunks that follow
  the scored D_f chunks in the work's seeded order, so the search never scores
  the chunks the step is judged on (``validation_split`` raises if the two
  overlap), and
- held-out perplexity, the lineage's general-ability signal.

``choose_scale`` then keeps the scales whose perplexity is within the bound
(a ratio to the reference model's perplexity, or to vanilla's without a
reference), takes the one whose validation ROUGE-L is closest to the
reference's on the same chunks (lowest, without a reference figure), and
treats every scale whose 95 % interval overlaps that one's as a tie: the
smallest tied scale wins, because a smaller edit changes the model less.

The search is only as good as its validation chunks: when the preparation did
not memorise them, every scale scores near the reference and the smallest one
wins. The step records whether they were memorised.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import evaluate
from .spec import Calibration, Evaluation
from .taskvector import TaskVector, negate
from .works import Chunk

logger = logging.getLogger(__name__)


def validation_split(ordered: Sequence[Chunk], *, forget_chunks: int, validation_chunks: int) -> list[Chunk]:
    """Return the validation chunks: the VALIDATION_CHUNKS chunks after the first FORGET_CHUNKS of ORDERED.

    ORDERED is the work's fixed seeded order, whose first FORGET_CHUNKS chunks
    are the scored D_f set. Fewer chunks are returned when the work is short.
    """
    scored = {chunk.index for chunk in ordered[:forget_chunks]}
    validation = list(ordered[forget_chunks:forget_chunks + validation_chunks])
    overlap = scored & {chunk.index for chunk in validation}
    if overlap:
        raise ValueError(f"validation chunks {sorted(overlap)} are also scored D_f chunks; "
                         "the work's chunk order repeats an index, so rebuild its chunks")
    return validation


def validation_settings(settings: Evaluation) -> Evaluation:
    """Return the lineage's evaluation settings with the search's shorter continuations."""
    return dataclasses.replace(settings, max_new_tokens=settings.validation_max_new_tokens)


def search_scale(*, model, tokenizer, head_state: Mapping[str, torch.Tensor], vector: TaskVector,
                 chunks: Sequence[Chunk], settings: Evaluation, calibration: Calibration,
                 held_out_text: str | None, target_rougeL: float | None, perplexity_basis: float | None,
                 basis_name: str, show_progress: bool = True) -> dict[str, Any]:
    """Score every scale of CALIBRATION on CHUNKS and held-out perplexity; return the record with the choice.

    MODEL is left holding theta_(t-1) - lambda * tau for the last scale tried;
    the caller loads the chosen state. TARGET_ROUGEL is the reference's
    validation ROUGE-L (None: minimise ROUGE-L). PERPLEXITY_BASIS is the
    perplexity the bound is relative to, named by BASIS_NAME ("reference" or
    "vanilla"); None skips the bound.
    """
    if not chunks:
        raise ValueError("the negation-scale search needs validation chunks, got none; "
                         "the work is too short for spec.evaluation.forgetChunks plus validationChunks")
    search_settings = validation_settings(settings)
    device = next(model.parameters()).device
    limit = None if perplexity_basis is None else calibration.max_perplexity_ratio * perplexity_basis

    trials = []
    for scale in calibration.scales:
        state = negate(head_state, vector, scale)
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
        scores = evaluate.score_set(model, tokenizer, chunks, search_settings, name=f"validation at lambda {scale:g}",
                                    show_progress=show_progress)
        trial: dict[str, Any] = {"scale": scale, "rouge1": scores["rouge1"], "rougeL": scores["rougeL"],
                                 "perplexity": None, "perplexity_ratio": None, "within_bound": True}
        if held_out_text is not None:
            perplexity = evaluate.perplexity(model, tokenizer, held_out_text,
                                             max_tokens=settings.perplexity_tokens)["perplexity"]
            trial["perplexity"] = perplexity
            if perplexity_basis is not None:
                trial["perplexity_ratio"] = perplexity / perplexity_basis
                trial["within_bound"] = perplexity <= limit
        logger.info("Negation scale %g: validation ROUGE-L %.3f [%.3f, %.3f], perplexity %s", scale,
                    trial["rougeL"]["mean"], trial["rougeL"]["ci_low"], trial["rougeL"]["ci_high"],
                    "-" if trial["perplexity"] is None else f"{trial['perplexity']:.1f}")
        trials.append(trial)

    choice = choose_scale(trials=trials, target_rougeL=target_rougeL)
    return {
        "enabled": True,
        "scales": list(calibration.scales),
        "validation_chunks": [{"work": c.work, "index": c.index} for c in chunks],
        "max_new_tokens": search_settings.max_new_tokens,
        "target": {"rougeL": target_rougeL,
                   "kind": "closest to the reference" if target_rougeL is not None else "lowest"},
        "perplexity_bound": {"basis": basis_name if perplexity_basis is not None else None,
                             "basis_perplexity": perplexity_basis,
                             "max_ratio": calibration.max_perplexity_ratio, "max_perplexity": limit},
        "trials": trials,
        **choice,
    }


def choose_scale(*, trials: Sequence[Mapping[str, Any]], target_rougeL: float | None) -> dict[str, Any]:
    """Pick a scale from scored TRIALS; return chosen_scale, best_scale, tied_scales, bound_met and the reason.

    Each trial has ``scale``, ``rougeL`` (mean, ci_low, ci_high), ``within_bound``
    and ``perplexity``. Distance is |ROUGE-L - TARGET_ROUGEL|, or ROUGE-L itself
    without a target.
    """
    if not trials:
        raise ValueError("choose_scale got no trials; list at least one scale in spec.method.calibration.scales")

    def distance(trial: Mapping[str, Any]) -> float:
        mean = trial["rougeL"]["mean"]
        return abs(mean - target_rougeL) if target_rougeL is not None else mean

    feasible = [t for t in trials if t["within_bound"]]
    if not feasible:
        # Every scale breaks the bound, so the one with the lowest perplexity does the least damage.
        least = min(trials, key=lambda t: (t["perplexity"], t["scale"]))
        logger.warning("No negation scale kept perplexity within the bound; taking %g, the least damaging",
                       least["scale"])
        return {"chosen_scale": least["scale"], "best_scale": None, "tied_scales": [], "bound_met": False,
                "reason": "no scale kept perplexity within the bound; took the one with the lowest perplexity"}

    best = min(feasible, key=lambda t: (distance(t), t["scale"]))
    tied = [t for t in feasible if evaluate.intervals_overlap(t["rougeL"], best["rougeL"])]
    chosen = min(tied, key=lambda t: t["scale"])
    goal = "closest to the reference's validation ROUGE-L" if target_rougeL is not None else "lowest validation ROUGE-L"
    reason = f"scale {best['scale']:g} has the {goal} within the perplexity bound"
    if chosen is not best:
        reason += f"; {chosen['scale']:g} is the smallest scale whose interval overlaps it"
    return {"chosen_scale": chosen["scale"], "best_scale": best["scale"],
            "tied_scales": sorted(t["scale"] for t in tied), "bound_met": True, "reason": reason}

"""Score a model: verbatim overlap per chunk set, perplexity, multiple-choice accuracy.

- Overlap: for every chunk, the model continues the templated prompt by
  nucleus sampling, and ROUGE-1 / ROUGE-L F1 (``rouge-score``) compare the
  generated text with the true continuation. A set's figure is the mean over
  its chunks, with a seeded 95 % bootstrap confidence interval.
- Perplexity: exp of the mean next-token cross-entropy on held-out text the
  lineage never trains on.
- Accuracy: zero-shot MMLU-style questions, scored by which of the answer
  letters A-D gets the highest next-token logit.
- Comparison: differences between two models' figures, with whether their
  95 % intervals overlap. Overlapping intervals mean the difference is not
  shown at this sample size; they do not show that the two are equal.

Sampling is seeded per batch, so a figure is reproducible for the same model,
chunks, seed, batch size and device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from .model import prompt_ids
from .spec import Evaluation
from .works import Chunk

ROUGE_TYPES = ("rouge1", "rougeL")
USE_STEMMER = False


def scorer_description() -> dict[str, Any]:
    """Describe the scorer, so figures from different tools are never compared blindly."""
    return {
        "package": "rouge-score",
        "version": metadata.version("rouge-score"),
        "types": list(ROUGE_TYPES),
        "measure": "F1",
        "tokenizer": "rouge-score default (lowercase, split on non-alphanumeric)",
        "stemming": USE_STEMMER,
    }


def sampling_description(settings: Evaluation) -> dict[str, Any]:
    return {
        "method": "nucleus",
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
    }


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=USE_STEMMER)
    scores: dict[str, list[float]] = {kind: [] for kind in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        result = scorer.score(reference, prediction)
        for kind in ROUGE_TYPES:
            scores[kind].append(result[kind].fmeasure)
    return scores


def bootstrap_interval(values: Sequence[float], *, samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Return the percentile bootstrap confidence interval of the mean of VALUES."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return (float(data.mean()), float(data.mean())) if len(data) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarise(values: Sequence[float], *, samples: int, seed: int) -> dict[str, float]:
    low, high = bootstrap_interval(values, samples=samples, seed=seed)
    return {"mean": float(np.mean(values)) if len(values) else math.nan, "ci_low": low, "ci_high": high}


@torch.no_grad()
def generate(model, tokenizer, chunks: Sequence[Chunk], settings: Evaluation, *, desc: str = "generating",
             show_progress: bool = True) -> list[str]:
    """Continue each chunk's templated prompt by seeded nucleus sampling; return the new text only."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    batches = range(0, len(chunks), settings.batch_size)
    for batch_number, start in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not show_progress,
                                              leave=False)):
        rows = [prompt_ids(tokenizer, c.prompt_ids) for c in chunks[start:start + settings.batch_size]]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)  # (B, T), left-padded
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row):] = torch.tensor(row)
            attention[i, length - len(row):] = 1
        torch.manual_seed(settings.seed + batch_number)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )  # (B, T + new)
        for row in generated[:, length:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def score_set(model, tokenizer, chunks: Sequence[Chunk], settings: Evaluation, *, name: str,
              show_progress: bool = True) -> dict[str, Any] | None:
    """Score one chunk set: per-chunk and mean ROUGE with intervals. None for an empty set."""
    if not chunks:
        return None
    predictions = generate(model, tokenizer, chunks, settings, desc=f"scoring {name}", show_progress=show_progress)
    per_chunk = rouge_scores(predictions, [c.continuation_text for c in chunks])
    result: dict[str, Any] = {"chunks": len(chunks)}
    for kind in ROUGE_TYPES:
        result[kind] = summarise(per_chunk[kind], samples=settings.bootstrap_samples, seed=settings.seed)
        result[f"{kind}_per_chunk"] = per_chunk[kind]
    result["samples"] = [{"work": c.work, "index": c.index, "generated": p[:300]}
                         for c, p in zip(chunks[:2], predictions[:2])]
    return result


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, max_tokens: int, window: int = 512) -> dict[str, float]:
    """Return exp(mean next-token CE) over the first MAX_TOKENS tokens of TEXT, in windows of WINDOW."""
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(ids), window):
        piece = torch.tensor([ids[start:start + window]], device=device)  # (1, T)
        if piece.size(1) < 2:
            break
        logits = model(input_ids=piece).logits[:, :-1, :].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), piece[:, 1:].reshape(-1),
                                                 reduction="sum")
        total_loss += float(loss)
        total_tokens += piece.size(1) - 1
    return {"perplexity": math.exp(total_loss / total_tokens), "tokens": total_tokens}


def load_questions(path: Path, *, count: int, seed: int) -> list[dict[str, Any]]:
    """Read MMLU-style JSON lines (question, answer_a..d, correct_answer) and draw COUNT of them."""
    questions = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("correct_answer") not in ("A", "B", "C", "D"):
                continue  # header rows repeated inside the file carry the literal "answer"
            questions.append(row)
    return random.Random(seed).sample(questions, min(count, len(questions)))


@torch.no_grad()
def accuracy(model, tokenizer, questions: Sequence[dict[str, Any]], *, batch_size: int = 8,
             show_progress: bool = True) -> dict[str, float]:
    device = next(model.parameters()).device
    letters = ["A", "B", "C", "D"]
    letter_ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in letters]
    correct = []
    for start in tqdm(range(0, len(questions), batch_size), desc="scoring accuracy", unit="batch",
                      disable=not show_progress, leave=False):
        batch = questions[start:start + batch_size]
        texts = [_question_text(q) for q in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)  # left padding: last position is the answer
        logits = model(input_ids=encoded["input_ids"].to(device),
                       attention_mask=encoded["attention_mask"].to(device)).logits[:, -1, :]  # (B, V)
        choices = logits[:, letter_ids].argmax(dim=-1).tolist()
        correct += [letters[c] == q["correct_answer"] for c, q in zip(choices, batch)]
    return {"accuracy": sum(correct) / len(correct), "questions": len(correct), "per_question": [int(c) for c in correct]}


def _question_text(question: dict[str, Any]) -> str:
    options = "\n".join(f"{letter}. {question['answer_' + letter.lower()]}" for letter in "ABCD")
    return f"The following is a multiple choice question about {question.get('topic', 'general knowledge')}.\n\n" \
           f"{question['question']}\n{options}\nAnswer:"


# ---------------------------------------------------------------------------
# Comparing figures: differences between two models' figures, and whether their intervals overlap.

COMPARED_SETS = ("forget", "previous", "retain")


def intervals_overlap(first: dict[str, float], second: dict[str, float]) -> bool:
    """Return whether two summaries' 95 % intervals (ci_low, ci_high) share any value."""
    return first["ci_low"] <= second["ci_high"] and second["ci_low"] <= first["ci_high"]


def per_chunk_scores(entries: Mapping[str, dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Index per-chunk ROUGE of score_set results by (work, chunk index).

    ENTRIES maps a work's URI to a score_set result that also carries
    ``chunk_indices`` (the indices its per-chunk lists follow); entries without
    them are skipped.
    """
    scores: dict[tuple[str, int], dict[str, float]] = {}
    for work, entry in entries.items():
        if not entry or "chunk_indices" not in entry:
            continue
        for position, index in enumerate(entry["chunk_indices"]):
            scores[(work, index)] = {kind: entry[f"{kind}_per_chunk"][position] for kind in ROUGE_TYPES}
    return scores


def summarise_chunks(scores: Mapping[tuple[str, int], dict[str, float]], keys: Sequence[tuple[str, int]], *,
                     samples: int, seed: int) -> dict[str, Any] | None:
    """Summarise stored per-chunk scores for the chunks KEYS; None when none of them was scored.

    This is how a model scored once per lineage (the reference, vanilla) is
    compared on a set drawn later (D_prev): its own per-chunk scores for the
    same chunks, averaged with the same bootstrap.
    """
    matched = [scores[key] for key in keys if key in scores]
    if not matched:
        return None
    result: dict[str, Any] = {"chunks": len(matched), "unmatched_chunks": len(keys) - len(matched)}
    for kind in ROUGE_TYPES:
        values = [m[kind] for m in matched]
        result[kind] = summarise(values, samples=samples, seed=seed)
        result[f"{kind}_per_chunk"] = values
    return result


def compare_figures(figures: Mapping[str, Any], other: Mapping[str, Any], *, samples: int,
                    seed: int) -> dict[str, Any]:
    """Return FIGURES minus OTHER per set and kind, with whether the 95 % intervals overlap.

    ROUGE sets give ``difference`` and ``overlap``; held-out perplexity gives
    ``ratio`` (FIGURES / OTHER); accuracy gives ``difference`` and, from the
    per-question results, ``overlap`` of bootstrap intervals. A set missing on
    either side is None.
    """
    comparison: dict[str, Any] = {}
    for name in COMPARED_SETS:
        mine, theirs = figures.get(name), other.get(name)
        if not mine or not theirs:
            comparison[name] = None
            continue
        comparison[name] = {kind: {"difference": mine[kind]["mean"] - theirs[kind]["mean"],
                                   "overlap": intervals_overlap(mine[kind], theirs[kind]),
                                   "other": theirs[kind]}
                            for kind in ROUGE_TYPES}

    mine, theirs = figures.get("held_out"), other.get("held_out")
    comparison["held_out"] = None if not mine or not theirs else {
        "ratio": mine["perplexity"] / theirs["perplexity"], "other_perplexity": theirs["perplexity"]}

    mine, theirs = figures.get("accuracy"), other.get("accuracy")
    if not mine or not theirs:
        comparison["accuracy"] = None
    else:
        intervals = [summarise(entry["per_question"], samples=samples, seed=seed) for entry in (mine, theirs)]
        comparison["accuracy"] = {"difference": mine["accuracy"] - theirs["accuracy"],
                                  "overlap": intervals_overlap(*intervals), "other": intervals[1]}
    return comparison

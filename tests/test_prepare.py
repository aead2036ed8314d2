"""The preparation on a tiny model: the KL term toward the base, its retain text, and the per-epoch hook."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lethe_trainer.model import load_model, load_tokenizer
from lethe_trainer.prepare import _kl_to_base, memorise
from lethe_trainer.spec import parse_lineage
from lethe_trainer.step import kl_retain_texts, read_work, retain_set, work_chunks

from tests.support.tiny_model import make_tiny_model
from tests.test_quality import lineage_resource
from tests.test_step import write_work


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    model_directory = make_tiny_model(root / "model")
    names = ["one", "two", "mix", "retain", "held_out"]
    works = {name: write_work(root / f"{name}.txt", seed + 30) for seed, name in enumerate(names)}
    resource = lineage_resource(model_directory, works, mix=False)
    resource["spec"]["preparation"]["retainKlWeight"] = 1.0
    lineage = parse_lineage(resource)
    tokenizer = load_tokenizer(model_directory)
    return lineage, model_directory, tokenizer


def _training_chunks(lineage, tokenizer):
    chunks = []
    for uri in lineage.preparation.works:
        chunks += work_chunks(read_work(uri, field="works"), tokenizer, lineage.evaluation, field="works")[:4]
    return chunks


def test_kl_text_excludes_scored_chunks(setting):
    lineage, _, tokenizer = setting
    scored, _ = retain_set(lineage, tokenizer)
    texts = kl_retain_texts(lineage, tokenizer, scored)
    scored_texts = [list(c.prompt_ids) + list(c.continuation_ids) for c in scored]
    assert texts, "a positive retainKlWeight must give the KL term some retain text"
    assert not [t for t in texts if t in scored_texts]


def test_no_kl_text_without_kl_weight(setting):
    lineage, _, tokenizer = setting
    without = dataclasses.replace(lineage, preparation=dataclasses.replace(lineage.preparation, retain_kl_weight=0.0))
    assert kl_retain_texts(without, tokenizer, []) == []


def _divergence_after(lineage, model_directory, tokenizer, weight: float, texts) -> float:
    """Memorise with KL weight WEIGHT, then return the mean KL to the base on TEXTS."""
    preparation = dataclasses.replace(lineage.preparation, retain_kl_weight=weight, epochs=3, learning_rate=3e-2)
    model = load_model(model_directory, device=torch.device("cpu"))
    memorise(model, tokenizer, _training_chunks(lineage, tokenizer), preparation, retain_texts=texts, seed=5,
             show_progress=False)
    base = load_model(model_directory, device=torch.device("cpu"))
    total = 0.0
    with torch.no_grad():
        for ids in texts:
            batch = torch.tensor([ids])
            adapted = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
            reference = torch.log_softmax(base(input_ids=batch).logits.float(), -1)
            total += float(torch.nn.functional.kl_div(adapted, reference, log_target=True, reduction="sum")
                           / batch.size(1))
    return total / len(texts)


def test_kl_term_stays_near_base(setting):
    lineage, model_directory, tokenizer = setting
    scored, _ = retain_set(lineage, tokenizer)
    texts = kl_retain_texts(lineage, tokenizer, scored)
    free = _divergence_after(lineage, model_directory, tokenizer, 0.0, texts)
    regularised = _divergence_after(lineage, model_directory, tokenizer, 500.0, texts)
    assert free > 0
    # Measured: 0.0117 without the term, 0.0005 with weight 500 (0.0037 at 100).
    assert regularised < 0.25 * free


def test_kl_zero_for_fresh_adapter(setting):
    lineage, model_directory, tokenizer = setting
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(model_directory, device=torch.device("cpu")),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    ids = kl_retain_texts(lineage, tokenizer, [])[0]
    # A fresh LoRA adapter has B = 0, so the adapted model equals the base.
    assert float(_kl_to_base(model, ids, torch.device("cpu"))) == pytest.approx(0.0, abs=1e-7)


def test_epoch_hook_runs_in_eval_mode(setting):
    lineage, model_directory, tokenizer = setting
    preparation = dataclasses.replace(lineage.preparation, epochs=3)
    model = load_model(model_directory, device=torch.device("cpu"))
    seen = []

    def hook(epoch, peft_model):
        seen.append((epoch, peft_model.training, torch.is_grad_enabled()))
        return {"probe": epoch * 10}

    scored, _ = retain_set(lineage, tokenizer)
    report = memorise(model, tokenizer, _training_chunks(lineage, tokenizer), preparation,
                      retain_texts=kl_retain_texts(lineage, tokenizer, scored), show_progress=False, on_epoch=hook)
    assert seen == [(1, False, False), (2, False, False), (3, False, False)]
    assert [e["probe"] for e in report["epochs"]] == [10, 20, 30]
    assert all(e["mean_kl"] >= 0 for e in report["epochs"])


def test_merge_fraction_scales_update(setting):
    lineage, model_directory, tokenizer = setting
    chunks = _training_chunks(lineage, tokenizer)
    base = load_model(model_directory, device=torch.device("cpu")).state_dict()
    merged = {}
    for fraction in (1.0, 0.5):
        preparation = dataclasses.replace(lineage.preparation, merge_fraction=fraction, epochs=2, learning_rate=3e-2)
        model = load_model(model_directory, device=torch.device("cpu"))
        report = memorise(model, tokenizer, chunks, preparation, seed=5, show_progress=False)
        assert report["merge_fraction"] == fraction
        merged[fraction] = model.state_dict()
    moved = [name for name in base if not torch.equal(merged[1.0][name], base[name])]
    assert moved, "memorising must move some weights"
    for name in moved:
        full = merged[1.0][name] - base[name]
        half = merged[0.5][name] - base[name]
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-4, atol=1e-6)

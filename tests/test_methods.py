"""Properties of the unlearning step, on a tiny randomly initialised Llama model.

These check the method's arithmetic, not its effect: the saliency mask keeps
exactly the salient elements, masked weights stay bit-identical, negation is
exact, random labels never pair a chunk with itself, and prompt tokens never
reach the loss.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lethe_trainer import methods
from lethe_trainer.model import load_model, load_tokenizer, weights
from lethe_trainer.spec import MethodSpec, SpecError
from lethe_trainer.taskvector import TaskVector, negate
from lethe_trainer.works import Chunk, derangement

from tests.support.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture()
def model(tiny_dir):
    return load_model(tiny_dir, device=torch.device("cpu"))


def make_chunks(count: int, *, prompt: int = 12, continuation: int = 12, seed: int = 0) -> list[Chunk]:
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for index in range(count):
        ids = torch.randint(100, 5000, (prompt + continuation,), generator=generator).tolist()
        chunks.append(Chunk(work="file:///work.txt", index=index, prompt_ids=tuple(ids[:prompt]),
                            continuation_ids=tuple(ids[prompt:]), prompt_text="", continuation_text=""))
    return chunks


SSU = MethodSpec(name="SSU", learning_rate=1e-2, batch_size=2, lora_rank=4, lora_alpha=8, seed=3)


def test_saliency_mask_keeps_elements_at_threshold():
    first = torch.nn.Parameter(torch.zeros(4))
    second = torch.nn.Parameter(torch.zeros(2, 2))
    first.grad = torch.tensor([0.1, -2.0, 0.5, 0.0])
    second.grad = torch.tensor([[1.0, -0.2], [3.0, 0.05]])
    magnitudes = torch.tensor([0.1, 2.0, 0.5, 0.0, 1.0, 0.2, 3.0, 0.05])
    threshold = magnitudes.mean() + 1.0 * magnitudes.std(correction=0)

    masks, reported = methods.saliency_masks([first, second], 1.0)

    assert reported == pytest.approx(float(threshold))
    assert masks[0].tolist() == [False, True, False, False]
    assert masks[1].tolist() == [[False, False], [True, False]]


def test_saliency_mask_with_zero_std_keeps_above_mean():
    parameter = torch.nn.Parameter(torch.zeros(4))
    parameter.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    masks, threshold = methods.saliency_masks([parameter], 0.0)
    assert threshold == pytest.approx(2.5)
    assert masks[0].tolist() == [False, False, True, True]


def test_masked_elements_stay_bit_identical(model, tokenizer):
    """One SSU optimizer step moves exactly the elements whose |grad| reached the threshold."""
    chunks = make_chunks(4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    # Start B away from zero so A gets gradients too.
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))
    before = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    forget = [methods.build_example(tokenizer, c.prompt_ids, c.continuation_ids) for c in chunks[:2]]
    partners = [methods.build_example(tokenizer, chunks[0].prompt_ids, chunks[1].continuation_ids),
                methods.build_example(tokenizer, chunks[1].prompt_ids, chunks[0].continuation_ids)]

    # Recompute the gradient the step will see, to know the expected mask.
    loss = methods.continuation_loss(peft_model, methods.collate(forget, tokenizer.pad_token_id, torch.device("cpu")))
    loss = loss + methods.continuation_loss(peft_model, methods.collate(partners, tokenizer.pad_token_id,
                                                                        torch.device("cpu")))
    loss.backward()
    expected_masks, _ = methods.saliency_masks(parameters, SSU.saliency_std)

    metrics = methods._optimizer_step(peft_model, parameters, optimizer, SSU, tokenizer.pad_token_id,
                                      torch.device("cpu"), forget, partners)

    moved = 0
    for parameter, previous, mask in zip(parameters, before, expected_masks):
        assert torch.equal(parameter.detach()[~mask], previous[~mask])
        moved += int((parameter.detach()[mask] != previous[mask]).sum())
    assert moved > 0
    assert 0 < metrics["mask_density"] < 0.5


def test_training_leaves_model_weights_unchanged(model, tokenizer):
    before = weights(model)
    methods.train_task_vector(model, tokenizer, make_chunks(4), SSU, show_progress=False)
    after = weights(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_task_vector_matches_merged_difference(model, tokenizer):
    vector, report = methods.train_task_vector(model, tokenizer, make_chunks(4), SSU, show_progress=False)
    assert set(vector.factors) == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    assert report.merge_max_abs_error < 1e-6
    assert any(float(vector.delta(name).abs().max()) > 0 for name in vector.names())


def test_negation_is_exact(model, tokenizer):
    vector, _ = methods.train_task_vector(model, tokenizer, make_chunks(4), SSU, show_progress=False)
    previous = weights(model)
    scale = 0.75
    new = negate(previous, vector, scale)
    for name, tensor in previous.items():
        if name in vector.names():
            expected = previous[name] - scale * (vector.factors[name].scale * (vector.factors[name].b @ vector.factors[name].a))
            assert torch.equal(new[name], expected), name
        else:
            assert new[name] is tensor


def test_task_vector_round_trip(tmp_path, model, tokenizer):
    vector, _ = methods.train_task_vector(model, tokenizer, make_chunks(4), SSU, show_progress=False)
    path = tmp_path / "tv.safetensors"
    vector.save(path)
    loaded = TaskVector.load(path)
    assert loaded.names() == vector.names()
    for name in vector.names():
        assert torch.equal(loaded.delta(name), vector.delta(name))


def test_derangement_never_pairs_chunk_with_itself():
    for count in range(2, 30):
        for seed in range(5):
            permutation = derangement(count, seed=seed)
            assert sorted(permutation) == list(range(count))
            assert all(i != j for i, j in enumerate(permutation))


def test_derangement_rejects_single_chunk():
    with pytest.raises(ValueError):
        derangement(1, seed=0)


def test_ssu_with_one_chunk_is_rejected(model, tokenizer):
    with pytest.raises(SpecError) as raised:
        methods.train_task_vector(model, tokenizer, make_chunks(1), SSU, show_progress=False)
    assert "spec.method.maxChunks" in str(raised.value)


def test_loss_ignores_prompt_labels(model, tokenizer):
    """Prompt and template positions carry the ignore label; continuation labels drive the loss."""
    chunk = make_chunks(1)[0]
    example = methods.build_example(tokenizer, chunk.prompt_ids, chunk.continuation_ids)
    prompt_length = len(example.labels) - len(chunk.continuation_ids)
    assert example.labels[:prompt_length] == [methods.IGNORE_INDEX] * prompt_length
    assert example.labels[prompt_length:] == list(chunk.continuation_ids)

    device = torch.device("cpu")
    batch = methods.collate([example], tokenizer.pad_token_id, device)
    with torch.no_grad():
        reference = methods.continuation_loss(model, batch)

        # A changed continuation label changes the loss.
        changed = dict(batch)
        changed["labels"] = batch["labels"].clone()
        changed["labels"][0, -1] = (changed["labels"][0, -1] + 1) % 1000
        assert not torch.equal(methods.continuation_loss(model, changed), reference)


def test_loss_counts_only_continuation_tokens(model, tokenizer):
    """The loss equals a cross-entropy computed by hand over the continuation positions only."""
    chunk = make_chunks(1)[0]
    example = methods.build_example(tokenizer, chunk.prompt_ids, chunk.continuation_ids)
    batch = methods.collate([example], tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0]  # (T, V)
        start = len(example.input_ids) - len(chunk.continuation_ids)
        predicted = logits[start - 1:-1]  # positions that predict continuation tokens
        manual = torch.nn.functional.cross_entropy(predicted, torch.tensor(chunk.continuation_ids))
        assert float(methods.continuation_loss(model, batch)) == pytest.approx(float(manual), rel=1e-5)


def test_task_vector_method_has_no_mask(model, tokenizer):
    method = dataclasses.replace(SSU, name="TaskVector")
    _, report = methods.train_task_vector(model, tokenizer, make_chunks(4), method, show_progress=False)
    assert report.mean_mask_density is None
    assert all("random_label_loss" not in step for step in report.history)
    _, ssu_report = methods.train_task_vector(model, tokenizer, make_chunks(4), SSU, show_progress=False)
    assert all("random_label_loss" in step for step in ssu_report.history)

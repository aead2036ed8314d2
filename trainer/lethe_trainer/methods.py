"""The unlearning methods: fine-tune a LoRA adapter on the work, return it as a task vector.

Both methods fine-tune a copy of the current head theta_(t-1) on the chunks of
the work with LoRA (peft) in float32, and return the adapter as a task vector
tau; the caller negates it (theta_t = theta_(t-1) - lambda * tau).

- ``TaskVector``: loss = forget_weight * CE(y | x).
- ``SSU`` (Stable Sequential Unlearning, Dou et al. 2025):
  loss = forget_weight * CE(y | x) + random_label_weight * CE(y' | x), where y'
  is the continuation of a different chunk of the same work, and before each
  optimizer step every gradient element with |g| < mean(|g|) + k * std(|g|)
  (over all trainable elements) is zeroed: only salient weights move.

CE is the token-level cross-entropy over continuation tokens only: prompt,
template and padding tokens carry the label -100 and never enter the loss.

The saliency mask is applied once, to the gradient the optimizer uses, and no
second backward pass adds the unmasked gradient back. AdamW keeps moments
from earlier steps, so a weight outside this step's mask could still drift.
The step therefore restores every masked-out element after the optimizer
update, and only salient weights move at every step.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from .model import prompt_ids
from .spec import MethodSpec, SpecError
from .taskvector import LoraFactors, TaskVector
from .works import Chunk, derangement

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that transformers' cross-entropy skips

StepCallback = Callable[[dict[str, float]], None]


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt and template tokens


@dataclasses.dataclass
class TrainingReport:
    optimizer_steps: int
    examples: int
    final_loss: float
    mean_mask_density: float | None
    merge_max_abs_error: float  # |(merged - previous) - scale * B @ A|, max over all elements
    seconds: float
    history: list[dict[str, float]]


def build_example(tokenizer, prompt: Sequence[int], continuation: Sequence[int]) -> Example:
    """Return the training sequence template(prompt) + continuation, with labels on the continuation only."""
    context = prompt_ids(tokenizer, prompt)
    return Example(input_ids=context + list(continuation),
                   labels=[IGNORE_INDEX] * len(context) + list(continuation))


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label IGNORE_INDEX."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}


def continuation_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (continuation) tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    shifted_logits = logits[:, :-1, :].float()  # token t predicts token t + 1
    shifted_labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX)


def saliency_masks(parameters: Sequence[torch.nn.Parameter], std_multiplier: float) -> tuple[list[torch.Tensor], float]:
    """Return per-parameter masks of |grad| >= mean + k * std over all elements, and the threshold."""
    magnitudes = torch.cat([p.grad.detach().abs().flatten() for p in parameters])
    threshold = magnitudes.mean() + std_multiplier * magnitudes.std(correction=0)
    return [p.grad.detach().abs() >= threshold for p in parameters], float(threshold)


def check_method_inputs(method: MethodSpec, chunks: Sequence[Chunk]) -> None:
    if method.uses_random_labels and len(chunks) < 2:
        raise SpecError("spec.method.maxChunks", method.max_chunks,
                        f"leaves {len(chunks)} chunk, but random labels pair each chunk with another one",
                        "use a work of at least two chunks and set maxChunks to 2 or more")


def train_task_vector(model, tokenizer, chunks: Sequence[Chunk], method: MethodSpec, *,
                      on_step: StepCallback | None = None, show_progress: bool = True) -> tuple[TaskVector, TrainingReport]:
    """Fine-tune a LoRA adapter on CHUNKS with METHOD and return it as a task vector.

    MODEL is left with exactly the weights it had on entry.
    """
    check_method_inputs(method, chunks)
    started = time.monotonic()
    device = next(model.parameters()).device
    torch.manual_seed(method.seed)

    config = LoraConfig(r=method.lora_rank, lora_alpha=method.lora_alpha, target_modules=list(method.target_modules),
                        lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config)
    peft_model.train()
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=method.learning_rate, weight_decay=0.0)

    forget_examples = [build_example(tokenizer, c.prompt_ids, c.continuation_ids) for c in chunks]
    random_label_examples = None
    if method.uses_random_labels:
        partner = derangement(len(chunks), seed=method.seed)
        random_label_examples = [build_example(tokenizer, chunks[i].prompt_ids, chunks[partner[i]].continuation_ids)
                                 for i in range(len(chunks))]

    batches_per_epoch = (len(chunks) + method.batch_size - 1) // method.batch_size
    total_steps = batches_per_epoch * method.epochs
    order_rng = random.Random(method.seed)
    history: list[dict[str, float]] = []
    progress = tqdm(total=total_steps, desc=f"{method.name} training", unit="step", disable=not show_progress,
                    leave=False)

    for epoch in range(method.epochs):
        order = list(range(len(chunks)))
        order_rng.shuffle(order)
        for start in range(0, len(order), method.batch_size):
            rows = order[start:start + method.batch_size]
            metrics = _optimizer_step(peft_model, parameters, optimizer, method, tokenizer.pad_token_id, device,
                                      [forget_examples[i] for i in rows],
                                      None if random_label_examples is None else [random_label_examples[i] for i in rows])
            metrics.update(step=len(history) + 1, total_steps=total_steps, epoch=epoch + 1,
                           learning_rate=method.learning_rate)
            elapsed = time.monotonic() - started
            metrics["eta_seconds"] = elapsed / metrics["step"] * (total_steps - metrics["step"])
            history.append(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if on_step is not None:
                on_step(metrics)
    progress.close()

    vector = _extract_factors(peft_model)
    merge_error = _merge_error(peft_model, vector)
    peft_model.unload()  # drops the adapter and leaves the original weights
    model.eval()

    densities = [m["mask_density"] for m in history if "mask_density" in m]
    report = TrainingReport(
        optimizer_steps=len(history),
        examples=len(chunks),
        final_loss=history[-1]["loss"],
        mean_mask_density=sum(densities) / len(densities) if densities else None,
        merge_max_abs_error=merge_error,
        seconds=time.monotonic() - started,
        history=history,
    )
    return vector, report


def _optimizer_step(model, parameters, optimizer, method: MethodSpec, pad_id: int, device: torch.device,
                    forget: list[Example], random_labels: list[Example] | None) -> dict[str, Any]:
    optimizer.zero_grad(set_to_none=True)
    forget_loss = continuation_loss(model, collate(forget, pad_id, device))
    loss = method.forget_weight * forget_loss
    metrics: dict[str, Any] = {"forget_loss": forget_loss.item()}
    if random_labels is not None:
        random_label_loss = continuation_loss(model, collate(random_labels, pad_id, device))
        loss = loss + method.random_label_weight * random_label_loss
        metrics["random_label_loss"] = random_label_loss.item()
    loss.backward()
    metrics["loss"] = loss.item()
    metrics["grad_norm"] = float(torch.norm(torch.stack([p.grad.detach().norm() for p in parameters])))

    if not method.uses_saliency_mask:
        optimizer.step()
        return metrics

    masks, threshold = saliency_masks(parameters, method.saliency_std)
    before = [p.detach().clone() for p in parameters]
    for parameter, mask in zip(parameters, masks):
        parameter.grad.mul_(mask)
    optimizer.step()
    with torch.no_grad():
        for parameter, mask, previous in zip(parameters, masks, before):
            parameter.copy_(torch.where(mask, parameter, previous))
    salient = sum(int(m.sum()) for m in masks)
    metrics["mask_density"] = salient / sum(m.numel() for m in masks)
    metrics["saliency_threshold"] = threshold
    return metrics


def _lora_layers(peft_model):
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name.removeprefix(prefix) + ".weight", module


def _extract_factors(peft_model) -> TaskVector:
    vector = TaskVector()
    for weight_name, module in _lora_layers(peft_model):
        if getattr(module, "fan_in_fan_out", False):
            raise NotImplementedError(f"{weight_name}: fan_in_fan_out LoRA layers are not supported")
        vector.factors[weight_name] = LoraFactors(
            a=module.lora_A["default"].weight.detach().float().cpu().clone(),  # (r, in)
            b=module.lora_B["default"].weight.detach().float().cpu().clone(),  # (out, r)
            scale=float(module.scaling["default"]),
        )
    return vector


def _merge_error(peft_model, vector: TaskVector) -> float:
    """Merge each adapter into its weight, compare (merged - previous) with the factors, then unmerge.

    The task vector is defined as theta_ft - theta_prev. It is stored as its
    factors, which give the same tensor up to the float32 rounding of the
    merge. This measures that rounding, so every step records it.
    """
    worst = 0.0
    with torch.no_grad():
        for weight_name, module in _lora_layers(peft_model):
            previous = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=["default"])
            merged = module.get_base_layer().weight.detach().clone()
            module.unmerge()
            module.get_base_layer().weight.copy_(previous)  # unmerge subtracts, which can leave rounding residue
            difference = (merged.float() - previous.float()).cpu() - vector.delta(weight_name)
            worst = max(worst, float(difference.abs().max()))
    return worst

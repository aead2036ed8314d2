"""Bytes of a step's task vector stored as LoRA factors versus as dense deltas (float32).

Sizes are computed from the model shapes (no model is downloaded): a LoRA
update of an (out x in) weight with rank r stores r * (in + out) numbers, its
dense delta out * in. For SmolLM2-135M with r=16 on q_proj and v_proj the
script also writes real task vector files with random tensors of those
shapes through ``lethe_trainer.taskvector`` and reports their size on disk,
so the safetensors header overhead is visible.

Usage: PYTHONPATH=trainer python benchmarks/task_vector_bytes.py [--output FILE] [--no-measure]
Prints a markdown table to stdout (and writes it to FILE if given).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BYTES_PER_NUMBER = 4  # float32
ATTENTION = ("q_proj", "v_proj")
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of one projection's weight."""
        q_width = self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        return {
            "q_proj": (q_width, self.hidden),
            "k_proj": (kv_width, self.hidden),
            "v_proj": (kv_width, self.hidden),
            "o_proj": (self.hidden, q_width),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }[module]

    def weight_name(self, layer: int, module: str) -> str:
        group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        return f"model.layers.{layer}.{group}.{module}.weight"


SMOLLM2_135M = ModelShape("SmolLM2-135M", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536)
LLAMA_8B = ModelShape("Llama-3.1-8B", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336)


def counts(model: ModelShape, modules: tuple[str, ...], rank: int) -> tuple[int, int, int]:
    """(matrices, factored numbers, dense numbers) over all layers."""
    factored = dense = 0
    for module in modules:
        out_features, in_features = model.module_shape(module)
        factored += rank * (in_features + out_features)
        dense += out_features * in_features
    return model.layers * len(modules), model.layers * factored, model.layers * dense


def _mib(count: int) -> str:
    return f"{count / 2**20:,.2f}"


def measure(model: ModelShape, modules: tuple[str, ...], rank: int, directory: Path) -> tuple[int, int]:
    """Sizes on disk of a factored and of a dense task vector file with random tensors of the model's shapes."""
    import torch

    from lethe_trainer.taskvector import LoraFactors, TaskVector

    generator = torch.Generator().manual_seed(0)
    factored = TaskVector()
    dense = TaskVector()
    for layer in range(model.layers):
        for module in modules:
            out_features, in_features = model.module_shape(module)
            name = model.weight_name(layer, module)
            factors = LoraFactors(a=torch.randn(rank, in_features, generator=generator),
                                  b=torch.randn(out_features, rank, generator=generator), scale=2.0)
            factored.factors[name] = factors
            dense.dense[name] = factors.dense()
    factored_path = directory / "factored.safetensors"
    dense_path = directory / "dense.safetensors"
    factored.save(factored_path)
    dense.save(dense_path)
    return factored_path.stat().st_size, dense_path.stat().st_size


def table(*, measure_files: bool) -> str:
    rows = ["| model | LoRA targets | rank | matrices | factored numbers | factored MiB | dense numbers | "
            "dense MiB | dense / factored |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    cases = [(SMOLLM2_135M, ATTENTION, "q,v"), (SMOLLM2_135M, ALL_SEVEN, "all seven"),
             (LLAMA_8B, ATTENTION, "q,v"), (LLAMA_8B, ALL_SEVEN, "all seven")]
    rank = 16
    for model, modules, label in cases:
        matrices, factored, dense = counts(model, modules, rank)
        rows.append(f"| {model.name} | {label} | {rank} | {matrices} | {factored:,} | "
                    f"{_mib(factored * BYTES_PER_NUMBER)} | {dense:,} | {_mib(dense * BYTES_PER_NUMBER)} | "
                    f"{dense / factored:,.1f} |")
    lines = rows
    if measure_files:
        with tempfile.TemporaryDirectory(prefix="lethe-tv-bytes-") as scratch:
            factored_bytes, dense_bytes = measure(SMOLLM2_135M, ATTENTION, rank, Path(scratch))
        _, factored, dense = counts(SMOLLM2_135M, ATTENTION, rank)
        lines += ["",
                  "Measured safetensors files (SmolLM2-135M, q,v, r=16, random float32 tensors):",
                  "",
                  "| file | bytes on disk | tensor bytes | header and metadata bytes |",
                  "| --- | ---: | ---: | ---: |",
                  f"| factored (lora_a + lora_b) | {factored_bytes:,} | {factored * BYTES_PER_NUMBER:,} | "
                  f"{factored_bytes - factored * BYTES_PER_NUMBER:,} |",
                  f"| dense deltas | {dense_bytes:,} | {dense * BYTES_PER_NUMBER:,} | "
                  f"{dense_bytes - dense * BYTES_PER_NUMBER:,} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--no-measure", action="store_true", help="skip writing the measured files (needs torch)")
    args = parser.parse_args(argv)
    text = table(measure_files=not args.no_measure)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

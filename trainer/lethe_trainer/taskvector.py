"""Task vectors: what one unlearning step changed, kept in LoRA-factored form.

A LoRA update of a weight matrix W (out x in) is exactly
``scale * B @ A`` with A (r x in), B (out x r) and ``scale = alpha / r``, so a
step's task vector is stored as its factors and rebuilt into a dense delta
when applied. Storing factors keeps a step's vector at a few megabytes even
for multi-billion-parameter models. Parameters that were trained densely (none
in the current methods) are kept as dense tensors.

Negation is ``theta_new = theta_prev - negation_scale * tau``. It is computed
by ``negate`` alone, in float32, and the trainer and the lineage rebuild
both call it, so a rebuilt head equals the trainer's head bit for bit on the
same device and library versions.

File format: one safetensors file. Tensor keys are ``<weight name>.lora_a``,
``<weight name>.lora_b`` and ``<weight name>.dense``; the header metadata holds
the format tag and a JSON map from weight name to scale.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "lethe-task-vector/1"


@dataclasses.dataclass
class LoraFactors:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float  # alpha / r

    def dense(self) -> torch.Tensor:
        return self.scale * (self.b.float() @ self.a.float())  # (out, in)


@dataclasses.dataclass
class TaskVector:
    """Per-weight update of one step, keyed by the weight's name in the model's state dict."""

    factors: dict[str, LoraFactors] = dataclasses.field(default_factory=dict)
    dense: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(set(self.factors) | set(self.dense))

    def delta(self, name: str) -> torch.Tensor:
        if name in self.factors:
            return self.factors[name].dense()
        return self.dense[name].float()

    def parameter_count(self) -> int:
        """Count the stored numbers (factored), not the dense size."""
        return sum(f.a.numel() + f.b.numel() for f in self.factors.values()) + sum(
            t.numel() for t in self.dense.values())

    def dense_parameter_count(self, shapes: Mapping[str, torch.Size]) -> int:
        return sum(shapes[name].numel() for name in self.names())

    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        scales: dict[str, float] = {}
        for name, factors in self.factors.items():
            tensors[f"{name}.lora_a"] = factors.a.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_b"] = factors.b.detach().float().contiguous().cpu()
            scales[name] = factors.scale
        for name, tensor in self.dense.items():
            tensors[f"{name}.dense"] = tensor.detach().float().contiguous().cpu()
        save_file(tensors, str(path), metadata={"format": FORMAT, "scales": json.dumps(scales, sort_keys=True)})

    @classmethod
    def load(cls, path: Path) -> "TaskVector":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"task vector {path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
        scales = json.loads(metadata.get("scales", "{}"))
        tensors = load_file(str(path))
        vector = cls()
        for key, tensor in tensors.items():
            name, _, part = key.rpartition(".")
            if part == "dense":
                vector.dense[name] = tensor
            elif part == "lora_a":
                vector.factors[name] = LoraFactors(a=tensor, b=tensors[f"{name}.lora_b"], scale=float(scales[name]))
        return vector


def negate(state: Mapping[str, torch.Tensor], vector: TaskVector, negation_scale: float) -> dict[str, torch.Tensor]:
    """Return ``state - negation_scale * tau`` for the weights tau touches; other tensors are shared."""
    result = dict(state)
    for name in vector.names():
        if name not in state:
            raise KeyError(f"task vector names weight {name!r}, which the model does not have")
        previous = state[name]
        delta = vector.delta(name).to(previous.device)
        result[name] = (previous.float() - negation_scale * delta).to(previous.dtype)
    return result

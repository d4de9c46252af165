"""Parameter and memory sums for a model with LoRA, without loading any weights.

The model is built on the meta device and the adapter is really attached, so the
counts come from the same code that trains: per adapted module r * (in + out)
parameters (Hu et al., 2021, arXiv:2106.09685, sec. 4.2).

Training memory counts weights, gradients and AdamW's two float32 moments:
full fine-tuning keeps a gradient and two moments for every parameter, LoRA only for
the adapter (kept in float32). Excluded: activations, temporary buffers, float32
master weights of mixed-precision recipes, and framework / CUDA overhead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .attach import attach, trainable_parameters
from .config import LoraConfig
from .pretrained import build_meta

ADAM_STATE_BYTES = 8  # two float32 moments per trained parameter
ADAPTER_BYTES = 4  # adapters train in float32


@dataclass(frozen=True)
class Report:
    model: str
    rank: int
    alpha: float
    by_type: dict[str, tuple[int, int]]
    base_params: int
    trainable_params: int
    trainable_percent: float
    adapter_bytes_fp32: int
    adapter_bytes_bf16: int
    weight_dtype: str
    memory_lora_bytes: int
    memory_full_bytes: int
    expert_tensors: int = 0  # fused MoE expert tensors adapted, each with ``experts`` low-rank updates
    experts: int = 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["by_type"] = {k: {"modules": n, "params": p} for k, (n, p) in self.by_type.items()}
        return data


def inspect_model(spec: str, config: LoraConfig, weight_dtype: torch.dtype = torch.bfloat16) -> Report:
    """Counts and memory estimate for adapting ``spec`` with ``config``."""
    model = build_meta(spec)
    attach(model, config)
    counts = trainable_parameters(model)
    weight_bytes = torch.empty((), dtype=weight_dtype).element_size()
    return Report(
        model=spec,
        rank=config.rank,
        alpha=config.alpha,
        by_type=counts.by_type,
        base_params=counts.base,
        trainable_params=counts.trainable,
        trainable_percent=round(counts.percent, 4),
        adapter_bytes_fp32=counts.trainable * 4,
        adapter_bytes_bf16=counts.trainable * 2,
        weight_dtype=str(weight_dtype).removeprefix("torch."),
        memory_lora_bytes=counts.base * weight_bytes + counts.trainable * (2 * ADAPTER_BYTES + ADAM_STATE_BYTES),
        memory_full_bytes=counts.base * (2 * weight_bytes + ADAM_STATE_BYTES),
        expert_tensors=counts.expert_tensors,
        experts=counts.experts,
    )

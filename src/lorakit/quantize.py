"""Quantized frozen bases: QLoRA (Dettmers et al., arXiv:2305.14314).

    y = x Q(W)^T + b + (alpha / r) B A x

Only the frozen W is quantized; A and B stay float32 and train as on any base. The
quantized weights are torchao's tensors, which run on CPU and CUDA alike:

- ``nf4``: 4-bit NormalFloat in blocks of 64 weights, each block's scale itself
  quantized to 8 bits in blocks of 256 (double quantization): about 0.52 bytes per
  weight. The forward dequantizes to bfloat16 and multiplies.
- ``int8``: one int8 per weight and one scale per output row (symmetric, weight-only).

Every ``nn.Linear`` except the output head is quantized (for nf4: those whose size is a
multiple of the 64-weight block, which is every projection of the usual LLMs);
embeddings, norms and the head stay in bfloat16, as in QLoRA. The rest of the model is cast to bfloat16 first, the
compute dtype of both kinds. A quantized weight stays under the plain ``weight`` key
(torchtune does the same), so the base keys of ``state_dict()`` do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from . import frozen
from .attach import output_head
from .frozen import QUANTIZATIONS, QuantizeError, quantizable, quantizer
from .layers import LoraLayer


def check_quantization(method: str | None) -> None:
    if method is not None and method not in QUANTIZATIONS:
        raise QuantizeError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize ``model``'s linear weights in place (see the module docstring); returns it.

    Checks everything first: an unknown method, adapters already attached, or layers
    that cannot be quantized (Conv2d) raise before any weight changes."""
    check_quantization(method)
    problems = []
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            problems.append(f"{path}: has LoRA adapters; quantize the base before attaching")
        elif isinstance(module, nn.Conv2d):
            problems.append(f"{path}: Conv2d cannot be quantized (only linear layers can)")
        elif isinstance(module, nn.Linear) and frozen.is_quantized(module.weight):
            problems.append(f"{path}: already quantized ({frozen.quantization(module.weight)})")
    if problems:
        raise QuantizeError(f"cannot quantize the model to {method}:\n  " + "\n  ".join(problems[:10]))
    head = output_head(model)
    model.to(torch.bfloat16).requires_grad_(False)
    make = quantizer(method)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head and quantizable(module.weight, method):
            module.weight = nn.Parameter(make(module.weight.data), requires_grad=False)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every quantized weight by its dense value in ``dtype`` (in place); returns the model."""
    for module, weight in _quantized(model):
        module.weight = nn.Parameter(frozen.dense(weight).to(dtype), requires_grad=False)
    return model.to(dtype)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized weights with their scales, bytes of the same weights in bfloat16)."""
    weights = [weight for _, weight in _quantized(model)]
    return sum(frozen.nbytes(weight) for weight in weights), sum(2 * weight.numel() for weight in weights)


def _quantized(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, weight) for every quantized weight of ``model``."""
    return [(module, module.weight) for module in model.modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and frozen.is_quantized(module.weight)]

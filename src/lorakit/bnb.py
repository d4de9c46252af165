"""LoRA on models quantized by transformers + bitsandbytes (``BitsAndBytesConfig``).

    y = bnb_module(x) + (alpha / r) B A x

A bitsandbytes ``Linear4bit``/``Linear8bitLt`` computes its own base output: its
kernels depend on state it keeps on the module (4-bit weights repacked for the CPU
kernel at the first inference call, the int8 outlier threshold), and reproducing them
outside would give different bits from the same model without adapters. So the
module keeps its ``weight``/``bias`` (the very objects this layer registers, so
``state_dict`` holds them once, under the base keys) and is called as the base.

bitsandbytes is never imported here: a model that holds these modules has imported it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import LoraLinear


BNB_MODULES = ("Linear4bit", "Linear8bitLt")


def is_bnb_linear(module: nn.Module) -> bool:
    return (type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)
            and any(cls.__name__ in BNB_MODULES for cls in type(module).__mro__))


class LoraBnbLinear(LoraLinear):
    """A bitsandbytes linear layer with LoRA adapters; the module computes the base."""

    single_matrix = False  # its weight is packed: nothing to factor
    scalable_outputs = False  # the module computes the whole base output, bias included
    dense_update = False  # nor can a dense ΔW be added to its packed weight

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        # LoraLayer took the tensors out of the base module; give them back to it so that
        # its forward reads them (the same Parameter objects: nothing is copied).
        base.register_parameter("weight", self.weight)
        base.register_parameter("bias", self.bias)

    def base_forward(self, x: Tensor) -> Tensor:
        return self.base_module(x)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # weight, bias and the quantization statistics, exactly as bitsandbytes writes
        # them (the adapters are submodules: state_dict visits them on its own)
        self.base_module._save_to_state_dict(destination, prefix, keep_vars)

    def output_dtype(self, x: Tensor) -> torch.dtype:
        return x.dtype  # the module returns its input's dtype

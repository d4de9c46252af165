"""Plain LoRA: the adapter every variant builds on.

    y = base(x) + s · B A dropout(x),   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
A (r x in) starts Kaiming-uniform and B (out x r) at zero, so a fresh adapter leaves
every output exactly as the base computes it.

``LoraAdapter`` is the variant seam. An adapter module owns what is particular to its
kind, and the rest of lorakit asks it, never its type:

- ``initialise(layer)``: its first values (and whatever it changes in the layer);
- ``forward(layer, x, base, result, sign)``: ``result`` plus its contribution;
- ``merged_weight`` / ``unmerged_weight``, and the value-level ``merge_value``;
- ``release(layer)``: give back what it moved into W, before it goes;
- ``value(layer)`` / ``exported(layer)``: its weights as a ``LayerWeights`` (as it is, and
  as a file others can load);
- ``extras``: tensors besides A and B, under their module attribute = file key suffix
  (``tensor_shapes``: all of them on a given layer);
- and what it supports: ``additive``, ``plain``, ``fusable``, ``servable``, ``combinable``,
  ``shardable``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import frozen
from ..adapter import LayerWeights
from ..config import LoraConfig

if TYPE_CHECKING:
    from ..layers import LoraLayer


def factor_dtype(layer: LoraLayer) -> torch.dtype:
    """The dtype of an adapter's tensors on ``layer``: the base's, or float32 for a
    half-precision base, whose bf16/fp16 would lose most of the small update's bits (PEFT
    does the same)."""
    base_dtype = frozen.compute_dtype(layer.weight)
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class LoraAdapter(nn.Module):
    """One adapter on one layer: A, B, its dropout and its scaling. Merged, it is W + ΔW."""

    additive = True  # its merge adds ΔW: it can be subtracted on the fly and unmerged exactly
    plain = True  # its update is s·B·A·x and nothing else (the sole-adapter path; kohya files)
    fusable = False  # not plain, yet as a layer's only adapter it computes the whole output itself
    servable = True  # a serving slot (plain A and B per row) computes it in a mixed batch
    combinable = True  # its ΔW is a low-rank product that combine/compress can add and re-factor
    shardable = True  # trains under FSDP2 (its initial values need no base weight)
    extras: tuple[str, ...] = ()  # tensors besides lora_A / lora_B (their file key suffixes)

    def __init__(self, layer: LoraLayer, rank: int, alpha: float, config: LoraConfig) -> None:
        super().__init__()
        dtype, device = factor_dtype(layer), layer.weight.device
        a_shape, b_shape = layer.shapes(layer.base_module, rank)
        self.rank = rank
        self.alpha = alpha
        self.init = config.init
        self.scaling = config.scaling(alpha, rank)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def describe(cls, config: LoraConfig) -> str:
        """How messages name this kind of adapter."""
        return f"variant {config.variant}"

    @classmethod
    def check_config(cls, config: LoraConfig) -> str | None:
        """Why this kind cannot take ``config``'s settings, or None."""
        return None

    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        """Why this kind cannot go on ``base`` (``layer_class`` would wrap it), or None."""
        return None

    def initialise(self, layer: LoraLayer) -> None:
        """The first values: the layer type's draw of A and B (B zero, so nothing changes)."""
        layer.draw_factors(self.lora_A, self.lora_B, self.init)

    def forward(self, layer: LoraLayer, x: Tensor, base: Tensor | None, result: Tensor | None,
                sign: float = 1.0) -> Tensor:
        """``result`` plus ``sign`` times this adapter's change of ``layer``'s output for input
        ``x`` (``base``: the frozen layer's own output, which variants may rescale). Called
        for the layer's sole adapter before any base output exists (``result`` None), it
        returns the whole output: its update first, the base product accumulated onto it."""
        if result is None:
            return layer.base_forward_onto(self, x)
        return layer.add_update(result, self, x, sign)

    def idle(self, layer: LoraLayer, x: Tensor, result: Tensor) -> Tensor:
        """The layer's output while this adapter is neither in use nor merged (variants that
        moved part of W into themselves add it back here)."""
        return result

    def merged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """W + ΔW for ``weight`` = W in float32, laid out like ``layer.weight``."""
        return self.merge_value(weight, self.value(layer))

    def unmerged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """The inverse of ``merged_weight``."""
        return weight - self.value(layer).delta()

    @staticmethod
    def merge_value(weight: Tensor, value: LayerWeights) -> Tensor:
        """W (float32, any device) with ``value`` merged in, without a model."""
        return weight + value.delta().to(weight.device)

    def release(self, layer: LoraLayer) -> None:
        """Give back to ``layer`` what this adapter took from W (it is about to go, unmerged)."""

    def value(self, layer: LoraLayer, tensors: dict[str, Tensor] | None = None) -> LayerWeights:
        """This adapter as a plain value (detached, not copied); ``tensors``: its parameters by
        name from elsewhere (an FSDP gather) instead of its own."""
        tensors = tensors if tensors is not None else {n: p.detach() for n, p in self.named_parameters()}
        return LayerWeights(tensors["lora_A"], tensors["lora_B"], self.scaling, layer.layout,
                            {name: tensors[name] for name in self.extras})

    def exported(self, layer: LoraLayer) -> LayerWeights:
        """The value an adapter file holds for other tools: relative to the base they load."""
        return self.value(layer)

    def load(self, value: LayerWeights) -> None:
        """Copy ``value``'s tensors (checked to fit) into this adapter's parameters."""
        with torch.no_grad():
            self.lora_A.copy_(value.A)
            self.lora_B.copy_(value.B)
            for name in self.extras:
                getattr(self, name).copy_(value.extras[name].reshape(getattr(self, name).shape))

    @classmethod
    def extra_shapes(cls, layer_class: type[LoraLayer], base: nn.Module) -> dict[str, tuple[int, ...]]:
        """The shape each of ``extras`` has on ``base`` (wrapped by ``layer_class``)."""
        return {}

    @classmethod
    def tensor_shapes(cls, layer_class: type[LoraLayer], base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of this kind of adapter on ``base`` at ``rank``, by its file key suffix."""
        return {**dict(zip(("lora_A", "lora_B"), layer_class.shapes(base, rank))), **cls.extra_shapes(layer_class, base)}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


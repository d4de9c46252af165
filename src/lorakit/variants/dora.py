"""DoRA: weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖        (norm per output unit)

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353. Each
output unit's weight row is split into a magnitude m (learned; it starts at the row's
norm, so a fresh adapter changes nothing) and a direction, which LoRA adapts. As the
paper suggests (§4.3) the norm n = ‖W + s·B·A‖ is a constant in backward, so with
p = m / n the layer computes

    y = base(x) + (p - 1) ⊙ (x W^T) + p ⊙ s·x (B A)^T

(x W^T is the base output without its bias; with dropout in training it is computed
on the dropped input, as PEFT does). n comes from the factors, never from W + s·B·A:

    n² = ‖W‖² + 2s·rowsum(B ⊙ (W A^T)) + s²·rowsum((B A A^T) ⊙ B)

where ‖W‖² per row is cached while W is unchanged: one (out x in x r) product per call
against PEFT's dense W + s·B·A and its norm.

Merged, W <- p ⊙ (W + s·B·A); unmerging divides p back out with the n of the merge and
subtracts s·B·A, which restores W to float32 rounding (a few ulps, tested). A merge is
not additive: a merged DoRA adapter cannot be taken out on the fly (``disabled`` or
deactivating raises) and several merged adapters unmerge newest first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import frozen
from ..adapter import LayerWeights
from ..layouts import Layout
from ..config import LoraConfig
from .lora import LoraAdapter

if TYPE_CHECKING:
    from ..layers import LoraLayer

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, as module attribute and file key


def magnitude_shape(layout: Layout, out_features: int) -> tuple[int, ...]:
    """The shape PEFT gives ``lora_magnitude_vector``: one value per output unit, laid out
    to broadcast over a Conv2d's output."""
    return (1, out_features, 1, 1) if layout.kernel else (out_features,)


class DoraAdapter(LoraAdapter):
    """LoRA's A and B plus a magnitude per output unit."""

    display = "DoRA"
    additive = False
    plain = False  # it rescales the base output
    servable = False  # a serving slot adds B·A·x per row; DoRA would need the base rescaled per row
    combinable = False  # its change of W is not a sum of low-rank terms
    shardable = False
    peft_config = {"peft_type": "LORA", "use_dora": True}
    kohya_names = None  # kohya's dora_scale is another parametrisation
    extras = (MAGNITUDE,)

    def __init__(self, layer: LoraLayer, rank: int, alpha: float, config: LoraConfig) -> None:
        super().__init__(layer, rank, alpha, config)
        out_features = layer.dims(layer.base_module)[1]
        self.lora_magnitude_vector = nn.Parameter(torch.ones(magnitude_shape(layer.layout, out_features),
                                                             device=self.lora_A.device, dtype=self.lora_A.dtype))
        # (the tensors and versions they were computed from, the values): ‖W‖² per row, and n
        self._row_norms: tuple[tuple, Tensor] | None = None
        self._norm: tuple[tuple, Tensor] | None = None
        self._merged_norm: Tensor | None = None

    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        if not layer_class.scalable_outputs:
            return (f"DoRA is not supported on {type(base).__name__} (Linear, GPT-2 Conv1D, Embedding and Conv2d "
                    "take it)")
        return None

    @classmethod
    def extra_shapes(cls, layer_class: type[LoraLayer], base: nn.Module) -> dict[str, tuple[int, ...]]:
        return {MAGNITUDE: magnitude_shape(layer_class.layout, layer_class.dims(base)[1])}

    def initialise(self, layer: LoraLayer) -> None:
        super().initialise(layer)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.norm(layer).reshape(self.lora_magnitude_vector.shape))

    def norm(self, layer: LoraLayer) -> Tensor:
        """n = ‖W + s·B·A‖ per output unit (float32, no gradient), from the factors; kept
        until W, A or B change (every step in training; never while generating)."""
        key = (_version(layer.weight), _version(self.lora_A), _version(self.lora_B))
        if self._norm is not None and _same(self._norm[0], key):
            return self._norm[1]
        with torch.no_grad():
            A = self.lora_A.detach().float().flatten(1)  # (r, in)
            B = self.lora_B.detach().float().flatten(1) * self.scaling  # (out, r)
            W = layer.layout.matrix(frozen.dense(layer.weight))  # (out, in)
            squares = self._weight_squares(layer.weight, W)
            cross = (B * (W @ A.T)).sum(1)  # (out, r) ⊙ (out, r)
            update = ((B @ (A @ A.T)) * B).sum(1)
            norm = (squares + 2 * cross + update).clamp(min=0).sqrt()
        self._norm = (key, norm)
        return norm

    def _weight_squares(self, weight: Tensor, W: Tensor) -> Tensor:
        key = (_version(weight),)
        if self._row_norms is None or not _same(self._row_norms[0], key):
            self._row_norms = (key, (W * W).sum(1))
        return self._row_norms[1]

    def forward(self, layer: LoraLayer, x: Tensor, base: Tensor, result: Tensor, sign: float = 1.0) -> Tensor:
        scale = (self.lora_magnitude_vector.flatten() / self.norm(layer)).reshape(_broadcast(layer, base))
        if isinstance(self.dropout, nn.Identity) or not self.training:  # the base output is x W^T + b
            dropped = x
            plain = base if layer.bias is None else base - layer.bias.reshape(_broadcast(layer, base))
        else:
            dropped = self.dropout(x)
            plain = layer.base_product(dropped)
        update = self.update(layer, dropped, dropout=False)
        return result + ((scale - 1) * plain + scale * update).to(result.dtype)

    def merged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        merged, self._merged_norm = merged_direction(weight, self.value(layer))
        return merged

    def unmerged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        value = self.value(layer)
        return weight / _per_row(value, self._merged_norm, weight) - value.delta()

    @staticmethod
    def merge_value(weight: Tensor, value: LayerWeights) -> Tensor:
        return merged_direction(weight, value)[0]


def merged_direction(weight: Tensor, value: LayerWeights) -> tuple[Tensor, Tensor]:
    """m ⊙ (W + s·B·A) / n for W = ``weight`` (float32, laid out like the module's weight),
    and n, the norm it divided by."""
    updated = weight + value.delta().to(weight.device)
    norm = value.layout.matrix(updated).norm(dim=1)
    return updated * _per_row(value, norm, weight), norm


def _per_row(value: LayerWeights, norm: Tensor, weight: Tensor) -> Tensor:
    """m / n shaped to multiply ``weight`` output unit by output unit."""
    scale = value.tensors[MAGNITUDE].float().flatten().to(weight.device) / norm
    if value.layout.out_dim == 1:  # W is (in, out): an output unit is a column
        return scale.reshape(1, -1)
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def _version(tensor: Tensor) -> tuple[Tensor, int]:
    """The tensor itself (held, so that a new one can never pass for it) and its in-place
    version counter (quantized tensors have none: they are replaced, never changed)."""
    return tensor, getattr(tensor, "_version", 0)


def _same(cached: tuple, now: tuple) -> bool:
    return all(a[0] is b[0] and a[1] == b[1] for a, b in zip(cached, now))


def _broadcast(layer: LoraLayer, output: Tensor) -> tuple[int, ...]:
    """The shape of a per-output-unit vector against the layer's output."""
    if layer.layout.kernel:
        return (1, -1) + (1,) * (output.dim() - 2)
    return (-1,)

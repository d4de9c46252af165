"""Plain LoRA: the kind every LoRA variant builds on.

    y = base(x) + s · B A dropout(x),   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
A (r x in) starts Kaiming-uniform and B (out x r) at zero, so a fresh adapter leaves
every output exactly as the base computes it. How B·A lies in each module's weight is
the layout's (layouts.py); how A and B act on each layer's input is the layer's
(``down``, ``up``, layers.py).

The order of the sums is where the unmerged overhead is decided: as a Linear's or
Conv1D's only adapter in use, its update and the bias are written first and the base
product x W^T accumulates onto them in the same GEMM (``frozen.linear_onto``); otherwise
its second matmul accumulates into the base output. Plain LoRA is additive, plain, servable, combinable and
shardable, and each file format holds it; a subclass that changes the math says no where
it must (DoRA, PiSSA/OLoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import LayerWeights
from ..config import LoraConfig
from ..layouts import LINEAR, Layout, peft_layout
from .kind import Kind, factor_dtype

if TYPE_CHECKING:
    from ..layers import LoraLayer

__all__ = ["LoraAdapter", "factor_dtype", "lora_value"]

_NO_DROPOUT = nn.Identity()


class LoraAdapter(Kind):
    """One adapter on one layer: A, B, its dropout and its scaling. Merged, it is W + ΔW."""

    display = "LoRA"
    additive = True
    plain = True  # its update is s·B·A·x and nothing else (the sole-adapter path; kohya files)
    servable = True
    combinable = True
    shardable = True
    peft_config = {"peft_type": "LORA"}
    kohya_names = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
    diffusers = True
    extras: tuple[str, ...] = ()  # tensors besides lora_A / lora_B (their file key suffixes)

    def __init__(self, layer: LoraLayer, rank: int, alpha: float, config: LoraConfig) -> None:
        super().__init__(layer, rank, alpha, config)  # lora_A, lora_B (and extras) at zero until initialise
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    # -- the value -------------------------------------------------------------------
    @classmethod
    def tensor_shapes(cls, layer_class: type[LoraLayer], base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        return {**dict(zip(("lora_A", "lora_B"), layer_class.shapes(base, rank))), **cls.extra_shapes(layer_class, base)}

    @classmethod
    def extra_shapes(cls, layer_class: type[LoraLayer], base: nn.Module) -> dict[str, tuple[int, ...]]:
        """The shape each of ``extras`` has on ``base`` (wrapped by ``layer_class``)."""
        return {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return ("lora_A", "lora_B", *cls.extras)

    @classmethod
    def tensors_problem(cls, names: set[str]) -> str | None:
        if not {"lora_A", "lora_B"} <= names:
            return "needs both lora_A and lora_B"
        absent = [name for name in cls.extras if name not in names]
        if absent:
            return f"missing {absent[0]} (a {cls.__name__} has one per module)"
        unknown = sorted(names - set(cls.names()))
        return f"unexpected tensor {unknown[0]} (not a tensor of a {cls.__name__})" if unknown else None

    @classmethod
    def file_layout(cls, names: set[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> Layout:
        return peft_layout(names, tensors, fan_in_fan_out)

    @classmethod
    def delta_of(cls, value: LayerWeights) -> Tensor:
        """s·B·A in float32, laid out like the module's weight."""
        return value.layout.product(value.A.float(), value.B.float()) * value.scaling

    @classmethod
    def rank_of(cls, value: LayerWeights) -> int:
        return value.layout.rank(value.A)

    @classmethod
    def update_shape(cls, value: LayerWeights) -> tuple[int, ...]:
        return value.layout.update_shape(value.A, value.B)

    @classmethod
    def value_problem(cls, value: LayerWeights, rank: int | None) -> str | None:
        A, B = value.A, value.B
        if rank is not None and (value.layout.rank(A) != rank or value.layout.up_rank(B) != rank):
            return f"A {tuple(A.shape)}, B {tuple(B.shape)}; expected rank {rank} (config)"
        return None

    @classmethod
    def kohya_tensors(cls, value: LayerWeights) -> dict[str, Tensor]:
        return {"lora_down.weight": value.A, "lora_up.weight": value.B,
                "alpha": torch.tensor(value.scaling * value.rank, dtype=torch.float32)}

    @classmethod
    def from_kohya(cls, name: str, part: dict[str, Tensor], alpha: float, layer_class: type[LoraLayer], base: nn.Module,
                   shape: tuple[int, ...]) -> tuple[str | None, LayerWeights | None, int]:
        missing = [p for p in ("lora_down.weight", "lora_up.weight") if p not in part]
        if missing:
            return f"missing {', '.join(f'{name}.{p}' for p in missing)}", None, 0
        A, B = part["lora_down.weight"], part["lora_up.weight"]
        rank = A.shape[0] if A.dim() else 0
        expected = layer_class.shapes(base, max(rank, 1))
        if tuple(A.shape) != expected[0] or tuple(B.shape) != expected[1]:
            return (f"{name}.lora_down.weight {tuple(A.shape)} / {name}.lora_up.weight {tuple(B.shape)} do not fit: "
                    f"expected {expected[0]} / {expected[1]}"), None, 0
        return None, lora_value(A, B, alpha / rank, layer_class.layout, cls), rank

    # -- on a layer ------------------------------------------------------------------
    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        return None

    def initialise(self, layer: LoraLayer) -> None:
        """The first values: the layer type's draw of A and B (B zero, so nothing changes)."""
        layer.draw_factors(self.lora_A, self.lora_B, self.init)

    def first_values(self, layer: LoraLayer) -> dict[str, Tensor]:
        fresh = {name: torch.empty(param.shape) for name, param in self.named_parameters()}
        layer.draw_factors(fresh["lora_A"], fresh["lora_B"], self.init)
        return fresh

    def update(self, layer: LoraLayer, x: Tensor, dropout: bool = True) -> Tensor:
        """s·B·A·dropout(x) as the layer's operations compute it, in the layer's output dtype."""
        hidden = layer.down(x, self.lora_A, self.dropout if dropout else _NO_DROPOUT)  # (..., r)
        return layer.up(hidden, self.lora_B, self.scaling).to(layer.output_dtype(x))

    def forward(self, layer: LoraLayer, x: Tensor, base: Tensor | None, result: Tensor | None,
                sign: float = 1.0) -> Tensor:
        """``result`` plus ``sign`` · s·B·A·dropout(x); as the layer's sole adapter (``result``
        None) the whole output, its update and the bias written first and the base product
        accumulated onto them (``base_forward_onto``)."""
        if result is None:
            hidden = layer.down(x.reshape(-1, x.shape[-1]), self.lora_A, self.dropout) * self.scaling  # (N, r)
            return layer.base_forward_onto(F.linear(hidden, self.lora_B, layer.bias), x)
        if layer.accumulates:
            return self._accumulate(layer, result, x, sign)
        update = self.update(layer, x)
        if layer.adds_in_place and update.dtype == result.dtype and not torch.is_grad_enabled():
            return result.add_(update, alpha=sign)
        return result + sign * update.to(result.dtype)

    def _accumulate(self, layer: LoraLayer, result: Tensor, x: Tensor, sign: float) -> Tensor:
        """``result`` + sign · the update on a layer whose base is a matrix product: the second
        matmul accumulates into ``result`` (GEMM with beta = 1), so no (tokens x out) temporary
        is written and read back. When the dtypes differ (half-precision base, float32
        adapter; autocast) the update is cast and added instead."""
        same = result.dtype == self.lora_A.dtype == self.lora_B.dtype
        if not same or result.dim() < 2 or torch.is_autocast_enabled(result.device.type):
            return result + sign * self.update(layer, x)
        hidden = layer.down(x, self.lora_A, self.dropout)  # (..., in) -> (..., r)
        flat = result.view(-1, result.shape[-1])  # (N, out), shares result's memory
        # flat += sign * scaling * (N, r) @ (r, out)
        flat.addmm_(hidden.reshape(-1, self.rank), self.lora_B.T, alpha=sign * self.scaling)
        return result

    def value(self, layer: LoraLayer, tensors: dict[str, Tensor] | None = None) -> LayerWeights:
        tensors = tensors if tensors is not None else {n: p.detach() for n, p in self.named_parameters()}
        return LayerWeights(type(self), {name: tensors[name] for name in self.names()}, self.scaling, layer.layout)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def lora_value(A: Tensor, B: Tensor, scaling: float, layout: Layout = LINEAR,
               kind: type[LoraAdapter] = LoraAdapter) -> LayerWeights:
    """A plain LoRA value from its pair (what combine, compress and serving build)."""
    return LayerWeights(kind, {"lora_A": A, "lora_B": B}, scaling, layout)

"""LoHa and LoKr (LyCORIS): updates built from products of small factors instead of B·A.

    LoHa  ΔW = s · (W1a W1b) ⊙ (W2a W2b)        Hyeon-Woo et al., "FedPara", arXiv:2108.06098
    LoKr  ΔW = s · W1 ⊗ (W2a W2b)               Yeh et al., "LyCORIS", arXiv:2309.14859
          (W2 whole when r ≥ max(its sides) / 2)

s = alpha / r, as PEFT. A Hadamard product of two rank-r matrices has rank up to r², and a
Kronecker product of (a x c) and (b x d) factors spans the whole (ab x cd) weight, so both
reach higher-rank updates than LoRA for the same parameter count.

The factors follow PEFT's ``LoHaConfig`` / ``LoKrConfig`` defaults exactly (names, shapes,
first values), so files move between the two both ways: on ``nn.Linear`` W (out, in) and on
``nn.Conv2d`` as the (out, in·kh·kw) matrix; LoKr splits out = a·b and in = c·d at the
divisor pair nearest the square root (a ≤ b, c ≤ d), W1 (a, c) is whole and W2 (b, d) is a
rank-r pair unless r ≥ max(b, d) / 2. A fresh adapter is zero (LoHa's W2b, LoKr's W1 start
at zero).

ΔW is formed from the factors in each forward (there is no cheaper route through a Hadamard
or Kronecker product). As a Linear's only adapter in use it joins the base product,
x (W + ΔW)ᵀ + b: one GEMM forward and one per gradient, where PEFT computes x Wᵀ and x ΔWᵀ
apart; otherwise it is applied as the base operation with ΔW as its weight (x ΔWᵀ, or the
base's convolution). Merging adds the same ΔW.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..adapter import LayerWeights, product_delta
from ..config import VARIANTS as NAMES, LoraConfig
from .lora import LoraAdapter, factor_dtype

if TYPE_CHECKING:
    from ..layers import LoraLayer


def kronecker_split(dimension: int) -> tuple[int, int]:
    """(m, n), m·n = ``dimension``, m ≤ n, m the largest divisor at most √dimension: PEFT's and
    LyCORIS's ``factorization`` with its default factor -1."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def _matrix(layer_class: type[LoraLayer], base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of the weight the factors build: a Conv2d's in is its channels."""
    if layer_class.layout == "conv2d":
        return base.out_channels, base.in_channels, tuple(base.kernel_size)
    in_features, out_features = layer_class.dims(base)
    return out_features, in_features, ()


class ProductAdapter(LoraAdapter):
    """What LoHa and LoKr share: factors named as in PEFT's files, ΔW formed from them."""

    plain = False  # its update is not s·B·A·x
    fusable = True  # alone on a Linear: one product with W + ΔW instead of two
    servable = False  # a serving slot holds A and B
    combinable = False  # its ΔW is not a low-rank product
    shardable = False  # not tried under FSDP2
    extras: tuple[str, ...] = ()  # every factor name this kind may have (a module has some of them)

    def __init__(self, layer: LoraLayer, rank: int, alpha: float, config: LoraConfig) -> None:
        nn.Module.__init__(self)
        dtype = factor_dtype(layer)
        self.rank, self.alpha, self.init = rank, alpha, config.init
        self.scaling = config.scaling(alpha, rank)
        for name, shape in self.tensor_shapes(type(layer), layer.base_module, rank).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=layer.weight.device, dtype=dtype)))
        self.dropout = nn.Identity()

    @classmethod
    def describe(cls, config: LoraConfig) -> str:
        return NAMES[config.variant]  # "LoHa", "LoKr"

    @classmethod
    def check_config(cls, config: LoraConfig) -> str | None:
        if config.dropout:
            return "dropout is not defined for it (PEFT's rank_dropout / module_dropout are not supported)"
        if config.init != "default":
            return f"init {config.init!r} is not defined for it (only the default)"
        return None

    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        if layer_class.layout not in ("linear", "conv2d") or not layer_class.rescalable:
            return f"not supported on {type(base).__name__} (nn.Linear and nn.Conv2d take it, as in PEFT)"
        return None

    def factors(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())

    def forward(self, layer: LoraLayer, x: Tensor, base: Tensor | None, result: Tensor | None,
                sign: float = 1.0) -> Tensor:
        delta = product_delta(self.factors(), self.scaling).reshape(layer.weight.shape)
        if result is None:  # the layer's only adapter (sole_plain_adapter): x (W + ΔW)ᵀ + b, one GEMM
            return layer.weight_forward(x, layer.weight + delta, layer.bias)
        update = layer.weight_forward(x.to(delta.dtype), delta).to(result.dtype)  # x ΔWᵀ, or the base's conv
        return result + update if sign == 1.0 else result - update

    @staticmethod
    def merge_value(weight: Tensor, value: LayerWeights) -> Tensor:
        return weight + value.delta().reshape(weight.shape).to(weight.device)

    def value(self, layer: LoraLayer, tensors: dict[str, Tensor] | None = None) -> LayerWeights:
        tensors = tensors if tensors is not None else {n: p.detach() for n, p in self.named_parameters()}
        return LayerWeights(None, None, self.scaling, layer.layout, tensors, tuple(layer.weight.shape))

    def load(self, value: LayerWeights) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(value.extras[name])

    @classmethod
    def factor_problem(cls, names: set[str]) -> str | None:
        """What is wrong with a file module holding exactly these factors (None: a valid set)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters())
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, {shapes}"


class LohaAdapter(ProductAdapter):
    """LoHa: ΔW = s · (W1a W1b) ⊙ (W2a W2b); W1a, W1b, W2a Kaiming-uniform, W2b zero (PEFT)."""

    extras = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    @classmethod
    def tensor_shapes(cls, layer_class: type[LoraLayer], base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        out, in_, kernel = _matrix(layer_class, base)
        columns = in_ * math.prod(kernel)
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, columns),
                "hada_w2_a": (out, rank), "hada_w2_b": (rank, columns)}

    def initialise(self, layer: LoraLayer) -> None:
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    @classmethod
    def factor_problem(cls, names: set[str]) -> str | None:
        missing = [n for n in cls.extras if n not in names]
        return f"missing {missing[0]} (a LoHa module has {', '.join(cls.extras)})" if missing else None


class LokrAdapter(ProductAdapter):
    """LoKr: ΔW = s · W1 ⊗ W2; W1 zero, W2 (or W2a, W2b) Kaiming-uniform (PEFT)."""

    extras = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    @classmethod
    def tensor_shapes(cls, layer_class: type[LoraLayer], base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        out, in_, kernel = _matrix(layer_class, base)
        (a, b), (c, d) = kronecker_split(out), kronecker_split(in_)
        shapes = {"lokr_w1": (a, c)}
        if rank >= max(b, d) / 2:  # a rank-r pair would be no smaller than W2 itself
            shapes["lokr_w2"] = (b, d, *kernel)
        else:
            shapes.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d * math.prod(kernel)))
        return shapes

    def initialise(self, layer: LoraLayer) -> None:
        nn.init.zeros_(self.lokr_w1)
        for name, param in self.named_parameters():
            if name.startswith("lokr_w2"):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    @classmethod
    def factor_problem(cls, names: set[str]) -> str | None:
        if {"lokr_w1_a", "lokr_w1_b"} & names:  # LyCORIS' decompose_both; PEFT's default keeps W1 whole
            return "a LoKr W1 in two factors, lokr_w1_a / lokr_w1_b (decompose_both), is not supported by lorakit"
        for side in ("lokr_w1", "lokr_w2"):
            whole, pair = side in names, {f"{side}_a", f"{side}_b"} & names
            if whole == bool(pair) or len(pair) == 1:
                return f"needs {side} or both {side}_a and {side}_b, got {sorted({side} & names | pair) or 'neither'}"
        return None

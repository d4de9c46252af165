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
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..adapter import LayerWeights
from ..config import LoraConfig
from ..layouts import LINEAR
from .kind import Kind

if TYPE_CHECKING:
    from ..layers import LoraLayer


def kronecker_split(dimension: int) -> tuple[int, int]:
    """(m, n), m·n = ``dimension``, m ≤ n, m the largest divisor at most √dimension: PEFT's and
    LyCORIS's ``factorization`` with its default factor -1."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def _matrix(layer_class: type[LoraLayer], base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of the weight the factors build: a Conv2d's in is its channels."""
    if layer_class.layout.kernel:
        return base.out_channels, base.in_channels, tuple(base.kernel_size)
    in_features, out_features = layer_class.dims(base)
    return out_features, in_features, ()


class ProductAdapter(Kind):
    """What LoHa and LoKr share: factors named as in PEFT's and LyCORIS's files, ΔW formed
    from their product (``product``), in each forward, which is Kind's."""

    fusable = True  # alone on a Linear: one product with W + ΔW instead of two
    additive = True
    lycoris = ""  # the kind's name in LyCORIS's files (PEFT's peft_type in capitals)
    factors: tuple[str, ...] = ()  # every factor name this kind may have (a module has some of them)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return cls.factors

    @classmethod
    def describe(cls, config: LoraConfig) -> str:
        return cls.display

    @classmethod
    def check_config(cls, config: LoraConfig) -> str | None:
        if config.dropout:
            return "dropout is not defined for it (PEFT's rank_dropout / module_dropout are not supported)"
        if config.init != "default":
            return f"init {config.init!r} is not defined for it (only the default)"
        return None

    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        if layer_class.layout.fan_in_fan_out or not layer_class.dense_update:
            return f"not supported on {type(base).__name__} (nn.Linear and nn.Conv2d take it, as in PEFT)"
        return None

    @staticmethod
    def product(factors: Mapping[str, Tensor], scaling: float) -> Tensor:
        """ΔW as (out, in), or (out, in·kh·kw) on a Conv2d ((out, in, kh, kw) when W2 is whole);
        ``scaling`` applied to the smallest factor, not to ΔW (one pass over ΔW fewer)."""
        raise NotImplementedError

    @classmethod
    def delta_of(cls, value: LayerWeights) -> Tensor:
        delta = cls.product({name: t.float() for name, t in value.tensors.items()}, value.scaling)
        return delta.reshape(value.shape) if value.shape is not None else delta

    @classmethod
    def kohya_tensors(cls, value: LayerWeights) -> dict[str, Tensor]:
        return {**value.tensors, "alpha": torch.tensor(value.scaling * value.rank, dtype=torch.float32)}

    @classmethod
    def from_kohya(cls, name: str, part: dict[str, Tensor], alpha: float, layer_class: type[LoraLayer],
                   base: nn.Module, shape: tuple[int, ...]) -> tuple[str | None, LayerWeights | None, int]:
        """A LoHa's or LoKr's factors, checked against the shapes lorakit gives this kind on
        this module at the file's rank."""
        problem = cls.tensors_problem(set(part)) or cls.check_layer(layer_class, base)
        if problem:
            return problem, None, 0
        rank = cls.rank_of(LayerWeights(cls, part, 1.0, layer_class.layout))
        scaling = alpha / rank if rank else 1.0  # LyCORIS ignores alpha for a LoKr of whole W1 and W2
        rank = rank or cls.whole_rank(part)
        expected = cls.tensor_shapes(layer_class, base, rank)
        misfits = [f"{name}.{n} {tuple(part[n].shape) if n in part else 'missing'}, expected {s}"
                   for n, s in expected.items() if n not in part or tuple(part[n].shape) != tuple(s)]
        misfits += [f"{name}.{n}: not a factor lorakit's {cls.lycoris} has here" for n in part if n not in expected]
        if misfits:
            return "; ".join(misfits), None, 0
        return None, LayerWeights(cls, part, scaling, layer_class.layout, shape), rank

    @classmethod
    def whole_rank(cls, factors: Mapping[str, Tensor]) -> int:
        """The rank a file's factors were made with where no low-rank pair says it."""
        return cls.rank_of(LayerWeights(cls, factors, 1.0, LINEAR))


class LohaAdapter(ProductAdapter):
    """LoHa: ΔW = s · (W1a W1b) ⊙ (W2a W2b); W1a, W1b, W2a Kaiming-uniform, W2b zero (PEFT)."""

    lycoris = "loha"
    display = "LoHa"
    peft_config = {"peft_type": "LOHA", "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False}
    factors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    kohya_names = {name: name for name in factors}  # LyCORIS names them as PEFT does

    @classmethod
    def tensor_shapes(cls, layer_class: type[LoraLayer], base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        out, in_, kernel = _matrix(layer_class, base)
        columns = in_ * math.prod(kernel)
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, columns),
                "hada_w2_a": (out, rank), "hada_w2_b": (rank, columns)}

    @staticmethod
    def product(factors: Mapping[str, Tensor], scaling: float) -> Tensor:
        # (out, r) @ (r, in), twice, multiplied entrywise
        return ((factors["hada_w1_a"] * scaling) @ factors["hada_w1_b"]) * (factors["hada_w2_a"] @ factors["hada_w2_b"])

    @classmethod
    def rank_of(cls, value: LayerWeights) -> int:
        return value.tensors["hada_w1_a"].shape[1]

    def initialise(self, layer: LoraLayer) -> None:
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)


class LokrAdapter(ProductAdapter):
    """LoKr: ΔW = s · W1 ⊗ W2; W1 zero, W2 (or W2a, W2b) Kaiming-uniform (PEFT)."""

    lycoris = "lokr"
    display = "LoKr"
    peft_config = {"peft_type": "LOKR", "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                   "decompose_both": False, "decompose_factor": -1, "rank_dropout_scale": False}
    factors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    kohya_names = {name: name for name in factors}  # LyCORIS names them as PEFT does

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

    @staticmethod
    def product(factors: Mapping[str, Tensor], scaling: float) -> Tensor:
        W1 = factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"] @ factors["lokr_w1_b"]  # (a, c)
        W1 = W1 * scaling
        W2 = factors["lokr_w2"] if "lokr_w2" in factors else factors["lokr_w2_a"] @ factors["lokr_w2_b"]  # (b, d[, kh, kw])
        if W2.dim() == 4:
            W1 = W1[:, :, None, None]
        return torch.kron(W1, W2)  # (a·b, c·d[, kh, kw])

    @classmethod
    def rank_of(cls, value: LayerWeights) -> int:
        """The inner dimension of a low-rank pair (0: W1 and W2 whole)."""
        pair = next((name for name in ("lokr_w2_a", "lokr_w1_a") if name in value.tensors), None)
        return value.tensors[pair].shape[1] if pair else 0

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return ()  # W1 and W2 each whole or a pair: tensors_problem says which sets are whole

    @classmethod
    def whole_rank(cls, factors: Mapping[str, Tensor]) -> int:
        """The smallest rank at which lorakit keeps W2 (b, d) whole, r >= max(b, d) / 2."""
        W2 = factors.get("lokr_w2")
        if W2 is None:
            return super().whole_rank(factors)
        return max(1, math.ceil(max(W2.shape[0], W2.shape[1]) / 2))

    @classmethod
    def kohya_tensors(cls, value: LayerWeights) -> dict[str, Tensor]:
        if value.rank:
            return super().kohya_tensors(value)
        # W1 and W2 whole: LyCORIS takes scaling 1, so W2 carries ours
        return {**value.tensors, "lokr_w2": value.tensors["lokr_w2"] * value.scaling, "alpha": torch.tensor(1.0)}

    def initialise(self, layer: LoraLayer) -> None:
        for name, param in self.named_parameters():
            if name.startswith("lokr_w2"):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    @classmethod
    def tensors_problem(cls, names: set[str]) -> str | None:
        if {"lokr_w1_a", "lokr_w1_b"} & names:  # LyCORIS' decompose_both; PEFT's default keeps W1 whole
            return "a LoKr W1 in two factors, lokr_w1_a / lokr_w1_b (decompose_both), is not supported by lorakit"
        for side in ("lokr_w1", "lokr_w2"):
            whole, pair = side in names, {f"{side}_a", f"{side}_b"} & names
            if whole == bool(pair) or len(pair) == 1:
                return f"needs {side} or both {side}_a and {side}_b, got {sorted({side} & names | pair) or 'neither'}"
        unknown = sorted(names - set(cls.names()))
        return f"unexpected tensor {unknown[0]}" if unknown else None

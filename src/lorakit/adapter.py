"""One adapter as a plain value: per module, A, B, the scaling and the layout of B·A.

    ΔW = (alpha / r) · B A,  laid out like the module's ``weight``

or, for the LyCORIS kinds (variants/lycoris.py), no A and B but factors whose product is ΔW:

    LoHa  ΔW = s · (W1a W1b) ⊙ (W2a W2b)      LoKr  ΔW = s · W1 ⊗ W2  (W1, W2 full or a·b)

An ``Adapter`` is what an adapter *is*, apart from any model: formats/ reads and writes
it (each file format's keys stay there), ``export_adapter`` takes it out of a live model
and ``install`` puts it back, serving fills its slots from it, and code that combines
adapters works on it. It is immutable: operations return new values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from .config import LoraConfig

# How B·A becomes a change of ``weight``, by the base module's type:
LAYOUTS = ("linear", "conv1d", "embedding", "conv2d", "experts")
# linear:    W (out, in)                 ΔW = s · B A
# conv1d:    W (in, out), GPT-2          ΔW = s · (B A)^T
# embedding: W (num_embeddings, dim)     ΔW = s · (B A)^T, A (r, num_embeddings), B (dim, r)
# conv2d:    W (out, in, kh, kw)         ΔW = s · B ∘ A, A (r, in, kh, kw), B (out, r, 1, 1)
# experts:   W (E, out, in), MoE          ΔW_e = s · B_e A_e, A (E, r, in), B (E, out, r)


@dataclass(frozen=True)
class LayerWeights:
    """One adapter on one module."""

    A: Tensor | None  # None (and B too) for LoHa / LoKr: their factors are all in ``extras``
    B: Tensor | None
    scaling: float
    layout: str = "linear"
    # a variant's tensors besides A and B, by file key suffix (DoRA's lora_magnitude_vector,
    # LoHa's hada_w1_a, ...)
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    # the weight's shape, which LoHa / LoKr factors of a Conv2d do not say (None: unknown,
    # ΔW then comes as (out, in·kh·kw))
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))

    def cloned(self) -> LayerWeights:
        """A copy that owns its tensors (later training does not change it)."""
        return LayerWeights(*(None if t is None else t.clone() for t in (self.A, self.B)), self.scaling, self.layout,
                            {name: t.clone() for name, t in self.extras.items()}, self.shape)

    @property
    def rank(self) -> int:
        if self.A is None:
            return product_rank(self.extras)
        return self.A.shape[1] if self.layout == "experts" else self.A.shape[0]

    @property
    def nbytes(self) -> int:  # as float32, the way serving keeps it
        return 4 * sum(t.numel() for t in (self.A, self.B, *self.extras.values()) if t is not None)

    def delta(self) -> Tensor:
        """s·B·A in float32, laid out like the module's weight (a variant may use it otherwise:
        DoRA's is the update of the direction); for LoHa / LoKr the product of their factors."""
        if self.A is None:
            delta = product_delta({name: t.float() for name, t in self.extras.items()}, self.scaling)
            return delta.reshape(self.shape) if self.shape is not None else delta
        A, B = self.A.float(), self.B.float()
        if self.layout == "conv2d":  # (out, r) x (r, in, kh, kw) -> (out, in, kh, kw)
            return torch.einsum("or,rikl->oikl", B.flatten(1), A) * self.scaling
        if self.layout == "experts":  # (E, out, r) @ (E, r, in) -> (E, out, in)
            return torch.bmm(B, A) * self.scaling
        delta = (B @ A) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return delta if self.layout == "linear" else delta.T


def product_delta(factors: Mapping[str, Tensor], scaling: float = 1.0) -> Tensor:
    """ΔW of a LoHa or LoKr adapter from its factors (PEFT's and LyCORIS's names), as (out, in)
    or, on a Conv2d, (out, in·kh·kw) or (out, in, kh, kw) when W2 is whole; ``scaling`` is
    applied to the smallest factor, not to ΔW (one pass over ΔW fewer)."""
    if "hada_w1_a" in factors:  # (out, r) @ (r, in), twice, multiplied entrywise
        return ((factors["hada_w1_a"] * scaling) @ factors["hada_w1_b"]) * (factors["hada_w2_a"] @ factors["hada_w2_b"])
    W1 = factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"] @ factors["lokr_w1_b"]  # (a, c)
    W1 = W1 * scaling
    W2 = factors["lokr_w2"] if "lokr_w2" in factors else factors["lokr_w2_a"] @ factors["lokr_w2_b"]  # (b, d[, kh, kw])
    if W2.dim() == 4:
        W1 = W1[:, :, None, None]
    return torch.kron(W1, W2)  # (a·b, c·d[, kh, kw])


def product_rank(factors: Mapping[str, Tensor]) -> int:
    """The inner dimension of a LoHa's or LoKr's low-rank pairs (0: a LoKr of whole W1 and W2)."""
    for name in ("hada_w1_a", "lokr_w2_a", "lokr_w1_a"):
        if name in factors:
            return factors[name].shape[1]
    return 0


def as_product(delta: Tensor, layout: str) -> Tensor:
    """The inverse of the layout: ΔW laid out like a weight -> the (out, in) matrix s·B·A
    (a Conv2d's in is in · kh · kw; experts give a stack of E of them)."""
    if layout == "conv2d":
        return delta.reshape(delta.shape[0], -1)
    return delta if layout in ("linear", "experts") else delta.T


@dataclass(frozen=True)
class Adapter:
    """A whole adapter: its settings, its layers by module path, and any modules it
    stores whole (``modules_to_save``, by state-dict key under the module path)."""

    config: LoraConfig
    layers: Mapping[str, LayerWeights]
    saved: Mapping[str, Tensor] = field(default_factory=dict)
    base_model: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "saved", MappingProxyType(dict(self.saved)))

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


def delta_shape(layer: LayerWeights) -> tuple[int, ...]:
    """The shape of the weight ``layer`` changes (for LoHa / LoKr of unknown shape: ΔW's own)."""
    if layer.A is None:
        return layer.shape or tuple(layer.delta().shape)
    if layer.layout == "conv2d":
        return (layer.B.shape[0], *layer.A.shape[1:])
    if layer.layout == "experts":
        return (layer.A.shape[0], layer.B.shape[1], layer.A.shape[2])
    out_features, in_features = layer.B.shape[0], layer.A.shape[1]
    return (out_features, in_features) if layer.layout == "linear" else (in_features, out_features)

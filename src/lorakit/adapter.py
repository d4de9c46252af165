"""One adapter as a plain value: per module, A, B, the scaling and the layout of B·A.

    ΔW = (alpha / r) · B A,  laid out like the module's ``weight``

An ``Adapter`` is what an adapter *is*, apart from any model: files.py reads and
writes it (files.py owns every PEFT key), ``export_adapter`` takes it out of a live
model and ``import_adapter`` puts it back, serving fills its slots from it, and code
that combines adapters works on it. It is immutable: operations return new values.

``merged_state_dict`` merges one into a base state dict with no model at all (as
torchtune's ``get_merged_lora_ckpt``): W + ΔW in float32, rounded once to W's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from .config import LoraConfig

# How B·A becomes a change of ``weight``, by the base module's type:
LAYOUTS = ("linear", "conv1d", "embedding", "conv2d")
# linear:    W (out, in)                 ΔW = s · B A
# conv1d:    W (in, out), GPT-2          ΔW = s · (B A)^T
# embedding: W (num_embeddings, dim)     ΔW = s · (B A)^T, A (r, num_embeddings), B (dim, r)
# conv2d:    W (out, in, kh, kw)         ΔW = s · B ∘ A, A (r, in, kh, kw), B (out, r, 1, 1)


@dataclass(frozen=True)
class LayerWeights:
    """One adapter on one module."""

    A: Tensor
    B: Tensor
    scaling: float
    layout: str = "linear"
    magnitude: Tensor | None = None  # DoRA's, one per output unit (dora.py); None for plain LoRA

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:  # as float32, the way serving keeps it
        return 4 * (self.A.numel() + self.B.numel())

    def delta(self) -> Tensor:
        """s·B·A in float32, laid out like the module's weight (for DoRA, the direction's update)."""
        A, B = self.A.float(), self.B.float()
        if self.layout == "conv2d":  # (out, r) x (r, in, kh, kw) -> (out, in, kh, kw)
            return torch.einsum("or,rikl->oikl", B.flatten(1), A) * self.scaling
        delta = (B @ A) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return delta if self.layout == "linear" else delta.T


def as_product(delta: Tensor, layout: str) -> Tensor:
    """The inverse of the layout: ΔW laid out like a weight -> the (out, in) matrix s·B·A
    (a Conv2d's in is in · kh · kw)."""
    if layout == "conv2d":
        return delta.reshape(delta.shape[0], -1)
    return delta if layout == "linear" else delta.T


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


def merged_state_dict(base: Mapping[str, Tensor], adapter: Adapter) -> dict[str, Tensor]:
    """A new state dict: ``base`` with every ΔW of ``adapter`` added (float32, rounded once)
    and its saved modules in place. ``base`` is not changed; every key and shape is checked
    before anything is computed."""
    problems = []
    for path, layer in adapter.layers.items():
        key = f"{path}.weight"
        if key not in base:
            problems.append(f"{path}: no {key!r} in the base state dict")
            continue
        shape = _delta_shape(layer)
        if tuple(base[key].shape) != shape:
            problems.append(f"{path}: weight {tuple(base[key].shape)}, the adapter's update is {shape}")
    for key, tensor in adapter.saved.items():
        if key in base and base[key].shape != tensor.shape:
            problems.append(f"{key}: base {tuple(base[key].shape)}, saved module {tuple(tensor.shape)}")
    if problems:
        raise ValueError("the adapter does not fit the base state dict:\n  " + "\n  ".join(problems[:10]))
    merged = dict(base)
    for path, layer in adapter.layers.items():
        weight = base[f"{path}.weight"]
        merged[f"{path}.weight"] = merged_weight(weight.float(), layer).to(weight.dtype)
    merged.update({key: tensor.detach().clone() for key, tensor in adapter.saved.items()})
    return merged


def merged_weight(weight: Tensor, layer: LayerWeights) -> Tensor:
    """W (float32, any device) with ``layer`` merged in: W + ΔW, or DoRA's rescaled form."""
    if layer.magnitude is not None:
        from .dora import merged_direction

        return merged_direction(weight, layer)[0]
    return weight + layer.delta().to(weight.device)


def _delta_shape(layer: LayerWeights) -> tuple[int, ...]:
    if layer.layout == "conv2d":
        return (layer.B.shape[0], *layer.A.shape[1:])
    out_features, in_features = layer.B.shape[0], layer.A.shape[1]
    return (out_features, in_features) if layer.layout == "linear" else (in_features, out_features)

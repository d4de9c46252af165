"""PiSSA and OLoRA: adapters that start as a part of the base weight.

    W = W_res + s·B₀A₀;   the layer computes (W_res + s·B·A) x, with B = B₀ and A = A₀ at step 0

so the output is unchanged when training starts, but A and B start where W itself is
largest instead of at zero.

- PiSSA (Meng et al. 2024, arXiv:2404.02948): the top r singular triplets of W = U S Vᵀ,
  B₀ = U_r √(S_r / s), A₀ = √(S_r / s) V_rᵀ, so s·B₀A₀ = U_r S_r V_rᵀ. ``pissa_niter_K``
  uses a randomized SVD (Halko et al. 2011, ``torch.svd_lowrank``) with K subspace
  iterations, as PEFT's option of that name: much faster on large W, nearly the same
  top triplets.
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): the thin QR W = Q R, B₀ = Q_r, A₀ = R_r.

The part moved out, s·B₀A₀, is kept on the adapter (buffers, not saved): while the
adapter is inactive or disabled it is added back on the fly, and deleting or detaching
the adapter unmerged puts it back into W. An adapter file relative to W_res is useless
on anyone else's base, so ``save_adapter`` writes the conversion PEFT offers: one
ordinary LoRA adapter relative to the original W, of rank 2r,

    W_res + s·B·A - W = s·B·A - s·B₀A₀ = [s·B, s·B₀] · [A; -A₀],

which PEFT, vLLM and ``lorakit serve`` load on the unmodified base.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import frozen
from .adapter import Adapter, LayerWeights, as_product

if TYPE_CHECKING:
    from .layers import LoraAdapter, LoraLayer

def init_pissa(layer: LoraLayer, adapter: LoraAdapter, niter: int | None = None) -> None:
    W = as_product(frozen.dense(layer.weight), layer.layout)  # (out, in)
    r = adapter.rank
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = (S[:r] / adapter.scaling).sqrt()
    _move_out(layer, adapter, root[:, None] * Vh[:r], U[:, :r] * root)


def init_olora(layer: LoraLayer, adapter: LoraAdapter) -> None:
    Q, R = torch.linalg.qr(as_product(frozen.dense(layer.weight), layer.layout))
    r = adapter.rank
    _move_out(layer, adapter, R[:r], Q[:, :r])


def _move_out(layer: LoraLayer, adapter: LoraAdapter, A: Tensor, B: Tensor) -> None:
    """A = A₀, B = B₀, W <- W - s·B₀A₀, and the moved part remembered."""
    with torch.no_grad():
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        adapter.moved_A = adapter.lora_A.detach().clone()
        adapter.moved_B = adapter.lora_B.detach().clone()
        layer.set_weight(frozen.dense(layer.weight) - moved(layer, adapter).delta())


def moved(layer: LoraLayer, adapter: LoraAdapter) -> LayerWeights:
    """s·B₀A₀, the part of W the adapter took over, as a value."""
    return LayerWeights(adapter.moved_A, adapter.moved_B, adapter.scaling, layer.layout)


def moved_forward(layer: LoraLayer, adapter: LoraAdapter, x: Tensor) -> Tensor:
    """s·B₀A₀ x: what W_res x lacks of W x."""
    hidden = torch.nn.functional.linear(x.to(adapter.moved_A.dtype), adapter.moved_A) * adapter.scaling
    return torch.nn.functional.linear(hidden, adapter.moved_B)


def relative_to_original(adapter: Adapter, moved_parts: dict[str, LayerWeights]) -> Adapter:
    """``adapter`` (relative to W_res) as an ordinary LoRA adapter relative to W; modules
    without a moved part keep their factors (scaling folded into B)."""
    from .combine import with_unit_scaling

    layers = {}
    for path, layer in adapter.layers.items():
        part = moved_parts.get(path)
        B = layer.B.float() * layer.scaling
        if part is None:
            layers[path] = LayerWeights(layer.A.float(), B, 1.0, layer.layout)
            continue
        A = torch.cat([layer.A.float(), -part.A.float()])
        B = torch.cat([B, part.B.float() * part.scaling], dim=1)
        layers[path] = LayerWeights(A, B, 1.0, layer.layout)
    converted = with_unit_scaling(layers)
    config = dataclasses.replace(converted.config, modules_to_save=adapter.config.modules_to_save)
    return Adapter(config, converted.layers, adapter.saved, adapter.base_model, adapter.task_type)

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
adapter is inactive or disabled it is added back on the fly (``idle``), and deleting or
detaching the adapter unmerged puts it back into W (``release``). An adapter file relative to W_res is useless
on anyone else's base, so ``exported`` gives the conversion PEFT offers: one
ordinary LoRA adapter relative to the original W, of rank 2r,

    W_res + s·B·A - W = s·B·A - s·B₀A₀ = [s·B, s·B₀] · [A; -A₀],

which PEFT, vLLM and ``lorakit serve`` load on the unmodified base.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import frozen
from ..adapter import LayerWeights
from ..config import LoraConfig
from .lora import LoraAdapter, lora_value

if TYPE_CHECKING:
    from ..layers import LoraLayer

PISSA_NITER = re.compile(r"pissa_niter_([1-9]\d*)")  # PiSSA by a randomized SVD of K iterations


class PrincipalAdapter(LoraAdapter):
    """A LoRA adapter that took the part s·B₀A₀ of W over at its start."""

    display = "PiSSA/OLoRA"
    plain = False  # W_res lacks s·B₀A₀ while the adapter is not in use
    shardable = False  # its start is a factorization of the whole W
    kohya_names = None  # relative to W_res, which no other tool has; its export is plain LoRA

    def __init__(self, layer: LoraLayer, rank: int, alpha: float, config: LoraConfig) -> None:
        super().__init__(layer, rank, alpha, config)
        # B₀ and A₀: the part of W it took over; never saved
        self.register_buffer("moved_A", None, persistent=False)
        self.register_buffer("moved_B", None, persistent=False)

    @classmethod
    def describe(cls, config: LoraConfig) -> str:
        return f"init {config.init}"

    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        if not layer_class.single_matrix:
            return f"needs a Linear or GPT-2 Conv1D weight to factor, not {type(base).__name__}"
        return None

    def initialise(self, layer: LoraLayer) -> None:
        W = layer.layout.matrix(frozen.dense(layer.weight))  # (out, in)
        r = self.rank
        niter = PISSA_NITER.fullmatch(self.init)
        if self.init == "olora":
            Q, R = torch.linalg.qr(W)
            self._move_out(layer, R[:r], Q[:, :r])
            return
        if niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:
            U, S, V = torch.svd_lowrank(W, q=r, niter=int(niter[1]))
            Vh = V.T
        root = (S[:r] / self.scaling).sqrt()
        self._move_out(layer, root[:, None] * Vh[:r], U[:, :r] * root)

    def _move_out(self, layer: LoraLayer, A: Tensor, B: Tensor) -> None:
        """A = A₀, B = B₀, W <- W - s·B₀A₀, and the moved part remembered."""
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            self.moved_A = self.lora_A.detach().clone()
            self.moved_B = self.lora_B.detach().clone()
            layer.set_weight(frozen.dense(layer.weight) - self.moved(layer).delta())

    def moved(self, layer: LoraLayer) -> LayerWeights:
        """s·B₀A₀, the part of W the adapter took over, as a value."""
        return lora_value(self.moved_A, self.moved_B, self.scaling, layer.layout)

    def idle(self, layer: LoraLayer, x: Tensor, result: Tensor) -> Tensor:
        if self.moved_A is None:
            return result
        hidden = F.linear(x.to(self.moved_A.dtype), self.moved_A) * self.scaling  # s·B₀A₀ x: what W_res x lacks
        return result + F.linear(hidden, self.moved_B).to(result.dtype)

    @torch.no_grad()
    def release(self, layer: LoraLayer) -> None:
        if self.moved_A is not None:
            layer.set_weight(frozen.dense(layer.weight) + self.moved(layer).delta())
            self.moved_A = self.moved_B = None

    def exported(self, layer: LoraLayer) -> LayerWeights:
        """Relative to the original W: [s·B, s·B₀] · [A; -A₀], rank 2r, scaling 1."""
        value = self.value(layer)
        B = value.B.float() * value.scaling
        if self.moved_A is None:
            return lora_value(value.A.float(), B, 1.0, value.layout)
        A = torch.cat([value.A.float(), -self.moved_A.float()])
        B = torch.cat([B, self.moved_B.float() * self.scaling], dim=1)
        return lora_value(A, B, 1.0, value.layout)

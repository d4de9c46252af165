"""Adapted layers: a frozen base operation plus named adapters.

    y = base(x) + the update of every active adapter

A LoraLayer takes the place of the module it adapts but keeps that module's ``weight``
and ``bias`` under their own names, so ``model.state_dict()`` keys of the base are
unchanged and a base checkpoint still loads. Adapters live in a ``ModuleDict`` (one
module of its kind, variants/, per name), so ``state_dict``, ``.to()``, ``deepcopy`` and
``torch.save`` see every tensor.

Merging is a performance detail, never a change in meaning: whatever is merged, the
layer computes base + the active adapters. A merged adapter that is not active (or
all adapters, inside ``disabled``) is subtracted on the fly.

One subclass per base type says how its base computes (``base_forward``, and where it
can, ``base_product``, ``weight_forward``, ``base_forward_onto``), how a pair of factors
acts on its input (``down``, ``up``: the operations plain LoRA, variants/lora.py, builds
its update from) and its layout (layouts.py: how an (out, in) update lies in ``weight``).
Each adapter is a module of its kind that adds its own contribution in its own
``forward`` (its parameters are used only inside its own call, as FSDP's hooks need),
merges itself into W and says what it supports; a layer never asks which kind it is.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import frozen
from .adapter import LayerWeights
from .config import LoraConfig
from .layouts import CONV1D, CONV2D, EMBEDDING, LINEAR, Layout

if TYPE_CHECKING:
    from .variants import Kind


class LoraLayer(nn.Module):
    """Base class: a frozen ``weight``/``bias`` and a ``ModuleDict`` of adapters.

    Subclasses implement ``base_forward``, ``down`` and ``up`` (how a pair of factors acts
    on the input), ``shapes`` (the A and B shapes for a given rank), and name their
    ``layout`` (how B @ A becomes a change of ``weight``; layouts.py).
    """

    layout: Layout  # how an update in (out, in) form lies in ``weight`` (layouts.py)
    accumulates = False  # the base is a matrix product over the last dimension: base_forward_onto exists
    dense_update = False  # whether weight_forward exists (a dense ΔW can act on the input)
    single_matrix = False  # its weight is one plain matrix that can be factored (PiSSA/OLoRA)
    scalable_outputs = False  # its base output, without bias, can be rescaled per output unit (DoRA)
    adds_in_place = False  # an update may be added into the base output in place when no gradient is recorded

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.train(base.training)  # a layer swapped into an eval-mode model stays in eval mode
        # The original module, emptied of its tensors, remembers the type and settings
        # (stride, padding_idx, ...) to rebuild it on detach. Kept out of the module tree
        # so its tensors never appear twice in state_dict.
        base.register_parameter("weight", None)
        if hasattr(base, "bias"):
            base.register_parameter("bias", None)
        object.__setattr__(self, "base_module", base)

    # -- per base type ----------------------------------------------------------------
    @staticmethod
    def shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        """(in, out) of the linear map the adapter approximates."""
        raise NotImplementedError

    def base_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def base_product(self, x: Tensor) -> Tensor:
        """x W^T alone, without the bias (what DoRA rescales)."""
        raise NotImplementedError(f"{type(self).__name__} has no base product apart from its bias")

    def down(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        """dropout(x) through A as this layer's operation, in A's dtype: x A^T for a Linear,
        a conv with the base's geometry for a Conv2d, a lookup for an Embedding."""
        raise NotImplementedError

    def up(self, hidden: Tensor, B: Tensor, scaling: float) -> Tensor:
        """s · ``hidden`` through B as this layer's operation, in B's dtype."""
        raise NotImplementedError

    def output_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype of the base's output for input ``x``."""
        return frozen.compute_dtype(self.weight)

    def weight_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The base operation with ``weight`` (laid out like ``self.weight``): how a dense ΔW
        (LoHa, LoKr) acts on the input (layers with ``dense_update``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot apply a dense update")

    def base_forward_onto(self, update: Tensor, x: Tensor) -> Tensor:
        """``update`` (tokens x out, the bias already in it) plus the base product accumulated
        onto it in the same GEMM (layers with ``accumulates``)."""
        raise NotImplementedError

    @staticmethod
    def draw_factors(A: Tensor, B: Tensor, init: str) -> None:
        """A fresh adapter's A and B, in place: A Kaiming-uniform (as nn.Linear initialises
        its weight) or, with ``gaussian``, N(0, 1/r); B zero."""
        if init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def delta_weight(self, name: str) -> Tensor:
        """Adapter ``name``'s ΔW laid out like ``weight``, in float32."""
        return self.weights(name).delta()

    def weights(self, name: str) -> LayerWeights:
        """Adapter ``name`` on this layer as a plain value (A, B, scaling, layout, extras)."""
        return self.adapters[name].value(self)

    # -- shared ---------------------------------------------------------------------
    def add_adapter(self, name: str, kind: type[Kind], rank: int, alpha: float, config: LoraConfig) -> None:
        adapter = kind(self, rank, alpha, config)
        adapter.initialise(self)
        # New modules start in training mode; an adapter follows its layer's mode so that
        # loading one into an eval-mode model never switches its dropout on.
        self.adapters[name] = adapter.train(self.training)

    def remove_adapter(self, name: str) -> None:
        """Unmerge adapter ``name``, let it give back what it took from W, and drop it."""
        self.unmerge(name)
        self.release(name)
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def forward(self, x: Tensor) -> Tensor:
        sole = self.sole_plain_adapter(x)
        if sole is not None:  # the whole output, from the adapter's own call
            return sole(self, x, None, None)
        base = self.base_forward(x)
        wanted = () if self.disabled else self.active
        result = base
        if len(wanted) + len(self.merged) > 1:
            # adapters may add into the result in place; one that reads the base output (DoRA) must see it as it was
            adding = [n for n in wanted if n not in self.merged] + [n for n in self.merged if n not in wanted]
            if len(adding) > 1 and not all(self.adapters[n].plain for n in adding):
                result = base.clone()
        for name in wanted:
            if name not in self.merged:
                result = self.adapters[name](self, x, base, result)
        for name in self.merged:
            if name not in wanted:
                adapter = self.adapters[name]
                if not adapter.additive:
                    raise RuntimeError(f"adapter {name!r} ({type(adapter).__name__}) is merged into the weight and "
                                       "cannot be taken out on the fly: unmerge it before deactivating it")
                result = adapter(self, x, base, result, -1.0)
        for name, adapter in self.adapters.items():
            if name not in wanted:
                result = adapter.idle(self, x, result)
        return result

    def sole_plain_adapter(self, x: Tensor) -> Kind | None:
        """The adapter whose update can be written before the base output, for the base
        product to accumulate into it (``base_forward_onto``, layers whose base is a
        plain matrix product): the only adapter in use, nothing merged, every adapter
        ``plain`` (its update alone: no rescaling, no part of W to add back) or ``fusable``
        (LoHa / LoKr: one product with W + ΔW), one dtype throughout, no autocast."""
        if not self.accumulates or self.disabled or self.merged or len(self.active) != 1:
            return None
        adapter = self.adapters[self.active[0]]
        if not all(a.plain or a.fusable for a in self.adapters.values()):
            return None
        if (frozen.is_quantized(self.weight) or torch.is_autocast_enabled(x.device.type)
                or not all(x.dtype == self.weight.dtype == p.dtype for p in adapter.parameters())):
            return None
        return adapter

    def release(self, name: str) -> None:
        """Let adapter ``name``, unless merged, give back what it took from W (before it goes)."""
        if name not in self.merged:
            self.adapters[name].release(self)

    def merged_weight(self, name: str) -> Tensor:
        """The weight with adapter ``name`` merged in, in float32 (nothing is written)."""
        return self.adapters[name].merged_weight(self, frozen.dense(self.weight))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W <- the merged weight, computed in float32 and rounded once. Repeating is a no-op."""
        if name in self.merged:
            return
        self.set_weight(self.merged_weight(name))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        adapter = self.adapters[name]
        if not adapter.additive and self.merged[-1] != name:
            raise RuntimeError(f"adapter {name!r} ({type(adapter).__name__}) was merged before "
                               f"{self.merged[-1]!r}: unmerge that first")
        self.set_weight(adapter.unmerged_weight(self, frozen.dense(self.weight)))
        self.merged.remove(name)

    def set_weight(self, weight: Tensor) -> None:
        if frozen.is_quantized(self.weight):
            # Quantize the new float32 weight again: the memory stays that of the quantized
            # base, but it is rounded to the quantization grid, so an unmerge restores W
            # only to within one quantization step (as in PEFT).
            self.weight = frozen.requantized(self.weight, weight)
        else:
            self.weight.copy_(weight.to(self.weight.dtype))

    @classmethod
    def wrap(cls, model: nn.Module, path: str, base: nn.Module) -> LoraLayer:
        """A new layer of this type over ``base``, put at ``path`` in ``model``."""
        layer = cls(base)
        set_module(model, path, layer)
        return layer

    def unwrap(self, model: nn.Module, path: str) -> None:
        """Put the original module back at ``path`` (this layer holds no adapter any more)."""
        set_module(model, path, self.to_base())

    def to_base(self) -> nn.Module:
        """The original module type holding this layer's (possibly merged) weight and bias."""
        base = self.base_module
        base.register_parameter("weight", self.weight)
        if hasattr(base, "bias"):
            base.register_parameter("bias", self.bias)
        object.__setattr__(self, "base_module", None)
        return base

    def extra_repr(self) -> str:
        in_features, out_features = self.dims(self.base_module)
        return (f"{type(self.base_module).__name__}(in={in_features}, out={out_features}), "
                f"active={self.active}, merged={self.merged}")


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``model`` (the root itself cannot be replaced)."""
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path), leaf, module)


class _DownProjection(torch.autograd.Function):
    """x A^T in A's dtype (float32) for x in a half-precision dtype, saving x as it came.

    ``F.linear(x.float(), A)`` would keep a float32 copy of every adapted layer's input for
    the backward pass (three for q, k and v), twice the memory of the input itself, which
    autograd keeps anyway. Widening is exact, so the gradients are the same bits."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor) -> Tensor:
        ctx.save_for_backward(x, A)
        return F.linear(x.to(A.dtype), A)  # (..., in) @ (in, r) -> (..., r)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, A = ctx.saved_tensors
        grad_x = (grad @ A).to(x.dtype) if ctx.needs_input_grad[0] else None  # (..., r) @ (r, in)
        grad_A = None
        if ctx.needs_input_grad[1]:  # (r, N) @ (N, in)
            grad_A = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(A.dtype)
        return grad_x, grad_A


class LoraLinear(LoraLayer):
    """nn.Linear: y = x W^T + b, W (out, in); or, ``transposed``, transformers' GPT-2
    Conv1D: y = x W + b, W stored as (in, out)."""

    layout = LINEAR
    transposed = False
    accumulates = True
    dense_update = True
    single_matrix = True
    scalable_outputs = True

    @classmethod
    def dims(cls, base: nn.Module) -> tuple[int, int]:
        return (base.nx, base.nf) if cls.transposed else (base.in_features, base.out_features)

    @classmethod
    def shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features, out_features = cls.dims(base)
        return (rank, in_features), (out_features, rank)

    def base_forward(self, x: Tensor) -> Tensor:
        return frozen.linear(x, self.weight, self.bias, transposed=self.transposed)

    def base_forward_onto(self, update: Tensor, x: Tensor) -> Tensor:
        return frozen.linear_onto(update, x, self.weight, transposed=self.transposed)

    def base_product(self, x: Tensor) -> Tensor:
        return frozen.linear(x, self.weight, None, transposed=self.transposed)

    def weight_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight.T if self.transposed else weight, bias)

    def down(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        if (x.dtype != A.dtype and isinstance(dropout, nn.Identity) and torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type)):
            return _DownProjection.apply(x, A)
        return F.linear(dropout(x.to(A.dtype)), A)  # (..., in) @ (in, r) -> (..., r)

    def up(self, hidden: Tensor, B: Tensor, scaling: float) -> Tensor:
        return F.linear(hidden * scaling, B)  # scaled while it is small: (..., r) @ (r, out)


class LoraConv1D(LoraLinear):
    """transformers' GPT-2 Conv1D: LoraLinear over a weight stored transposed."""

    layout = CONV1D
    transposed = True


class LoraEmbedding(LoraLayer):
    """nn.Embedding: y = W[ids]; W is (num_embeddings, dim).

    As in PEFT, A (r x num_embeddings) is looked up like an embedding table and B
    (dim x r) projects up; A starts at zero and B Gaussian, the reverse of the linear
    case, so a fresh adapter is still exactly zero.
    """

    layout = EMBEDDING
    scalable_outputs = True

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    @staticmethod
    def shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, base.num_embeddings), (base.embedding_dim, rank)

    @staticmethod
    def draw_factors(A: Tensor, B: Tensor, init: str) -> None:
        nn.init.zeros_(A)
        nn.init.normal_(B)  # whatever ``init`` says, as PEFT does for embeddings

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        base = self.base_module
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def base_forward(self, x: Tensor) -> Tensor:
        return self._lookup(x, self.weight)

    def down(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        return self._lookup(x, A.T)  # (..., r): row ids of A^T (ids are never dropped)

    def up(self, hidden: Tensor, B: Tensor, scaling: float) -> Tensor:
        return hidden @ B.T * scaling


class LoraConv2d(LoraLayer):
    """nn.Conv2d (image models): A is a conv with the base kernel, stride and padding,
    B a 1x1 conv, so B∘A is a conv with the base's geometry and can be merged."""

    layout = CONV2D
    dense_update = True
    scalable_outputs = True

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        kh, kw = base.kernel_size
        return base.in_channels * kh * kw, base.out_channels

    @staticmethod
    def shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)

    def base_forward(self, x: Tensor) -> Tensor:
        return self.base_module._conv_forward(x, self.weight, self.bias)

    def base_product(self, x: Tensor) -> Tensor:
        return self.base_module._conv_forward(x, self.weight, None)

    def weight_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.base_module._conv_forward(x, weight, bias)

    def down(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        base = self.base_module
        x = dropout(x.to(A.dtype))
        # (N, in, H, W) -> (N, r, H', W') with the base's geometry
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return F.conv2d(x, A, None, base.stride, 0, base.dilation)
        return F.conv2d(x, A, None, base.stride, base.padding, base.dilation)

    def up(self, hidden: Tensor, B: Tensor, scaling: float) -> Tensor:
        return F.conv2d(hidden * scaling, B)  # 1x1 up to out

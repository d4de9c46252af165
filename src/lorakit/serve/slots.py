"""Mixed-adapter batches: every row of a batch may use a different adapter (or none).

A served model has its linear layers replaced once by ``SlotLinear``: the frozen base
plus a fixed number of adapter *slots*. Loading an adapter fills one slot in every
layer it targets; unloading empties it. Modules are never added or removed after
that, so nothing is re-injected or recompiled while requests run.

Per forward pass a ``Route`` is computed once for the whole model from the slot id
of each row: the tokens grouped by slot (a permutation, or none if the rows already
come grouped) and the contiguous segment of each slot. Every layer then computes

    y = x W^T + b                                   for all tokens at once
    y[segment] += (alpha / r) * (x[segment] A^T) B^T  one pair of matmuls per slot in the batch

which is the SGMV idea of Punica / S-LoRA (segmented gather matrix-vector) in plain
torch: one gather of the tokens, one matmul per (slot, layer), one scatter back; no
padding to a common rank, no per-row loop. x A^T is computed in float32 whatever the
base dtype, since reduced-precision intermediates lose the small adapter update.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASE = -1  # the slot id of a row that uses no adapter


@dataclass(frozen=True)
class SlotWeights:
    """One adapter in one layer: A (r x in) and B (out x r) in float32, and alpha / r."""

    A: Tensor
    B: Tensor
    scaling: float


@dataclass(frozen=True)
class Route:
    """Which tokens go to which slot, for one forward pass."""

    order: Tensor | None  # token permutation that groups tokens by slot; None: already grouped
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) in grouped token order, slots >= 0


class Router:
    """Shared by every SlotLinear of a model: the route of the forward pass under way."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.current: Route | None = None


def make_route(row_slots: Sequence[int], seq_len: int, device: torch.device | str = "cpu") -> Route:
    """The route for a batch whose row i uses slot ``row_slots[i]`` (BASE for none)."""
    rows = sorted(range(len(row_slots)), key=lambda i: row_slots[i])  # stable: rows keep their order in a slot
    segments, start = [], 0
    for i, row in enumerate(rows):
        if i + 1 == len(rows) or row_slots[rows[i + 1]] != row_slots[row]:
            if row_slots[row] != BASE:
                segments.append((row_slots[row], start * seq_len, (i + 1) * seq_len))
            start = i + 1
    if rows == sorted(rows):
        return Route(None, tuple(segments))
    tokens = torch.arange(seq_len, device=device)
    order = (torch.tensor(rows, device=device)[:, None] * seq_len + tokens).reshape(-1)
    return Route(order, tuple(segments))


class SlotLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus adapter slots; keeps ``weight``/``bias``."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D stores W as (in, out)
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.in_features, self.out_features = (self.weight.shape if self.transposed
                                               else self.weight.shape[::-1])
        self.slots: list[SlotWeights | None] = [None] * router.capacity
        object.__setattr__(self, "router", router)  # shared, not a submodule

    def forward(self, x: Tensor) -> Tensor:
        if self.transposed:
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight, self.bias)
        route = self.router.current
        if route is None or not route.segments:
            return y
        tokens = x.reshape(-1, x.shape[-1])  # (N, in)
        out = y.view(-1, y.shape[-1])  # (N, out), shares y's memory
        if route.order is not None:
            tokens = tokens.index_select(0, route.order)
        for slot, start, end in route.segments:
            weights = self.slots[slot]
            if weights is None:  # this adapter does not target this layer
                continue
            hidden = F.linear(tokens[start:end].float(), weights.A) * weights.scaling  # (n, in) @ (in, r) -> (n, r)
            delta = F.linear(hidden, weights.B).to(out.dtype)  # (n, r) @ (r, out) -> (n, out)
            if route.order is None:
                out[start:end] += delta
            else:
                out.index_add_(0, route.order[start:end], delta)
        return y

    def extra_repr(self) -> str:
        used = sum(s is not None for s in self.slots)
        return f"in={self.in_features}, out={self.out_features}, slots={used}/{len(self.slots)}"


def enable_slots(model: nn.Module, capacity: int) -> Router:
    """Replace every linear layer except the output head by a SlotLinear with ``capacity`` slots."""
    from ..attach import replace_module

    router = Router(capacity)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", ())
    targets = [(path, m) for path, m in model.named_modules()
               if path and m is not head and isinstance(m, (nn.Linear, conv1d) if conv1d else nn.Linear)]
    for path, module in targets:
        replace_module(model, path, SlotLinear(module, router))
    model.requires_grad_(False)
    model.lorakit_router = router
    return router


def slot_layers(model: nn.Module) -> dict[str, SlotLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, SlotLinear)}


@contextmanager
def routing(model: nn.Module, row_slots: Sequence[int], seq_len: int) -> Iterator[None]:
    """Run the model's forward passes inside the block with row i on slot ``row_slots[i]``."""
    router: Router = model.lorakit_router
    router.current = make_route(row_slots, seq_len, next(model.parameters()).device)
    try:
        yield
    finally:
        router.current = None

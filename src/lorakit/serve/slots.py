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
torch: no padding to a common rank, no per-row loop, no copy of adapter weights, and
no gather at all when the rows come grouped by slot (``mixed_forward`` and the engine
group them once per step). Stacking the batch's A and B for batched matmuls (the BGMV
form) measured slower on a CPU at both decode and prefill sizes. x A^T is computed in
float32 whatever the base dtype, since reduced-precision intermediates lose the small
adapter update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASE = -1  # the slot id of a row that uses no adapter


@dataclass(frozen=True)
class SlotWeights:
    """One adapter in one layer, float32: A (r x in) and (alpha / r) * B^T (r x out), laid
    out so that the second product adds into the output in place (addmm)."""

    A: Tensor
    scaled_Bt: Tensor

    @property
    def At(self) -> Tensor:  # (in, r): a view, no copy
        return self.A.T

    @classmethod
    def of(cls, A: Tensor, B: Tensor, scaling: float) -> SlotWeights:
        return cls(A.float().contiguous(), (B.float() * scaling).T.contiguous())


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
        if route.order is None:  # rows come grouped by slot: every segment is a view
            for slot, start, end in route.segments:
                weights = self.slots[slot]
                if weights is None:  # this adapter does not target this layer
                    continue
                hidden = torch.mm(tokens[start:end].float(), weights.At)  # (n, in) @ (in, r) -> (n, r)
                if out.dtype == torch.float32:  # add (n, r) @ (r, out) into the output in place
                    out[start:end].addmm_(hidden, weights.scaled_Bt)
                else:
                    out[start:end] += (hidden @ weights.scaled_Bt).to(out.dtype)
            return y
        grouped = tokens.index_select(0, route.order)
        delta = torch.zeros((grouped.shape[0], out.shape[1]), dtype=torch.float32, device=out.device)
        for slot, start, end in route.segments:
            weights = self.slots[slot]
            if weights is not None:
                torch.mm(grouped[start:end].float() @ weights.At, weights.scaled_Bt, out=delta[start:end])
        out.index_add_(0, route.order, delta.to(out.dtype))
        return y

    def extra_repr(self) -> str:
        used = sum(s is not None for s in self.slots)
        return f"in={self.in_features}, out={self.out_features}, slots={used}/{len(self.slots)}"


def enable_slots(model: nn.Module, capacity: int) -> Router:
    """Replace every linear layer except the output head by a SlotLinear with ``capacity`` slots."""
    from ..attach import layer_class_for, output_head, replace_module
    from ..layers import LoraConv1D, LoraLinear

    router = Router(capacity)
    head = output_head(model)
    targets = [(path, m) for path, m in model.named_modules()
               if path and m is not head and layer_class_for(m) in (LoraLinear, LoraConv1D)]
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


def mixed_forward(model: nn.Module, input_ids: Tensor, row_slots: Sequence[int]) -> Tensor:
    """Logits of a batch whose row i uses slot ``row_slots[i]``, in the caller's row order.

    The rows are grouped by slot once, before the model runs, so that every layer adds
    each adapter's update to a contiguous block of rows (no per-layer gather/scatter).
    """
    order = sorted(range(len(row_slots)), key=lambda i: row_slots[i])
    index = torch.tensor(order, device=input_ids.device)
    with routing(model, [row_slots[i] for i in order], input_ids.shape[1]):
        logits = model(input_ids=input_ids.index_select(0, index)).logits
    return logits.index_select(0, torch.argsort(index))

"""Mixed-adapter batches: every row of a batch may use a different adapter (or none).

A served model has its linear layers replaced once by ``SlotLinear``: the frozen base
plus a fixed number of adapter *slots*, whose weights live in the layer's ``Pool``
(pool.py). Loading an adapter fills one slot in every layer it targets; unloading
empties it. Modules are never added or removed after that, so nothing is re-injected
while requests run.

Per forward pass a ``Route`` is computed once for the whole model from the slot id of
each row. Every layer computes y = x W^T + b for all tokens at once, then adds each
token's own update (alpha / r) B_s A_s x, where s is the token's slot, in one of two ways:

- **segments** (SGMV, as in Punica / S-LoRA): tokens grouped by slot, one pair of
  matmuls per slot on its contiguous block of tokens. No padding, no copy of adapter
  weights, and no gather at all when the rows come grouped (``mixed_forward`` and the
  engine group them once per step); but two operations per adapter per layer.
- **stacked** (BGMV, batched gather matrix-vector): the blocks the batch needs are
  gathered from the pool in one ``index_select`` (or taken as a view when they lie side
  by side, as they do when adapters loaded in order have one group each) and one pair
  of batched matmuls serves every adapter at once. A group is one adapter's tokens when
  the rows come grouped and every adapter has as many tokens (a decode step with one
  row per adapter; a prefill of one prompt per adapter), else one token, which only
  pays when adapters have few tokens each (``STACK_TOKENS`` on average at most: a
  decode step).

Segments are taken otherwise, and in any layer where the pool's zero padding would
more than double the stacked work.

x A^T is computed in float32 whatever the base dtype, since reduced-precision
intermediates lose the small adapter update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import frozen
from ..adapter import LayerWeights
from ..attach import layer_class_for, output_head
from .pool import Pool, SlotWeights
from .route import BASE, STACK_TOKENS, Route, Router, Stack, make_route
from .slot_experts import SlotExperts, SlotExpertWeight, enable_expert_slots

__all__ = ["BASE", "Route", "Router", "Stack", "SlotLinear", "enable_slots", "make_route", "mixed_forward", "router_of",
           "routing", "slot_layers"]


class SlotLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus adapter slots; keeps ``weight``/``bias``."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D stores W as (in, out)
        self.layer_class = layer_class_for(base)  # whose shapes an adapter of this layer has
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        base.register_parameter("weight", None)  # emptied, kept out of the tree: the adapters' shapes
        base.register_parameter("bias", None)
        object.__setattr__(self, "base_module", base)
        self.in_features, self.out_features = (self.weight.shape if self.transposed
                                               else self.weight.shape[::-1])
        self.pool = Pool.empty(router.capacity, self.in_features, self.out_features, self.weight.device)
        object.__setattr__(self, "router", router)  # shared, not a submodule

    @property
    def slots(self) -> list[SlotWeights | None]:
        return [self.pool.weights(slot) for slot in range(self.router.capacity)]

    def fill(self, slot: int, weights: LayerWeights) -> None:
        self.pool = self.pool.filled(slot, weights)  # one assignment: a forward sees the old or the new pool

    def empty(self, slot: int) -> None:
        self.pool = self.pool.emptied(slot)

    def forward(self, x: Tensor) -> Tensor:
        y = frozen.linear(x, self.weight, self.bias, self.transposed)
        route, pool = self.router.current, self.pool
        if route is None or not route.segments:
            return y
        tokens = x.reshape(-1, x.shape[-1])  # (N, in)
        out = y.view(-1, y.shape[-1])  # (N, out), shares y's memory
        if route.stack is None or not self._stacked(out, tokens, pool, route):
            self._segments(out, tokens, pool, route)
        return y

    @staticmethod
    def _segments(out: Tensor, tokens: Tensor, pool: Pool, route: Route) -> None:
        """Add the update by one matmul pair per adapter on its contiguous tokens."""
        if route.order is None:  # rows come grouped by slot: every segment is a view
            for slot, start, end in route.segments:
                weights = pool.weights(slot)
                if weights is None:  # this adapter does not target this layer
                    continue
                whole = start == 0 and end == tokens.shape[0]  # one adapter for the batch: no slicing
                rows, target = (tokens, out) if whole else (tokens[start:end], out[start:end])
                hidden = torch.mm(rows if rows.dtype == torch.float32 else rows.float(), weights.At)  # (n, r)
                if out.dtype == torch.float32:  # add (n, r) @ (r, out) into the output in place
                    target.addmm_(hidden, weights.scaled_Bt)
                else:
                    target += (hidden @ weights.scaled_Bt).to(out.dtype)
            return
        grouped = tokens.index_select(0, route.order)
        delta = torch.zeros((grouped.shape[0], out.shape[1]), dtype=torch.float32, device=out.device)
        for slot, start, end in route.segments:
            weights = pool.weights(slot)
            if weights is not None:
                torch.mm(grouped[start:end].float() @ weights.At, weights.scaled_Bt, out=delta[start:end])
        out.index_add_(0, route.order, delta.to(out.dtype))

    @staticmethod
    def _stacked(out: Tensor, tokens: Tensor, pool: Pool, route: Route) -> bool:
        """Add the update by batched matmuls over the route's groups; False to take segments
        instead, when the pool's padding would more than double the work (a low-rank batch in
        a pool widened by one high-rank adapter)."""
        if not pool.uniform:
            needed = sum(pool.rank(slot) * (end - start) for slot, start, end in route.segments)
            if pool.A.shape[1] * (route.stack.end - route.stack.start) > 2 * needed:
                return False
        stack = route.stack
        run = pool.consecutive(stack.slot_ids)
        if run is not None:  # the groups' blocks lie side by side: views, nothing copied
            A, Bt = pool.A[run], pool.scaled_Bt[run]
        else:  # the zero block for BASE and for adapters not in this layer
            blocks = pool.block_of[stack.slots]  # (G,)
            A, Bt = pool.A.index_select(0, blocks), pool.scaled_Bt.index_select(0, blocks)  # (G, w, in), (G, w, out)
        groups = (len(stack.slot_ids), stack.length, -1)
        x = tokens[stack.start:stack.end].float().view(groups)  # (G, n, in)
        hidden = torch.bmm(x, A.transpose(1, 2))  # (G, n, in) @ (G, in, w) -> (G, n, w)
        target = out[stack.start:stack.end].view(groups)  # (G, n, out), shares out's memory
        if out.dtype == torch.float32:
            target.baddbmm_(hidden, Bt)
        else:
            target += torch.bmm(hidden, Bt).to(out.dtype)
        return True

    def extra_repr(self) -> str:
        used = sum(span is not None for span in self.pool.spans)
        return f"in={self.in_features}, out={self.out_features}, slots={used}/{self.router.capacity}"


def enable_slots(model: nn.Module, capacity: int, stack_tokens: int = STACK_TOKENS) -> Router:
    """Replace every linear layer except the output head by a SlotLinear with ``capacity`` slots
    (and every fused-experts module by a SlotExperts: slot_experts.py).

    ``stack_tokens``: see ``Router``; 0 adds adapters by segments only."""
    from ..layers import LoraConv1D, LoraLinear, set_module

    router = Router(capacity, next(model.parameters()).device, stack_tokens)
    head = output_head(model)
    targets = [(path, m) for path, m in model.named_modules()
               if path and m is not head and layer_class_for(m) in (LoraLinear, LoraConv1D)]
    for path, module in targets:
        set_module(model, path, SlotLinear(module, router))
    enable_expert_slots(model, router)
    model.requires_grad_(False)
    return router


def router_of(model: nn.Module) -> Router | None:
    """The router the slotted layers of ``model`` share (None: the model has no slots). The
    engine keeps it; nothing is set on the model itself."""
    return next((m.router for m in model.modules() if isinstance(m, (SlotLinear, SlotExperts))), None)


def slot_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> every module that takes adapter slots: SlotLinear, and the expert tensors of
    SlotExperts (at the tensor's path)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, (SlotLinear, SlotExpertWeight))}


@contextmanager
def routing(target: Router | nn.Module | None, row_slots: Sequence[int], seq_len: int) -> Iterator[None]:
    """Run the forward passes inside the block with row i on slot ``row_slots[i]``; ``target``:
    the router of the slotted model (the engine's), or the model, whose router is looked up.

    A model without slots (one being trained: its adapters attached, not slotted) runs as
    it is, every row on its active adapters."""
    router = target if isinstance(target, Router) or target is None else router_of(target)
    if router is None:
        yield
        return
    router.current = make_route(row_slots, seq_len, router.device, router.stack_tokens)
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
    if order == sorted(order):  # already grouped: no copies
        with routing(model, row_slots, input_ids.shape[1]):
            return model(input_ids=input_ids).logits
    index = torch.tensor(order, device=input_ids.device)
    with routing(model, [row_slots[i] for i in order], input_ids.shape[1]):
        logits = model(input_ids=input_ids.index_select(0, index)).logits
    return logits.index_select(0, torch.argsort(index))

"""Mixed-adapter batches: every row of a batch may use a different adapter (or none).

A served model has its linear layers replaced once by ``SlotLinear``: the frozen base
plus a fixed number of adapter *slots*, whose weights live in the layer's ``Pool``
(pool.py). Loading an adapter fills one slot in every layer it targets; unloading
empties it. Modules are never added or removed after that, so nothing is re-injected
while requests run.

Per forward pass a ``Route`` is computed once for the whole model from the slot id of
each row. Every layer computes y = x W^T + b for all tokens at once, then adds each
token's own update (alpha / r) B_s A_s x, where s is the token's slot, in one of two ways:

- **segments** (SGMV, as in Punica / S-LoRA), when each adapter has many tokens
  (prefill): tokens grouped by slot, one pair of matmuls per slot on its contiguous
  block of tokens. No padding, no copy of adapter weights, and no gather at all when
  the rows come grouped (``mixed_forward`` and the engine group them once per step).
- **gathered** (BGMV), when each adapter has few tokens (a decode step): one kernel for
  all tokens in which each token reads its own adapter's rows of the pool. It is built
  by ``torch.compile``, which fuses the gather into the reductions, so the per-token
  weights are never materialized and the cost does not grow with the number of
  adapters in the batch. Where it cannot be compiled, segments are used.

x A^T is computed in float32 whatever the base dtype, since reduced-precision
intermediates lose the small adapter update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pool import Pool, SlotWeights

BASE = -1  # the slot id of a row that uses no adapter
GATHER_TOKENS = 8  # see Router.gather_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Which tokens go to which slot, for one forward pass."""

    order: Tensor | None  # token permutation that groups tokens by slot; None: already grouped
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) in grouped token order, slots >= 0
    token_slots: Tensor | None = None  # (N,) slot of every token in batch order: take the gathered kernel

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(slot for slot, _, _ in self.segments)


class Router:
    """Shared by every SlotLinear of a model: the route of the forward pass under way."""

    def __init__(self, capacity: int, gather_tokens: int = GATHER_TOKENS) -> None:
        self.capacity = capacity
        # the gathered kernel runs when adapters have at most this many tokens each on average;
        # 0: segments only (also set when the kernel cannot be built here)
        self.gather_tokens = gather_tokens
        self.current: Route | None = None


def make_route(row_slots: Sequence[int], seq_len: int, device: torch.device | str = "cpu",
               gather_tokens: int = 0) -> Route:
    """The route for a batch whose row i uses slot ``row_slots[i]`` (BASE for none)."""
    rows = sorted(range(len(row_slots)), key=lambda i: row_slots[i])  # stable: rows keep their order in a slot
    segments, start = [], 0
    for i, row in enumerate(rows):
        if i + 1 == len(rows) or row_slots[rows[i + 1]] != row_slots[row]:
            if row_slots[row] != BASE:
                segments.append((row_slots[row], start * seq_len, (i + 1) * seq_len))
            start = i + 1
    token_slots = None
    adapted = sum(end - begin for _, begin, end in segments)
    if len(segments) > 1 and adapted <= gather_tokens * len(segments):
        token_slots = torch.tensor(row_slots, device=device).repeat_interleave(seq_len)
    if rows == sorted(rows):
        return Route(None, tuple(segments), token_slots)
    tokens = torch.arange(seq_len, device=device)
    order = (torch.tensor(rows, device=device)[:, None] * seq_len + tokens).reshape(-1)
    return Route(order, tuple(segments), token_slots)


def add_gathered(out: Tensor, tokens: Tensor, A: Tensor, scaled_Bt: Tensor, block_of: Tensor,
                 token_slots: Tensor) -> None:
    """out[t] += (alpha / r) B_s A_s tokens[t] for every token t, with s = token_slots[t] (BGMV).

    Token t reads its adapter's block of the pool (the zero block for BASE); rows past the
    adapter's rank are zeros, so every adapter is exact at the pool's common width.
    """
    blocks = block_of[token_slots]  # (N,)
    hidden = (A[blocks] * tokens.float()[:, None, :]).sum(-1)  # (N, width, in) -> (N, width)
    out += (scaled_Bt[blocks] * hidden[:, :, None]).sum(1).to(out.dtype)  # (N, width, out) -> (N, out)


# Compiled on first call; the (N, width, in) products are fused into the sums, never stored.
_gathered_kernel = torch.compile(add_gathered, dynamic=True, fullgraph=True)


class SlotLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus adapter slots; keeps ``weight``/``bias``."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D stores W as (in, out)
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.in_features, self.out_features = (self.weight.shape if self.transposed
                                               else self.weight.shape[::-1])
        self.pool = Pool.empty(router.capacity, self.in_features, self.out_features, self.weight.device)
        object.__setattr__(self, "router", router)  # shared, not a submodule

    @property
    def slots(self) -> list[SlotWeights | None]:
        return [self.pool.weights(slot) for slot in range(self.router.capacity)]

    def fill(self, slot: int, weights: SlotWeights) -> None:
        self.pool = self.pool.filled(slot, weights)  # one assignment: a forward sees the old or the new pool

    def empty(self, slot: int) -> None:
        self.pool = self.pool.emptied(slot)

    def forward(self, x: Tensor) -> Tensor:
        if self.transposed:
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight, self.bias)
        route, pool = self.router.current, self.pool
        if route is None or not route.segments:
            return y
        tokens = x.reshape(-1, x.shape[-1])  # (N, in)
        out = y.view(-1, y.shape[-1])  # (N, out), shares y's memory
        if route.token_slots is not None and self.router.gather_tokens and self._gathered(out, tokens, pool, route):
            return y
        if route.order is None:  # rows come grouped by slot: every segment is a view
            for slot, start, end in route.segments:
                weights = pool.weights(slot)
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
            weights = pool.weights(slot)
            if weights is not None:
                torch.mm(grouped[start:end].float() @ weights.At, weights.scaled_Bt, out=delta[start:end])
        out.index_add_(0, route.order, delta.to(out.dtype))
        return y

    def _gathered(self, out: Tensor, tokens: Tensor, pool: Pool, route: Route) -> bool:
        """Add the update with the gathered kernel; False to take segments instead: when the
        pool's padding would more than double the work (a low-rank batch in a pool widened by
        one high-rank adapter), or when the kernel cannot be built here."""
        if not pool.uniform:
            needed = sum(pool.rank(slot) * (end - start) for slot, start, end in route.segments)
            if pool.A.shape[1] * tokens.shape[0] > 2 * needed:
                return False
        try:
            _gathered_kernel(out, tokens, pool.A, pool.scaled_Bt, pool.block_of, route.token_slots)
        except Exception as err:  # no C++ compiler, an unsupported device, ...: correct but slower
            log.warning("lorakit: the gathered LoRA kernel cannot be compiled here (%s); using segments", err)
            self.router.gather_tokens = 0
            return False
        return True

    def extra_repr(self) -> str:
        used = sum(span is not None for span in self.pool.spans)
        return f"in={self.in_features}, out={self.out_features}, slots={used}/{self.router.capacity}"


def enable_slots(model: nn.Module, capacity: int, gather_tokens: int = GATHER_TOKENS) -> Router:
    """Replace every linear layer except the output head by a SlotLinear with ``capacity`` slots.

    ``gather_tokens``: see ``Router``; 0 adds adapters by segments only (no compiled kernel)."""
    from ..attach import layer_class_for, output_head, replace_module
    from ..layers import LoraConv1D, LoraLinear

    router = Router(capacity, gather_tokens)
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
    router.current = make_route(row_slots, seq_len, next(model.parameters()).device, router.gather_tokens)
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

"""Mixed-adapter batches through fused MoE experts, by the grouped forward training uses.

A served model's fused-experts modules become ``SlotExperts``: the frozen expert tensors
plus, per tensor, a ``SlotExpertWeight`` that keeps every loaded adapter's E pairs stacked
as one more set of "experts", one per (expert, lane) with lane 0 the base (zeros) and lane
1 + s slot s: A (E·lanes, r, in) and s·B (E·lanes, out, r), the rank padded to the widest
loaded (a multiple of 4, as grouped GEMMs align rows), zeros being exact. Per forward the
token-expert pairs are sorted once by (expert, lane); the base product is one grouped GEMM
over the experts (experts.py's ``grouped_linear``, as in training) and the adapters' update
two more over the (expert, lane) groups, or, for few pairs (a decode step), two batched
matmuls over each pair's gathered A and B: no per-expert loop, and no host read where the
device runs ``grouped_mm`` (as on CPU with torch >= 2.10).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from ..adapter import LayerWeights
from ..experts import (PROJECTIONS, ExpertWeight, Groups, LoraExpertWeight, expert_parameters, grouped_linear,
                       grouped_mm_works)
from .route import Route, Router

ALIGN = 4  # ranks padded to a multiple of this: 16-byte rows of float32 for grouped_mm
# at most this many gathered elements (pairs x rank x (in + out)) take the gather path: a grouped
# GEMM over every (expert, lane) group costs a few microseconds per group, empty ones included
GATHER_ELEMENTS = 1 << 22


class SlotExpertWeight(nn.Module):
    """One frozen expert tensor W (E, out, in) and its adapter slots."""

    def __init__(self, weight: nn.Parameter, capacity: int) -> None:
        super().__init__()
        self.weight = weight
        self.num_experts, self.out_features, self.in_features = weight.shape
        self.capacity = capacity
        self.slots: list[LayerWeights | None] = [None] * capacity
        self.stacked: tuple[Tensor, Tensor] | None = None  # A (E·lanes, r, in), s·B (E·lanes, out, r)
        object.__setattr__(self, "base_module", ExpertWeight(weight))  # what its adapters' shapes are read from
        self.layer_class = LoraExpertWeight

    def fill(self, slot: int, weights: LayerWeights) -> None:
        slots = list(self.slots)
        slots[slot] = weights
        self._restack(slots)

    def empty(self, slot: int) -> None:
        slots = list(self.slots)
        slots[slot] = None
        self._restack(slots)

    def _restack(self, slots: list[LayerWeights | None]) -> None:
        """One assignment each: a forward sees the old stacks or the new ones."""
        filled = [(slot, w) for slot, w in enumerate(slots) if w is not None]
        stacked = None
        if filled:
            rank = -(-max(w.rank for _, w in filled) // ALIGN) * ALIGN
            lanes, E = self.capacity + 1, self.num_experts
            device = self.weight.device
            A = torch.zeros(E, lanes, rank, self.in_features, device=device)
            B = torch.zeros(E, lanes, self.out_features, rank, device=device)
            for slot, w in filled:
                A[:, slot + 1, :w.rank] = w.A.float()
                B[:, slot + 1, :, :w.rank] = w.B.float() * w.scaling
            stacked = (A.flatten(0, 1), B.flatten(0, 1))
        self.slots, self.stacked = slots, stacked

    def project(self, x: Tensor, experts: Groups, lanes: Groups | None, keys: Tensor | None) -> Tensor:
        """x W_e^T for every pair, plus, on each pair whose row has an adapter, its s·B_e·A_e·x
        (``keys``: each pair's (expert, lane) group, in the pairs' order; None: every row on the base)."""
        out = grouped_linear(x, self.weight, experts)  # (S, in) -> (S, out)
        stacked = self.stacked
        if stacked is None or keys is None:
            return out
        A, B = stacked
        if x.shape[0] * A.shape[1] * (A.shape[2] + B.shape[1]) <= GATHER_ELEMENTS:
            # few pairs (a decode step): each pair's own A and B gathered, two batched matmuls
            hidden = torch.bmm(x.float()[:, None, :], A[keys].transpose(1, 2))  # (S, 1, in) @ (S, in, r)
            return out + torch.bmm(hidden, B[keys].transpose(1, 2))[:, 0].to(out.dtype)  # (S, 1, r) @ (S, r, out)
        hidden = grouped_linear(x.float(), A, lanes)  # (S, r)
        return out + grouped_linear(hidden, B, lanes).to(out.dtype)  # (S, out)

    def extra_repr(self) -> str:
        used = sum(w is not None for w in self.slots)
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, slots={used}"


class SlotExperts(nn.Module):
    """A fused-experts module served with adapter slots (see the module docstring)."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.num_experts = base.num_experts
        self.act_fn = base.act_fn
        for name in PROJECTIONS:
            setattr(self, name, SlotExpertWeight(getattr(base, name), router.capacity))
        object.__setattr__(self, "router", router)  # shared, not a submodule

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        tokens, top_k = top_k_index.shape
        route = self.router.current
        in_use = route is not None and bool(route.segments)  # else every row on the base: no adapter work
        lanes = self.router.capacity + 1  # lane 0: rows on the base
        experts = top_k_index.reshape(-1)
        key = experts * lanes + token_lanes(tokens, route, hidden_states.device).repeat_interleave(top_k)  # (T k,)
        order = key.argsort(stable=True)  # pairs grouped by expert, then by lane
        device, real = hidden_states.device, not is_fake(hidden_states)
        by_expert = Groups(experts, self.num_experts, real and grouped_mm_works(device, hidden_states.dtype))
        by_lane = keys = None
        if in_use:  # the adapters compute in float32
            by_lane = Groups(key, self.num_experts * lanes, real and grouped_mm_works(device, torch.float32))
            keys = key[order]  # the (expert, lane) group of each pair
        rows = order // top_k  # the token of each pair
        gate, up = self.gate_up_proj.project(hidden_states[rows], by_expert, by_lane, keys).chunk(2, dim=-1)
        out = self.down_proj.project(self.act_fn(gate) * up, by_expert, by_lane, keys)  # (T k, H)
        weighted = out * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, rows, weighted.to(hidden_states.dtype))


def token_lanes(tokens: int, route: Route | None, device: torch.device) -> Tensor:
    """Each token's lane: 1 + the slot of its row, 0 on the base (slot BASE = -1); one
    assignment per adapter of the batch, none per row."""
    lanes = torch.zeros(tokens, dtype=torch.long, device=device)
    if route is None:
        return lanes
    for slot, start, end in route.segments:
        if route.order is None:
            lanes[start:end] = slot + 1
        else:
            lanes[route.order[start:end]] = slot + 1
    return lanes


def enable_expert_slots(model: nn.Module, router: Router) -> None:
    """Replace every fused-experts module of ``model`` by a SlotExperts sharing ``router``."""
    from ..layers import set_module

    found = [(path, m) for path, m in model.named_modules() if path and expert_parameters(m) is not None]
    for path, module in found:
        set_module(model, path, SlotExperts(module, router))

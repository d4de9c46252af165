"""Mixed-adapter batches through fused MoE experts (experts.py has the math).

A served model's fused-experts modules become ``SlotExperts``: the frozen expert tensors
plus, per tensor, a ``SlotExpertWeight`` that holds each loaded adapter's E pairs
(A_s (E, r, in) and s·B_s^T (E, r, out), float32). Per forward, every token-expert pair
is sorted once by (expert, slot of its row); each expert then computes its base
product on all its tokens and adds each adapter's update to that adapter's contiguous
block of them, so each row gets exactly its own adapter's experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import LayerWeights
from ..experts import PROJECTIONS, expert_parameters
from .route import Route, Router


class SlotExpertWeight(nn.Module):
    """One frozen expert tensor W (E, out, in) and its adapter slots."""

    def __init__(self, weight: nn.Parameter, capacity: int) -> None:
        super().__init__()
        self.weight = weight
        self.num_experts, self.out_features, self.in_features = weight.shape
        self.slots: list[tuple[Tensor, Tensor] | None] = [None] * capacity  # (A, s·B^T) per slot

    def fill(self, slot: int, weights: LayerWeights) -> None:
        slots = list(self.slots)  # one assignment: a forward sees the old or the new list
        slots[slot] = (weights.A.float().contiguous(), (weights.B.float() * weights.scaling).transpose(1, 2).contiguous())
        self.slots = slots

    def empty(self, slot: int) -> None:
        slots = list(self.slots)
        slots[slot] = None
        self.slots = slots

    def project(self, x: Tensor, expert: int, blocks: list[tuple[int, int, int]]) -> Tensor:
        """x W_e^T for expert e's tokens, plus, on each (slot, start, end) block of them, that
        slot's s·B_e·A_e·x."""
        out = F.linear(x, self.weight[expert])  # (n, in) @ (in, out)
        slots = self.slots
        for slot, start, end in blocks:
            pair = slots[slot]
            if pair is None:  # this adapter does not target this tensor
                continue
            A, scaled_Bt = pair
            hidden = x[start:end].float() @ A[expert].T  # (m, in) @ (in, r)
            out[start:end] += (hidden @ scaled_Bt[expert]).to(out.dtype)  # (m, r) @ (r, out)
        return out

    def extra_repr(self) -> str:
        used = sum(pair is not None for pair in self.slots)
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
        lanes = self.router.capacity + 1  # lane 0: rows on the base
        row_lane = self._token_lanes(tokens, self.router.current, hidden_states.device)
        pair_lane = row_lane.repeat_interleave(top_k)  # (T k,)
        key = top_k_index.reshape(-1) * lanes + pair_lane
        order = key.argsort(stable=True)  # pairs grouped by expert, then by slot
        counts = torch.bincount(key, minlength=self.num_experts * lanes).view(-1, lanes).tolist()  # one host read
        token_of = order // top_k
        weights = top_k_weights.reshape(-1)[order]
        output = torch.zeros_like(hidden_states)
        start = 0
        for expert, per_lane in enumerate(counts[:self.num_experts]):
            count = sum(per_lane)
            if count == 0:
                continue
            blocks, offset = [], per_lane[0]
            for lane in range(1, lanes):
                if per_lane[lane]:
                    blocks.append((lane - 1, offset, offset + per_lane[lane]))
                    offset += per_lane[lane]
            rows = token_of[start:start + count]
            gate, up = self.gate_up_proj.project(hidden_states[rows], expert, blocks).chunk(2, dim=-1)
            out = self.down_proj.project(self.act_fn(gate) * up, expert, blocks)  # (n, H)
            output.index_add_(0, rows, (out * weights[start:start + count, None]).to(output.dtype))
            start += count
        return output

    @staticmethod
    def _token_lanes(tokens: int, route: Route | None, device: torch.device) -> Tensor:
        """Each token's lane: 1 + the slot of its row, 0 on the base (slot BASE = -1)."""
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


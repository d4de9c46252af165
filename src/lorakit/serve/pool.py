"""One layer's loaded adapters, stacked in two float32 buffers of fixed-size blocks.

Slot s of a layer owns one block b_s of

    A          (blocks, width, in):  its A in the first r_s rows, zeros below
    scaled_Bt  (blocks, width, out): its (alpha / r) * B^T likewise

where ``width`` is the largest rank loaded in the layer (as vLLM's ``max_lora_rank``).
Block 0 is all zeros: rows on the base, and adapters that do not target this layer,
read it. So an adapter's weights are contiguous views (for the segmented matmuls of a
prefill), and the blocks of any set of adapters are one ``index_select`` away (for the
batched matmuls of a decode step; the zero padding makes a lower rank exact without
masks). Adapters of mixed ranks cost ``width`` rows each.

A ``Pool`` is an immutable snapshot. Filling or emptying a slot returns a new one, so
the decoding thread, which reads ``layer.pool`` once per forward, always sees one
consistent set of buffers and block indices while an adapter is installed from
another thread. New weights go into a block that no live slot owns; when there is none,
or the new rank is wider, the buffers are reallocated (at least twice the live blocks)
and the live blocks copied into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapter import LayerWeights


@dataclass(frozen=True)
class SlotWeights:
    """One filled slot of a layer: views of the pool's A (r x in) and (alpha / r) * B^T (r x out),
    made once per pool (at batch 1 a decode step's cost is mostly such small operations)."""

    A: Tensor
    scaled_Bt: Tensor
    At: Tensor = field(init=False)  # (in, r): a view, no copy

    def __post_init__(self) -> None:
        object.__setattr__(self, "At", self.A.T)


@dataclass(frozen=True)
class Pool:
    A: Tensor  # (blocks, width, in) float32; block 0 is zeros
    scaled_Bt: Tensor  # (blocks, width, out) float32
    spans: tuple[tuple[int, int] | None, ...]  # per slot: (block, rank), or None when empty
    block_of: Tensor  # (capacity + 1,) long: the block of every slot, 0 when empty; the last entry serves BASE (-1)
    uniform: bool  # every live slot has the full width: stacking reads no padding
    blocks: tuple[int, ...]  # block_of on the host
    views: tuple[SlotWeights | None, ...]  # per slot

    def consecutive(self, slots: tuple[int, ...]) -> slice | None:
        """The blocks of ``slots``, in order, as one slice of the buffers when they are
        consecutive (the batch then reads the pool in place); None otherwise."""
        first = self.blocks[slots[0]]
        if any(self.blocks[slot] != first + i for i, slot in enumerate(slots)):
            return None
        return slice(first, first + len(slots))

    @classmethod
    def empty(cls, capacity: int, in_features: int, out_features: int, device: torch.device) -> Pool:
        buffers = torch.zeros((1, 1, in_features), device=device), torch.zeros((1, 1, out_features), device=device)
        return cls._make(*buffers, (None,) * capacity)

    @classmethod
    def _make(cls, A: Tensor, scaled_Bt: Tensor, spans: tuple[tuple[int, int] | None, ...]) -> Pool:
        blocks = [span[0] if span else 0 for span in spans] + [0]
        uniform = all(span is None or span[1] == A.shape[1] for span in spans)
        views = tuple(None if span is None else SlotWeights(A[span[0], :span[1]], scaled_Bt[span[0], :span[1]])
                      for span in spans)
        return cls(A, scaled_Bt, spans, torch.tensor(blocks, device=A.device), uniform, tuple(blocks), views)

    def weights(self, slot: int) -> SlotWeights | None:
        return self.views[slot]

    def rank(self, slot: int) -> int:
        span = self.spans[slot]
        return span[1] if span else 0

    def emptied(self, slot: int) -> Pool:
        """A pool without ``slot``; its buffers shrink (a copy of the live blocks) once they are
        at least twice as wide or four times as many as the adapters left need."""
        if self.spans[slot] is None:
            return self
        spans = list(self.spans)
        spans[slot] = None
        pool = self._make(self.A, self.scaled_Bt, tuple(spans))
        live = [span for span in spans if span is not None]
        if not live:  # kept for the next adapter: a server's pools are refilled all the time
            return pool
        width = max(rank for _, rank in live)
        if 2 * width <= self.A.shape[1] or 4 * (len(live) + 1) <= self.A.shape[0]:
            return pool._rebuilt(2 * len(live) + 1, width, self.A.device)[0]
        return pool

    def filled(self, slot: int, weights: LayerWeights) -> Pool:
        """A pool with ``weights`` in ``slot`` (which must be empty)."""
        if self.spans[slot] is not None:
            raise ValueError(f"slot {slot} is in use; empty it first")
        rank = weights.A.shape[0]
        pool, block = self._room_for(rank, weights.A.device)
        # a block that no live slot owns: safe to write while other slots decode
        pool.A[block, :rank], pool.A[block, rank:] = weights.A, 0
        torch.mul(weights.B.T, weights.scaling, out=pool.scaled_Bt[block, :rank])
        pool.scaled_Bt[block, rank:] = 0
        spans = list(pool.spans)
        spans[slot] = (block, rank)
        return self._make(pool.A, pool.scaled_Bt, tuple(spans))

    def _room_for(self, rank: int, device: torch.device) -> tuple[Pool, int]:
        """A pool with a free block for an adapter of ``rank`` on ``device``, and that block:
        a free block if one fits, else new buffers (twice the blocks needed)."""
        used = {span[0] for span in self.spans if span is not None}
        blocks, width = self.A.shape[:2]
        if self.A.device == device and rank <= width:
            free = next((b for b in range(1, blocks) if b not in used), None)
            if free is not None:
                return self, free
        return self._rebuilt(max(blocks, 2 * (len(used) + 1) + 1), max(width, rank), device)

    def _rebuilt(self, size: int, width: int, device: torch.device) -> tuple[Pool, int]:
        """A pool in new buffers of ``size`` blocks of ``width`` rows, the live blocks copied
        to 1, 2, ...; and its first free block."""
        # Zeros, not torch.empty: block 0 serves BASE, and a free block never holds leftover
        # memory (a NaN there would make two equal snapshots compare unequal)
        A = torch.zeros((size, width, self.A.shape[2]), device=device)
        scaled_Bt = torch.zeros((size, width, self.scaled_Bt.shape[2]), device=device)
        spans: list[tuple[int, int] | None] = [None] * len(self.spans)
        new = 0
        for slot, span in enumerate(self.spans):
            if span is not None:
                new += 1
                block, rank = span
                A[new, :rank] = self.A[block, :rank]
                scaled_Bt[new, :rank] = self.scaled_Bt[block, :rank]
                spans[slot] = (new, rank)
        return self._make(A, scaled_Bt, tuple(spans)), new + 1

"""Which rows of a batch go to which adapter slot: one ``Route`` per forward pass, shared by
every slotted layer of the model through its ``Router`` (slots.py has the two ways a route
is used: segments and stacked groups)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BASE = -1  # the slot id of a row that uses no adapter
STACK_TOKENS = 8  # see Router.stack_tokens


@dataclass(frozen=True)
class Stack:
    """Tokens [start, end) as groups of ``length`` tokens, group g on slot slots[g]."""

    start: int
    end: int
    length: int
    slots: Tensor  # (G,)
    slot_ids: tuple[int, ...]  # the same, on the host: finds blocks that need no gather


@dataclass(frozen=True)
class Route:
    """Which tokens go to which slot, for one forward pass."""

    order: Tensor | None  # token permutation that groups tokens by slot; None: already grouped
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) in grouped token order, slots >= 0
    stack: Stack | None = None  # set when the batch takes the stacked path


class Router:
    """Shared by every slotted layer of a model, held by the engine that serves it: the route
    of the forward pass under way (the context the layers read; nothing on the model)."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu", stack_tokens: int = STACK_TOKENS) -> None:
        self.capacity = capacity
        self.device = torch.device(device)
        # the stacked path runs when every adapter of a grouped batch has as many tokens, or
        # when adapters have at most this many tokens each on average; 0: never
        self.stack_tokens = stack_tokens
        self.current: Route | None = None


def make_route(row_slots: Sequence[int], seq_len: int, device: torch.device | str = "cpu",
               stack_tokens: int = 0) -> Route:
    """The route for a batch whose row i uses slot ``row_slots[i]`` (BASE for none)."""
    rows = sorted(range(len(row_slots)), key=lambda i: row_slots[i])  # stable: rows keep their order in a slot
    segments, start = [], 0
    for i, row in enumerate(rows):
        if i + 1 == len(rows) or row_slots[rows[i + 1]] != row_slots[row]:
            if row_slots[row] != BASE:
                segments.append((row_slots[row], start * seq_len, (i + 1) * seq_len))
            start = i + 1
    stack = None
    adapted = sum(end - begin for _, begin, end in segments)
    grouped = rows == sorted(rows)
    lengths = {end - begin for _, begin, end in segments}
    if stack_tokens and len(segments) > 1 and grouped and len(lengths) == 1:
        # one group per adapter, after the base rows: no more weights copied than the batch uses
        slot_ids = tuple(slot for slot, _, _ in segments)
        stack = Stack(segments[0][1], segments[-1][2], lengths.pop(), torch.tensor(slot_ids, device=device), slot_ids)
    elif len(segments) > 1 and adapted <= stack_tokens * len(segments):
        # one group per token, base tokens included (they meet the zero block)
        slot_ids = tuple(slot for slot in row_slots for _ in range(seq_len))
        stack = Stack(0, len(slot_ids), 1, torch.tensor(slot_ids, device=device), slot_ids)
    if grouped:
        return Route(None, tuple(segments), stack)
    tokens = torch.arange(seq_len, device=device)
    order = (torch.tensor(rows, device=device)[:, None] * seq_len + tokens).reshape(-1)
    return Route(order, tuple(segments), stack)

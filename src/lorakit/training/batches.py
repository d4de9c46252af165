"""From examples to batches: held-out split, packing, padding, and which examples each
optimizer step sees.

A batch is laid out for a causal LM without an attention mask: every row is one or
more examples back to back, each with positions restarting at 0, then padding with
positions restarting at 0 again (padding-free batching: short examples share a row). transformers reads position ids that restart as
separate sequences and blocks attention between them, so a packed example sees
exactly what it would see alone, and padding never leaks into a real token.

The order of examples is a stream of seeded permutations, one per epoch. Step ``s``
takes the next ``batch_size`` items of that stream, so the examples of a step depend
only on (seed, step): a resumed run and a run on N processes see the same global
batches as one uninterrupted process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .data import IGNORE, DataError, Example

Sample = tuple[Example, ...]  # one row of a batch: one example, or several packed


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T)
    position_ids: Tensor  # (B, T), restarting at 0 for each example and for the padding
    targets: Tensor  # (B, T): the token to predict at each position, IGNORE where it is not trained
    length: int  # real (not padding) tokens
    trained: int | None = None  # positions with a target, counted when collated (None: count them)

    @property
    def tokens(self) -> int:
        """Positions with a target. Counted from the examples on the host: reading a device
        tensor here would make every training step wait for the GPU."""
        return self.trained if self.trained is not None else int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device), self.length,
                     self.tokens)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random ``fraction`` of the examples is held out (at least one)."""
    if not 0 < fraction < 1:
        raise DataError(f"eval fraction must be between 0 and 1, got {fraction}")
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise DataError(f"{len(examples)} example(s) cannot be split into training and {fraction:.0%} held out")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def samples(examples: list[Example], max_length: int, pack: bool) -> list[Sample]:
    """One sample per example, or (``pack``) examples packed into rows of at most
    ``max_length`` tokens, so that each optimizer step sees full rows."""
    singles = [(e,) for e in examples]
    return first_fit(singles, max_length) if pack else singles


def first_fit(items: list[Sample], capacity: int) -> list[Sample]:
    """Pack samples, longest first, each into the first row with room (first-fit decreasing)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda s: -_length(s)):  # stable: ties keep their order
        size = _length(item)
        row = next((i for i, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].extend(item)
        room[row] -= size
    return [tuple(row) for row in rows]


def _length(sample: Sample) -> int:
    return sum(len(e.input_ids) for e in sample)


def collate(batch: list[Sample], pad_id: int = 0) -> Batch:
    """Lay the samples out in as few rows as possible, none wider than the longest sample.

    Shorter samples share a row instead of being padded to the longest: the same
    tokens and the same loss as one padded row per sample, with less padding to
    compute (often half of a chat batch).
    """
    width = max(_length(sample) for sample in batch)
    rows = first_fit(batch, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, sample in enumerate(rows):
        start = 0
        for example in sample:
            n = len(example.input_ids)
            ids[row, start:start + n] = torch.tensor(example.input_ids)
            positions[row, start:start + n] = torch.arange(n)
            # Position t predicts token t + 1 of the same example; the last predicts nothing.
            targets[row, start:start + n - 1] = torch.tensor(example.labels[1:])
            start += n
        positions[row, start:] = torch.arange(width - start)
    return Batch(ids, positions, targets, sum(_length(sample) for sample in rows),
                 sum(example.trained_tokens for sample in rows for example in sample))


@lru_cache(maxsize=4)
def _epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(count, generator=generator).tolist())


def step_indices(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The sample indices of optimizer step ``step`` (0-based) in the epoch stream."""
    indices: list[int] = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, count)
        take = min(batch_size - len(indices), count - offset)
        indices += _epoch_order(count, seed, epoch)[offset:offset + take]
        position += take
    return indices


def micro_batches(indices: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This process's share of a step (every ``world_size``-th index), in micro-batches."""
    share = indices[rank::world_size]
    return [share[i:i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]

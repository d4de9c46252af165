"""Log-probabilities of completions, the quantity DPO and GRPO train on.

    log π(y | x) = Σ_t log softmax(z_t / T)[y_t]        over the completion tokens y_t

A batch holds one prompt + completion per row, right-padded: real tokens never attend to
the padding after them, so no attention mask is needed, and positions restart at 0 in
the padding as in the SFT batches (batches.py). Only completion positions have a target.

The head runs only on those positions, a chunk of tokens at a time under activation
checkpointing: at most one chunk's (tokens x vocabulary) float32 logits are alive, in the
forward pass and again in the backward pass, which recomputes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..pretrained import CHUNK_LOGITS, chunk_tokens, split_head
from .data import IGNORE


@dataclass
class Rows:
    """Prompt + completion rows: ``targets[b, t]`` is the token position t predicts (IGNORE
    outside completions)."""

    input_ids: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    targets: Tensor  # (B, T)

    def to(self, device: torch.device) -> Rows:
        return Rows(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device))

    @property
    def mask(self) -> Tensor:
        """(B, T): 1.0 where a completion token is predicted."""
        return (self.targets != IGNORE).float()


def make_rows(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Rows:
    """Rows of (prompt ids, completion ids) pairs, right-padded to the longest."""
    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        ids[row, :n] = torch.tensor([*prompt, *completion])
        # position t predicts token t + 1: the last prompt token predicts the first completion token
        targets[row, len(prompt) - 1:n - 1] = torch.tensor(list(completion))
        positions[row, :n] = torch.arange(n)
        positions[row, n:] = torch.arange(width - n)
    return Rows(ids, positions, targets)


def token_logps(model: nn.Module, rows: Rows, temperature: float = 1.0, chunk_logits: int = CHUNK_LOGITS) -> Tensor:
    """(B, T) float32: log p(target) at every completion position, 0 elsewhere."""
    keep = rows.targets != IGNORE
    inputs = dict(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False)
    parts = split_head(model)
    if parts is None:
        values = _picked(model(**inputs).logits[keep], rows.targets[keep], temperature)
    else:
        backbone, head = parts
        hidden = backbone(**inputs)[0][keep]  # (B, T, H) -> (N, H)
        targets = rows.targets[keep]
        chunk = chunk_tokens(model.config.vocab_size, chunk_logits) if chunk_logits else max(1, len(targets))
        pieces = [_chunk_logps(hidden[s:s + chunk], head, targets[s:s + chunk], temperature) if not hidden.requires_grad
                  else checkpoint(_chunk_logps, hidden[s:s + chunk], head, targets[s:s + chunk], temperature,
                                  use_reentrant=False)
                  for s in range(0, len(targets), chunk)]
        values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=values.device)
    return out.masked_scatter(keep, values)


def _chunk_logps(hidden: Tensor, head: nn.Module, targets: Tensor, temperature: float) -> Tensor:
    return _picked(head(hidden), targets, temperature)


def _picked(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """log softmax(z / T)[target] of every row of ``logits`` (n, V), in float32."""
    logits = logits.float() / temperature
    return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def sequence_logps(model: nn.Module, rows: Rows) -> Tensor:
    """(B,): log π(completion | prompt) of every row."""
    return token_logps(model, rows).sum(-1)


"""The training loss: cross-entropy summed over the trained tokens of a batch.

The sum (not the mean) is returned so that the loop can divide by the number of
trained tokens in the whole optimizer step, over every micro-batch and process:
accumulated gradients then equal those of one large batch.

The output head runs only on positions that have a target. With prompt masking most
positions have none (about 70 % of the tokens of a chat corpus), and the head is the
largest single matmul of a small LM (SmolLM2: 28 M of its 135 M weights), so skipping
them saves time and the (tokens x vocabulary) logits memory; the loss is the same.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .batches import Batch
from .data import IGNORE

# Config fields of models that post-process logits (Gemma 2, Cohere, Granite): for
# those the full forward runs, and its logits are used.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output head) of a transformers causal LM whose logits are head(hidden); None otherwise."""
    backbone = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    if backbone is None or backbone is model or head is None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return backbone, head


def loss_sum(model: nn.Module, batch: Batch) -> Tensor:
    """Sum of the cross-entropy of every trained target in ``batch`` (a 0-d float32 tensor)."""
    keep = batch.targets != IGNORE  # (B, T)
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs).logits[keep]  # (B, T, V) -> (N, V)
    else:
        backbone, head = parts
        hidden = backbone(**inputs)[0]  # (B, T, H)
        logits = head(hidden[keep])  # (N, H) -> (N, V)
    return F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")


class LossModule(nn.Module):
    """``loss_sum`` as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        return loss_sum(self.model, batch)

"""The training loss: cross-entropy summed over the trained tokens of a batch.

The sum (not the mean) is returned so that the loop can divide by the number of
trained tokens in the whole optimizer step, over every micro-batch and process:
accumulated gradients then equal those of one large batch.

The output head runs only on positions that have a target. With prompt masking most
positions have none (about 70 % of the tokens of a chat corpus), and the head is the
largest single matmul of a small LM (SmolLM2: 28 M of its 135 M weights), so skipping
them saves time and the (tokens x vocabulary) logits memory; the loss is the same.

Even so, N trained tokens need N x V float32 logits, their softmax and their gradient
at once (8 x 512 tokens of SmolLM2's 49,152-word vocabulary: 3 x 0.8 GB). So the head
and the loss run over chunks of tokens, and each chunk's gradient with respect to the
hidden states,

    d loss / d h = (softmax(h W^T) - onehot(target)) W,

is computed right there, while its logits exist (the fused linear cross-entropy of
Liger-Kernel and Unsloth, here in PyTorch). Backward then only scales the stored
(N x H) gradient: one chunk's logits are alive at a time, and nothing is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pretrained import CHUNK_LOGITS, chunk_tokens, split_head
from .batches import Batch
from .data import IGNORE

def loss_sum(model: nn.Module, batch: Batch, chunk_logits: int = CHUNK_LOGITS) -> Tensor:
    """Sum of the cross-entropy of every trained target in ``batch`` (a 0-d float32 tensor).

    ``chunk_logits``: logits per head-and-loss chunk (0: all at once)."""
    keep = batch.targets != IGNORE  # (B, T)
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs).logits[keep]  # (B, T, V) -> (N, V)
        return F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")
    backbone, head = parts
    hidden = backbone(**inputs)[0][keep]  # (B, T, H) -> (N, H)
    if chunk_logits and type(head) is nn.Linear:  # a plain head (an adapted one runs whole)
        chunk = chunk_tokens(head.out_features, chunk_logits)
        return ChunkedHeadLoss.apply(hidden, head.weight, head.bias, batch.targets[keep], chunk)
    return F.cross_entropy(head(hidden).float(), batch.targets[keep], reduction="sum")


class ChunkedHeadLoss(torch.autograd.Function):
    """sum_i cross_entropy(h_i W^T + b, target_i), ``chunk`` rows at a time, with the
    gradients of h (and of W and b when they train) computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=total.dtype) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=total.dtype) if want_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            loss, grad = _cross_entropy_and_softmax(F.linear(h, weight, bias), t)
            total += loss
            if want_h or want_w or want_b:
                grad[torch.arange(len(t), device=t.device), t] -= 1  # d loss / d logits = softmax - onehot
            if want_h:
                grad_h[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)  # (n, V) @ (V, H)
            if want_w:
                grad_w += grad.T @ h.to(grad.dtype)  # (V, n) @ (n, H)
            if want_b:
                grad_b += grad.sum(dim=0)
            del grad  # before the next chunk's logits exist: one (n, V) buffer at a time
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.wanted = (want_h, want_w, want_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if wanted else None for wanted in ctx.wanted]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return grads[0], grads[1], grads[2], None, None


def _cross_entropy_and_softmax(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_i logsumexp(z_i) - z_i[t_i], softmax(z)) for logits z (n, V), in float32 at least.

    One (n, V) buffer holds z - max, then its exponent, then the softmax, each step in
    place: F.cross_entropy and torch.softmax would allocate two more of them."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a copy only for half precision
    peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    picked = logits.gather(1, targets[:, None]) - peak  # (n, 1)
    exp = logits.sub_(peak).exp_()
    norm = exp.sum(dim=-1, keepdim=True)  # (n, 1)
    loss = (norm.log() - picked).sum()
    return loss, exp.div_(norm)


class LossModule(nn.Module):
    """``loss_sum`` as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        return loss_sum(self.model, batch)

"""The engine's own forward pass for Llama-family models (Llama, Mistral, Qwen2, Qwen3): a
prompt's prefill and each decode step, on the engine's key/value buffers, without
transformers' generic forward.

At one new token per row, a decode step's arithmetic is one pass over the weights.
transformers' forward adds, per layer and per step, the building of a 4-D mask, a cache
object's update, the attention-function lookup, keyword plumbing and output records: on a
CPU at batch 1 about 5 ms of SmolLM2-135M's 40 ms step. ``CachedForward`` runs the model's own modules
(embedding, norms, projections with their slotted or attached adapters, rotary embedding,
MLP, output head) in the order transformers runs them, writes each layer's keys and values
straight into the engine's buffers (a prefill into new ones: nothing copied afterwards), and
at decode computes attention with the query heads packed by key/value head: head h = kv·g + j
attends as query j of key/value head kv, as transformers' ``pack_gqa`` does. Same modules,
same arithmetic up to the attention kernel's rounding: the tests check the logits against the
generic forward and that greedy decoding picks the same tokens (tests/test_serve_forward.py).

Models of other families, a scored prompt (logits at every position) and a pass beyond a
sliding attention window take the generic forward (``build`` returns None; ``fits`` says False).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from .kvcache import HEADROOM

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class CachedForward:
    """Logits of the next token of every row from a model's own modules, extending its key/value buffers."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        self.embed, self.norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        self.layers = list(inner.layers)
        attention = self.layers[0].self_attn
        config = model.config
        self.head_dim = attention.head_dim
        self.kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // self.kv_heads
        self.scaling = attention.scaling
        self.query_norm = hasattr(attention, "q_norm")  # Qwen3 normalises each head's q and k before rotating
        # the family's own rotation, as its attention applies it
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.window = _window(config)

    @classmethod
    def build(cls, model: nn.Module) -> CachedForward | None:
        """The forward for ``model``, or None when it is not of a family this module knows."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in FAMILIES or not hasattr(model, "lm_head"):
            return None
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        return cls(model)

    def buffers(self, rows: int, width: int) -> list[tuple[Tensor, Tensor]]:
        """Empty key and value buffers for ``rows`` rows of ``width`` columns, with room to grow."""
        shape = (rows, self.kv_heads, width + HEADROOM, self.head_dim)
        weight = self.embed.weight
        return [(weight.new_empty(shape), weight.new_empty(shape)) for _ in self.layers]

    def fits(self, width: int) -> bool:
        """Whether a pass attending over ``width`` columns needs no sliding window."""
        return self.window is None or width <= self.window

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor | None,
                 cache: list[tuple[Tensor, Tensor]], column: int) -> Tensor:
        """Float logits (B, vocab) of the token after the last of ``tokens`` (B, T) at ``positions`` (B, T).

        ``cache``: each layer's key and value buffers (B, kv_heads, capacity, head_dim), columns
        [0, column) in use; the step writes its keys and values at columns [column, column + T).
        ``mask``: (B, column + T), 1 for the columns a row attends to (None: every column)."""
        hidden = self.embed(tokens)  # (B, T, hidden)
        cos, sin = self.rotary(hidden, positions)
        attend = _attention_mask(mask, tokens.shape[1], column)
        for layer, (keys, values) in zip(self.layers, cache):
            hidden = hidden + self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, attend,
                                              keys, values, column)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.head(self.norm(hidden[:, -1:]))[:, -1].float()

    def _attention(self, attention: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None,
                   keys: Tensor, values: Tensor, column: int) -> Tensor:
        rows, length = x.shape[:2]
        if length == 1:  # (B, kv, g, D): one key/value head's g query heads as g queries
            query = attention.q_proj(x).view(rows, self.kv_heads, self.group, self.head_dim)
        else:  # (B, heads, T, D)
            query = attention.q_proj(x).view(rows, length, -1, self.head_dim).transpose(1, 2)
        key = attention.k_proj(x).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        value = attention.v_proj(x).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.query_norm:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = self.rotate(query, key, cos, sin)  # cos, sin (B, T, D) broadcast over heads
        end = column + length
        keys[:, :, column:end] = key
        values[:, :, column:end] = value
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys[:, :, :end], values[:, :, :end], attn_mask=attend, scale=self.scaling,
            is_causal=attend is None and length > 1, enable_gqa=length > 1)
        if length > 1:
            out = out.transpose(1, 2)
        return attention.o_proj(out.reshape(rows, length, -1))  # head kv·g + j, as o_proj reads them


def _attention_mask(mask: Tensor | None, length: int, column: int) -> Tensor | None:
    """Which columns each new token attends to: (B, 1, T, column + T) boolean, or None when that
    is every column (one token) or the causal pattern (a first prompt, ``is_causal``); ``mask``
    None says the rows have no padding.

    A left-padding position attends to itself alone: a query that sees no key at all would give
    NaN, which the next layer's keys would carry into every row's attention (weight 0 times NaN)."""
    if mask is None:
        if length > 1 and column > 0:  # is_causal would align the new tokens with the first columns
            raise ValueError("several new tokens after cached ones need the mask of their columns")
        return None
    width = column + length
    real = mask.bool()
    attend = real[:, None, None, :]  # (B, 1, 1, width)
    if length == 1:
        return attend
    keys = torch.arange(width, device=real.device)
    queries = torch.arange(column, width, device=real.device)[:, None]
    return (attend & (keys <= queries)) | (keys == queries)


def _window(config) -> int | None:
    """The sliding attention window any layer uses, or None."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(kind == "full_attention" for kind in layer_types):
        return None
    return window

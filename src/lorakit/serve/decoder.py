"""One decode step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3) without transformers'
generic forward.

At one new token per row, a step's arithmetic is one pass over the weights. transformers'
forward adds, per layer and per step, the building of a 4-D mask, a cache object's update,
the attention-function lookup, keyword plumbing and output records: on a CPU at batch 1
that cost about as much again as the matmuls. ``DecodeStep`` runs the model's own modules
(embedding, norms, projections with their slotted or attached adapters, rotary embedding,
MLP, output head) in the order transformers runs them, on the engine's key/value buffers,
and computes attention with the query heads packed by key/value head: head h = kv·g + j
attends as query j of key/value head kv, the layout transformers' ``pack_gqa`` uses at
decode. Same modules, same arithmetic: the logits agree with the generic forward to
float rounding and greedy decoding picks the same tokens (tests/test_serve_decoder.py).

Models of other families, and a step past a sliding attention window, take the generic
forward (``DecodeStep.build`` returns None; ``fits`` says False).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class DecodeStep:
    """Logits of the next token of every row, given its last token, from a model's own modules."""

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
    def build(cls, model: nn.Module) -> DecodeStep | None:
        """The step for ``model``, or None when it is not of a family the step knows."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in FAMILIES or not hasattr(model, "lm_head"):
            return None
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        return cls(model)

    def fits(self, width: int) -> bool:
        """Whether a step attending over ``width`` columns needs no sliding window."""
        return self.window is None or width <= self.window

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor | None,
                 cache: list[tuple[Tensor, Tensor]], column: int) -> Tensor:
        """Float logits (B, vocab) of the token after ``tokens`` (B, 1) at ``positions`` (B, 1).

        ``cache``: each layer's key and value buffers (B, kv_heads, capacity, head_dim), columns
        [0, column) in use; the step writes its keys and values at ``column``. ``mask``: (B,
        column + 1), 1 for the columns a row attends to (None: every column)."""
        hidden = self.embed(tokens)  # (B, 1, hidden)
        cos, sin = self.rotary(hidden, positions)
        attend = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, column + 1)
        for layer, (keys, values) in zip(self.layers, cache):
            hidden = hidden + self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, attend,
                                              keys, values, column)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.head(self.norm(hidden))[:, -1].float()

    def _attention(self, attention: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None,
                   keys: Tensor, values: Tensor, column: int) -> Tensor:
        rows = x.shape[0]
        query = attention.q_proj(x).view(rows, self.kv_heads, self.group, self.head_dim)
        key = attention.k_proj(x).view(rows, self.kv_heads, 1, self.head_dim)
        value = attention.v_proj(x).view(rows, self.kv_heads, 1, self.head_dim)
        if self.query_norm:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = self.rotate(query, key, cos, sin)  # cos, sin (B, 1, D) broadcast over heads
        keys[:, :, column:column + 1] = key
        values[:, :, column:column + 1] = value
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys[:, :, :column + 1], values[:, :, :column + 1], attn_mask=attend, scale=self.scaling)
        return attention.o_proj(out.reshape(rows, 1, -1))  # (B, kv, g, D): head kv·g + j, as o_proj reads them


def _window(config) -> int | None:
    """The sliding attention window any layer uses, or None."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(kind == "full_attention" for kind in layer_types):
        return None
    return window

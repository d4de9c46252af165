"""The running batch's key/value cache, preallocated along the sequence.

transformers' ``DynamicCache`` appends a decoding step's keys and values with
``torch.cat``, copying the whole cache of every layer at every step: O(length) per
token, which at a few hundred tokens costs more than the forward pass itself. Here each
layer's keys and values live in buffers with room to spare (``(B, H, capacity, D)``);
a step writes its one new column in place and attention reads a view of the columns in
use. The buffers are rebuilt only when rows join or leave the batch (which copies
anyway), or, rarely, when they run out of room (capacity doubles).

Rows are left-padded to a common width, so every row writes the same column.
"""

from __future__ import annotations

from functools import cache

from torch import Tensor

HEADROOM = 32  # columns allocated beyond the width in use when buffers are (re)built


@cache
def _cache_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer that writes new keys and values into preallocated buffers."""

        def __init__(self, keys: Tensor, values: Tensor, length: int) -> None:
            super().__init__()
            self.buffers = (keys, values)
            self.length = length
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            end = self.length + key_states.shape[-2]
            keys, values = self.buffers
            keys[:, :, self.length:end] = key_states
            values[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = keys[:, :, :end], values[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    return BufferLayer


class KVCache:
    """Per-layer key and value buffers of a batch; ``width`` columns are in use."""

    def __init__(self, layers: list[tuple[Tensor, Tensor]], width: int) -> None:
        self.layers, self.width = layers, width

    @classmethod
    def build(cls, layers: list[tuple[Tensor, Tensor]]) -> KVCache:
        """Buffers holding ``layers`` (each (keys, values) of shape (B, H, L, D)), with headroom."""
        width = layers[0][0].shape[2]
        return cls([(_with_room(k, width), _with_room(v, width)) for k, v in layers], width)

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[2]

    def for_forward(self, rows: slice = slice(None)):
        """A transformers cache over the columns in use (of ``rows``), whose next step is
        written in place. Makes room for one more column first."""
        from transformers import DynamicCache

        self.make_room()
        layer_class = _cache_layer_class()
        past = DynamicCache()
        past.layers = [layer_class(k[rows], v[rows], self.width) for k, v in self.layers]
        return past

    def make_room(self) -> None:
        """At least one free column after ``width`` (the buffers double when full)."""
        if self.width + 1 > self.capacity:
            self.layers = [(_with_room(k[:, :, :self.width], 2 * self.width),
                            _with_room(v[:, :, :self.width], 2 * self.width)) for k, v in self.layers]

    def columns(self) -> list[tuple[Tensor, Tensor]]:
        """Views of the columns in use, per layer."""
        return [(k[:, :, :self.width], v[:, :, :self.width]) for k, v in self.layers]

    def joined(self, other: KVCache, order: Tensor) -> KVCache:
        """This batch's rows and ``other``'s, left-padded to a common width, in ``order``."""
        width = max(self.width, other.width)
        layers = []
        for (k0, v0), (k1, v1) in zip(self.columns(), other.columns()):
            layers.append((_stack([k0, k1], width)[order], _stack([v0, v1], width)[order]))
        return KVCache(layers, width)

    def selected(self, rows: Tensor, first: int) -> KVCache:
        """The rows ``rows``, without the first ``first`` columns (padding in every kept row)."""
        width = self.width - first
        return KVCache([(_with_room(k.index_select(0, rows)[:, :, first:self.width], width),
                         _with_room(v.index_select(0, rows)[:, :, first:self.width], width))
                        for k, v in self.layers], width)


def _with_room(t: Tensor, width: int) -> Tensor:
    """``t`` (B, H, L, D) copied into a buffer of ``width + HEADROOM`` columns, left-aligned."""
    buffer = t.new_empty((t.shape[0], t.shape[1], width + HEADROOM, t.shape[3]))
    buffer[:, :, :t.shape[2]] = t
    return buffer


def _stack(parts: list[Tensor], width: int) -> Tensor:
    """Rows of ``parts`` in one buffer, each right-aligned at ``width`` (left padding of zeros)."""
    rows = sum(p.shape[0] for p in parts)
    first = parts[0]
    buffer = first.new_zeros((rows, first.shape[1], width + HEADROOM, first.shape[3]))
    start = 0
    for part in parts:
        buffer[start:start + part.shape[0], :, width - part.shape[2]:width] = part
        start += part.shape[0]
    return buffer

"""Merge adapters into the base weights and take them out again.

    W <- W + (alpha / r) * B @ A          (Hu et al., 2021, arXiv:2106.09685, sec. 4.1)

The update is computed in float32 and rounded to the weight's dtype once, so a
bf16 base loses no more than one rounding. Both operations are explicit and
idempotent: merging a merged adapter, or unmerging an unmerged one, does nothing.
Unmerging subtracts the same float32 update, which restores W up to that one
rounding (exactly for most float32 weights; see the tests for the bound).

A base quantized by lorakit (nf4, int8) is dequantized, W + delta computed in float32
and quantized again: the model keeps its quantized size, and unmerging restores W to
within one quantization step. ``lorakit merge`` writes a dense model instead
(``pretrained.save_merged``), which loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import frozen
from .adapter import Adapter
from .attach import active_adapters, adapters, known_adapters, lora_layers


class MergeError(ValueError):
    """Merging would write non-finite values into the base weights; nothing was changed."""


def merge(model: nn.Module, names: Sequence[str] | None = None, safe: bool = True) -> None:
    """Merge adapters (default: the active ones) into the base weights.

    With ``safe`` every merged weight is computed and checked for NaN/Inf before any
    weight is written, so a broken adapter leaves the model untouched.
    """
    _merge(model, names, safe)


def _merge(model: nn.Module, names: Sequence[str] | None, safe: bool) -> None:
    names = known_adapters(model, active_adapters(model) if names is None else names)
    pending = [(path, layer, n) for path, layer in lora_layers(model)
               for n in names if n in layer.adapters and n not in layer.merged]
    for path, layer, name in pending:
        kind = frozen.quantization(layer.weight)
        if kind is not None and kind.startswith("bnb"):
            raise MergeError(f"{path}: cannot merge into a bitsandbytes {kind} weight; load the base "
                             "unquantized (or quantized by lorakit) to merge; nothing was merged")
    if safe:
        for path, layer, name in pending:
            merged = layer.merged_weight(name).to(frozen.compute_dtype(layer.weight))
            if not torch.isfinite(merged).all():
                raise MergeError(f"adapter {name!r} on {path}: merging gives NaN/Inf weights; nothing was merged")
    for _, layer, name in pending:
        layer.merge(name)


def unmerge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Take merged adapters (default: all) back out of the base weights."""
    names = None if names is None else known_adapters(model, names)
    for _, layer in lora_layers(model):
        # Newest first, so a stack of merges unwinds in reverse order.
        for name in reversed(list(layer.merged)):
            if names is None or name in names:
                layer.unmerge(name)


def detach(model: nn.Module, merge: bool = True, safe: bool = True) -> nn.Module:
    """Put the original module types back, with the active adapters merged in (``merge``) or not.

    Returns the same model object, free of LoRA layers; its parameters stay frozen.
    """
    active = active_adapters(model)
    unmerge(model, [n for n in adapters(model) if not (merge and n in active)])
    if merge:
        _merge(model, active, safe)
    for path, layer in lora_layers(model):
        for name in list(layer.adapters):
            layer.release(name)  # an adapter left unmerged gives back what it took from W (PiSSA/OLoRA)
        layer.unwrap(model, path)
    model.__dict__.pop("lorakit_configs", None)
    return model


def weight_key(base: Mapping[str, Tensor], path: str) -> str:
    """The state-dict key of the weight an adapter at ``path`` updates: a module's
    ``path.weight``, or the tensor at ``path`` itself (a fused experts tensor)."""
    return path if f"{path}.weight" not in base and path in base else f"{path}.weight"


def merged_state_dict(base: Mapping[str, Tensor], adapter: Adapter) -> dict[str, Tensor]:
    """A new state dict: ``base`` with every ΔW of ``adapter`` merged in (float32, rounded
    once, as torchtune's ``get_merged_lora_ckpt``) and its saved modules in place, with no
    model at all. ``base`` is not changed; every key and shape is checked before anything
    is computed."""
    problems = []
    for path, layer in adapter.layers.items():
        key = weight_key(base, path)
        if key not in base:
            problems.append(f"{path}: no {key!r} in the base state dict")
            continue
        shape = layer.update_shape()
        flat = layer.shape is None and len(shape) == 2  # an update of unknown layout as (out, in·kh·kw)
        if tuple(base[key].shape) != shape and not (flat and base[key].reshape(shape[0], -1).shape == shape):
            problems.append(f"{path}: weight {tuple(base[key].shape)}, the adapter's update is {shape}")
    for key, tensor in adapter.saved.items():
        if key in base and base[key].shape != tensor.shape:
            problems.append(f"{key}: base {tuple(base[key].shape)}, saved module {tuple(tensor.shape)}")
    if problems:
        raise ValueError("the adapter does not fit the base state dict:\n  " + "\n  ".join(problems[:10]))
    merged = dict(base)
    for path, layer in adapter.layers.items():
        key = weight_key(base, path)
        merged[key] = layer.kind.merge_value(base[key].float(), layer).to(base[key].dtype)
    merged.update({key: tensor.detach().clone() for key, tensor in adapter.saved.items()})
    return merged

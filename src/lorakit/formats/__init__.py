"""Adapter file formats, each a table of key rules over the one adapter value.

Every format turns a file into ``Adapter`` values (adapter.py) and back; loading into
a model, with every key and shape checked before the model changes, and the atomic
writing of directories are shared (files.py). The formats:

- ``peft``: PEFT's adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``diffusers``: diffusers' one-file LoRA (``pytorch_lora_weights.safetensors``, keys under
  ``unet.`` / ``transformer.`` / ``text_encoder.``), one adapter per model component;
- ``kohya``: the kohya-ss / A1111 files image users trade (``lora_unet_…`` keys with
  ``lora_down`` / ``lora_up`` / ``alpha``).

Files are safetensors only: pickles can run code when loaded and are never read.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
import torch
from torch import Tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# transformers 5 flattened CLIPTextModel: what was ``text_model.encoder.layers.0`` is now
# ``encoder.layers.0``. Files made before (most kohya and diffusers text-encoder LoRAs)
# use the old tree; they are read into a flattened model with this prefix removed.
LEGACY_TEXT_PREFIX = "text_model."
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def is_flattened_text_model(component: str, model) -> bool:
    """Whether ``model`` is a text encoder whose module paths lack the old ``text_model.``."""
    return component in TEXT_COMPONENTS and hasattr(model, "encoder") and not hasattr(model, "text_model")


class AdapterFileError(ValueError):
    """An adapter file is missing, unsafe, malformed or does not fit the model."""


def read_safetensors(source: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of the safetensors file ``source`` and its metadata; pickles refused."""
    if source.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{source}: pickled weights are never loaded (unpickling can run arbitrary code); "
                               "convert the file to .safetensors")
    if not source.is_file():
        raise AdapterFileError(f"{source}: missing")
    try:
        with safe_open(source, framework="pt") as handle:
            tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{source}: not a readable safetensors file ({err})") from None
    poisoned = [key for key, tensor in tensors.items() if not finite(tensor)]
    if poisoned:  # loaded, merged or served, one such value spreads to every output it touches
        raise AdapterFileError(f"{source}: tensor {poisoned[0]} has NaN or infinite values"
                               + (f" (and {len(poisoned) - 1} more tensors)" if len(poisoned) > 1 else ""))
    return tensors, metadata


def finite(tensor: Tensor) -> bool:
    """No NaN or infinity in ``tensor`` (integer tensors always pass)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)  # one pass; NaN and inf reach the min or the max
    return bool(torch.isfinite(low) and torch.isfinite(high))

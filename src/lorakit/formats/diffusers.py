"""diffusers' LoRA file: one ``pytorch_lora_weights.safetensors`` for a whole pipeline.

    unet.P.lora_A.weight, unet.P.lora_B.weight             the UNet's module at path P
    transformer.P.lora_A.weight, ...                       a DiT's (SD3, Flux)
    text_encoder.P.lora_A.weight, text_encoder_2.P...      the CLIP text encoder(s)

The keys are PEFT's (formats/peft.py) under the component's name. What PEFT keeps in
adapter_config.json travels in the file's metadata, under ``lora_adapter_metadata``,
as one JSON object whose keys carry the same prefixes (``unet.r``, ``unet.lora_alpha``,
...), which is what ``save_lora_weights`` writes and ``load_lora_weights`` reads. A
file without it (older diffusers, hand-made) gets what diffusers assumes then: each
module's rank from its B and alpha equal to that rank (scaling 1).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..adapter import Adapter
from ..config import ConfigError, LoraConfig, config_for_layers
from ..variants import adapter_class
from . import LEGACY_TEXT_PREFIX, AdapterFileError
from .peft import config_from_peft, config_to_peft, from_tensors, tensor_key, to_tensors

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def file_bytes(adapters: Mapping[str, Adapter]) -> bytes:
    """One diffusers LoRA file holding ``adapters`` (component name -> adapter value)."""
    unknown = sorted(set(adapters) - set(COMPONENTS))
    if unknown:
        raise AdapterFileError(f"diffusers names components {COMPONENTS}; got {unknown}")
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, Any] = {}
    for component, adapter in adapters.items():
        if adapter.saved:
            raise AdapterFileError(f"{component}: modules_to_save have no place in a diffusers LoRA file")
        if not all(layer.kind.diffusers for layer in adapter.layers.values()):  # no reader takes other kinds
            kind = adapter_class(adapter.config).describe(adapter.config)
            raise AdapterFileError(f"{component}: a diffusers LoRA file holds lora_A / lora_B factors, which a "
                                   f"{kind} adapter does not have; write it as kohya (LyCORIS keys, read by "
                                   "diffusers' load_lora_weights and A1111) or as a PEFT directory")
        tensors.update(to_tensors(adapter, prefix=f"{component}."))
        config = {k: v for k, v in config_to_peft(adapter).items() if v is not None}
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    return safetensors_bytes(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def key_namer(component: str):
    """How messages name a tensor of ``component``: its key in this file format."""
    return lambda path, name, layout: tensor_key(path, name, layout, prefix=f"{component}.")


def parse(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: Path,
          flattened: Collection[str] = ()) -> dict[str, Adapter]:
    """The adapters of a diffusers LoRA file's tensors and metadata, by component.
    ``flattened``: text-encoder components whose model has no ``text_model.`` level, read
    with that prefix removed from the file's paths."""
    configs = _configs(metadata, source)
    by_component: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        component = key.split(".", 1)[0]
        if component not in COMPONENTS or ".lora_" not in key:
            kind = "a kohya/A1111 key" if key.startswith("lora_") else "not a diffusers LoRA key"
            raise AdapterFileError(f"{source}: {key}: {kind} (expected '<component>.<module path>.lora_A.weight' "
                                   f"with a component in {COMPONENTS})")
        legacy = f"{component}.{LEGACY_TEXT_PREFIX}"
        if component in flattened and key.startswith(legacy):
            key = f"{component}.{key.removeprefix(legacy)}"
        by_component.setdefault(component, {})[key] = tensor
    adapters = {}
    for component, part in by_component.items():
        config = configs.get(component) or _inferred_config(part, component, source)
        adapters[component] = from_tensors(config, part, f"{source} [{component}]", prefix=f"{component}.")
    if not adapters:
        raise AdapterFileError(f"{source}: holds no LoRA weights")
    return adapters


def _configs(metadata: Mapping[str, str], source: Path) -> dict[str, LoraConfig]:
    """The LoraConfig of each component that the file's metadata describes."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        fields = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{source}: metadata {METADATA_KEY!r} is not JSON ({err.msg})") from None
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        component, _, field = key.partition(".")
        grouped.setdefault(component, {})[field] = value
    # diffusers' metadata is PEFT's LoraConfig.to_dict(), in which peft_type may be absent
    return {component: config_from_peft({"peft_type": "LORA", **data}, f"{source} metadata [{component}]")
            for component, data in grouped.items()}


def _inferred_config(tensors: Mapping[str, Tensor], component: str, source: Path) -> LoraConfig:
    """diffusers' assumption for a file without metadata: rank from each B, alpha = rank."""
    ranks = {key.removeprefix(f"{component}.").rsplit(".lora_B", 1)[0]: t.shape[1]
             for key, t in tensors.items() if ".lora_B" in key and t.dim() >= 2}
    if not ranks:
        raise AdapterFileError(f"{source}: {component} has no lora_B weights")
    try:
        return config_for_layers(ranks, ranks)
    except ConfigError as err:
        raise AdapterFileError(f"{source}: {component}: {err}") from None

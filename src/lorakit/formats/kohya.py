"""kohya-ss / A1111 LoRA files, the ones image users share.

    lora_unet_<P with "." -> "_">.lora_down.weight    A: (r, in) or (r, in, kh, kw)
    lora_unet_<P ...>.lora_up.weight                  B: (out, r) or (out, r, 1, 1)
    lora_unet_<P ...>.alpha                           alpha (a 0-d tensor): scaling = alpha / r

with ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL's two encoders) for the CLIP
text encoder and ``lora_transformer_`` for a DiT. Conv layers ("LoCon") keep their kernel
in ``lora_down``, as lorakit's conv2d layout does.

Flattening "." to "_" loses information (``to_out.0`` and a module named ``to_out_0``
would collide), so a name is never guessed back into a path: reading a file builds, from
the model itself, a table of every module lorakit can adapt under its kohya name and
looks each key up in it; an unknown name, a collision or a shape that does not fit is
an error naming the key. Names follow the diffusers module tree (what kohya writes for
SD 1.x); SDXL files in the original LDM block names (``input_blocks_4_1``) are refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ..adapter import Adapter, LayerWeights
from ..attach import layer_class_for
from ..config import ConfigError, LoraConfig, config_for_layers
from ..layers import LoraLayer
from ..variants import VARIANTS, Kind, adapter_class, kind_name
from . import LEGACY_TEXT_PREFIX, TEXT_COMPONENTS, AdapterFileError, is_flattened_text_model

# kohya prefix -> the pipeline component it belongs to.
PREFIXES = {"lora_unet": "unet", "lora_transformer": "transformer", "lora_te": "text_encoder",
            "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
WRITTEN = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
           "text_encoder_2": "lora_te2"}
# parts of kohya / LyCORIS modules that no registered kind has, and what they are
UNSUPPORTED_PARTS = {"hada_t1": "LoHa Tucker factors", "hada_t2": "LoHa Tucker factors",
                     "lokr_t2": "LoKr Tucker factors", "dora_scale": "DoRA magnitudes"}


def kohya_kinds() -> list[type[Kind]]:
    """The registered kinds that kohya files hold."""
    return [kind for kind in VARIANTS.values() if kind.kohya_names is not None]


def key_pattern() -> re.Pattern[str]:
    """A kohya key: the module's kohya name and one of a kind's parts, or alpha."""
    parts = sorted({part for kind in kohya_kinds() for part in kind.kohya_names.values()} | {"alpha"})
    return re.compile(rf"^(?P<name>lora_[A-Za-z0-9_]+?)\.(?P<part>{'|'.join(map(re.escape, parts))})$")


# The roots of a flattened CLIPTextModel (formats/__init__.py): kohya names keep the old tree.
FLATTENED_TEXT_ROOTS = ("embeddings", "encoder", "final_layer_norm")


def kohya_name(component: str, path: str) -> str:
    """The name kohya gives the module at ``path`` (with ``text_model.`` before a flattened
    text encoder's paths, as every kohya tool expects)."""
    if component in TEXT_COMPONENTS and path.split(".", 1)[0] in FLATTENED_TEXT_ROOTS:
        path = LEGACY_TEXT_PREFIX + path
    return f"{WRITTEN[component]}_{path.replace('.', '_')}"


def key_namer(component: str):
    """How messages name a tensor of ``component``: its key in this file format."""
    parts = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
    return lambda path, name, layout: f"{kohya_name(component, path)}.{parts.get(name, name)}"


def name_table(component: str, model: nn.Module) -> dict[str, str]:
    """kohya name -> module path, for every module of ``model`` lorakit can adapt."""
    table: dict[str, str] = {}
    prefixes = [p for p, c in PREFIXES.items() if c == component]
    inside_layer = tuple(path + "." for path, m in model.named_modules() if isinstance(m, LoraLayer))
    for path, module in model.named_modules():
        base = module.base_module if isinstance(module, LoraLayer) else module
        layer_class = layer_class_for(base)
        if not path or path.startswith(inside_layer) or layer_class is None or not layer_class.layout.kohya:
            continue
        legacy = LEGACY_TEXT_PREFIX + path if is_flattened_text_model(component, model) else path
        for name in {f"{prefix}_{p.replace('.', '_')}" for prefix in prefixes for p in (path, legacy)}:
            if name in table:
                raise AdapterFileError(f"modules {table[name]!r} and {path!r} share the kohya name {name!r}; "
                                       "kohya files cannot address this model")
            table[name] = path
    return table


def file_bytes(adapters: Mapping[str, Adapter]) -> bytes:
    """One kohya file holding ``adapters`` (component name -> adapter value)."""
    tensors: dict[str, Tensor] = {}
    for component, adapter in adapters.items():
        if component not in WRITTEN:
            raise AdapterFileError(f"kohya files name the components {sorted(WRITTEN)}; got {component!r}")
        kind = adapter_class(adapter.config)
        if adapter.saved or not all(layer.kind.kohya_names and set(layer.tensors) <= set(layer.kind.kohya_names)
                                    for layer in adapter.layers.values()):
            raise AdapterFileError(f"{component}: kohya files hold LoRA, LoHa or LoKr factors only (no "
                                   f"{kind.describe(adapter.config)}, no modules_to_save)")
        for path, layer in adapter.layers.items():
            if not layer.layout.kohya:
                raise AdapterFileError(f"{component}: {path}: a {layer.layout} layer has no kohya form")
            name = kohya_name(component, path)
            tensors.update({f"{name}.{part}": t for part, t in layer.kind.kohya_tensors(layer).items()})
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    return safetensors_bytes(tensors, metadata={"format": "pt"})


def write_file(adapters: Mapping[str, Adapter], path: str | os.PathLike) -> Path:
    """Write ``adapters`` to the kohya file ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    data = file_bytes(adapters)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def parse(tensors: Mapping[str, Tensor], source: Path, models: Mapping[str, nn.Module]) -> dict[str, Adapter]:
    """The adapters of a kohya file's tensors, by component, with module paths from
    ``models``' tables. Every key is checked: its prefix, its module, alpha present, shapes
    that fit, one kind of adapter (LoRA, LoHa or LoKr) in the file."""
    tables = {component: name_table(component, model) for component, model in models.items()}
    parts: dict[str, dict[str, Tensor]] = {}
    problems = []
    pattern = key_pattern()
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            problems.append(_unknown_key(key))
            continue
        parts.setdefault(match["name"], {})[match["part"]] = tensor
    kinds = {name: _kind(part) for name, part in parts.items()}
    if len(set(kinds.values())) > 1:
        found = sorted(kind_name(kind) for kind in set(kinds.values()))
        problems.append(f"holds modules of several kinds ({', '.join(found)}); lorakit loads one kind per file")
    layers: dict[str, dict[str, tuple[LayerWeights, int]]] = {}
    for name, part in sorted(parts.items()):
        problem, component, path, layer = _layer(name, part, kinds[name], tables, models)
        if problem:
            problems.append(problem)
        else:
            layers.setdefault(component, {})[path] = layer
    if problems:
        raise AdapterFileError(f"{source}: " + "; ".join(problems[:10]))
    if not layers:
        raise AdapterFileError(f"{source}: holds no LoRA weights")
    variant = kind_name(next(iter(kinds.values())))
    return {component: Adapter(_config(found, variant), {p: value for p, (value, _) in found.items()})
            for component, found in layers.items()}


def _unknown_key(key: str) -> str:
    part = key.rsplit(".", 1)[-1]
    if part in UNSUPPORTED_PARTS:
        return f"{key}: {UNSUPPORTED_PARTS[part]} are not supported by lorakit"
    mixed = " (a PEFT/diffusers key: this file mixes formats)" if ".lora_A." in key or ".lora_B." in key else ""
    return (f"{key}: not a kohya LoRA key{mixed} (expected lora_unet_/lora_te_... with .lora_down.weight, "
            ".lora_up.weight, .alpha, or LyCORIS' .hada_*/.lokr_* factors)")


def _kind(part: Mapping[str, Tensor]) -> type[Kind]:
    """The kind whose kohya parts a module's are (the one sharing most, where none holds all)."""
    names = set(part) - {"alpha"}
    return max(kohya_kinds(), key=lambda kind: (names <= set(kind.kohya_names.values()),
                                                len(names & set(kind.kohya_names.values()))))


def _layer(name: str, part: dict[str, Tensor], kind: type[Kind], tables: Mapping[str, dict[str, str]],
           models: Mapping[str, nn.Module]) -> tuple[str | None, str, str, tuple[LayerWeights, int] | None]:
    """One kohya module's tensors checked against the model; or what is wrong with them."""
    prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True) if name.startswith(p + "_")), None)
    if prefix is None:
        return f"{name}: unknown kohya prefix (known: {', '.join(sorted(PREFIXES))})", "", "", None
    component = PREFIXES[prefix]
    if component not in tables:
        return f"{name}: a {component} module, but no {component} model was given", "", "", None
    path = tables[component].get(name)
    if path is None:
        return f"{name}: no module of the {component} has this kohya name", component, "", None
    if "alpha" not in part:
        return f"{name}: missing {name}.alpha", component, path, None
    alpha = part.pop("alpha")
    if alpha.numel() != 1 or not all(t.is_floating_point() for t in (alpha, *part.values())):
        return f"{name}: alpha must be one number and the factors floating point", component, path, None
    module = models[component].get_submodule(path)
    base = module.base_module if isinstance(module, LoraLayer) else module
    shape = tuple(module.weight.shape)
    problem, layer, rank = kind.from_kohya(name, part, float(alpha), layer_class_for(base), base, shape)
    if problem:
        return f"{name}: {problem} ({path}, {type(base).__name__} {shape})", component, path, None
    return None, component, path, (layer, rank)


def _config(layers: Mapping[str, tuple[LayerWeights, int]], variant: str = "lora") -> LoraConfig:
    """The LoraConfig that reproduces these layers (targets: the exact module paths)."""
    ranks = {path: rank for path, (_, rank) in layers.items()}
    try:
        config = config_for_layers(ranks, {path: layers[path][0].scaling * rank for path, rank in ranks.items()})
        return dataclasses.replace(config, variant=variant)
    except ConfigError as err:
        raise AdapterFileError(f"kohya file: {err}") from None

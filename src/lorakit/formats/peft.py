"""PEFT's adapter format: the key of every tensor and the fields of adapter_config.json.

An adapter is a directory with two files:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ...
- ``adapter_model.safetensors``: for a module at path P,
  ``base_model.model.P.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r);
  fused MoE expert tensors (``target_parameters``, experts.py) keep E adapters in one
  pair, A (E·r, in) expert-major and B (out, r·E) expert-minor, under their module's path
  with one ``.base_layer`` for each adapted tensor of that module registered after them
  (PEFT nests one wrapper per tensor);
  embeddings use ``...P.lora_embedding_A`` / ``lora_embedding_B``; a variant's own
  tensors sit under their names (DoRA's ``...P.lora_magnitude_vector``); modules_to_save
  are stored whole as
  ``base_model.model.P.<param>``.

diffusers writes the same keys under a component's prefix (``unet.P.lora_A.weight``),
so every rule here takes the prefix as an argument.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..adapter import Adapter, LayerWeights
from ..config import ALL_LINEAR, ConfigError, LoraConfig, names_module
from ..experts import PROJECTIONS
from ..hub import split_revision
from ..layouts import Layout, parameter_layout
from ..variants import VARIANTS, Kind, adapter_class, kind_name, tensor_names
from . import AdapterFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
LORAKIT_VARIANT = "lorakit_variant"  # the variant of an adapter PEFT's fields cannot name

# PEFT options whose non-default values change the math: lorakit refuses them rather
# than load an adapter that would compute something else.
UNSUPPORTED = {
    "bias": ("none", None), "lora_bias": (False, None),
    "trainable_token_indices": (None,), "layer_replication": (None,),
    "use_qalora": (False, None), "alora_invocation_tokens": (None,),
}


def peft_keys(path: str, layout: Layout, prefix: str = PREFIX) -> tuple[str, str]:
    """The file keys of A and B for the module at ``path`` (its ``layout``, layouts.py)."""
    return tuple(f"{prefix}{path}.{name}" for name in layout.peft_names)


def tensor_key(path: str, name: str, layout: Layout, prefix: str = PREFIX) -> str:
    """The file key of tensor ``name`` (lora_A, lora_B or a kind's own) of the module at ``path``."""
    if layout.peft_parameter:  # named after its module; which .base_layer depth depends on its neighbours
        module, _, tensor = path.rpartition(".")
        return f"{prefix}{module}[.base_layer].{name}.weight ({tensor})"
    if name in ("lora_A", "lora_B"):
        return peft_keys(path, layout, prefix)[name == "lora_B"]
    return f"{prefix}{path}.{name}"


BASE_LAYER = ".base_layer"


def _registered_order(name: str) -> tuple[int, str]:
    return (PROJECTIONS.index(name) if name in PROJECTIONS else len(PROJECTIONS), name)


def expert_key_paths(paths: Iterable[str]) -> dict[str, str]:
    """Expert tensor path -> the module path its factors are stored under: PEFT wraps the
    adapted tensors of a module one inside the other in the order the module registers
    them, so the last is outermost and each earlier one sits one ``.base_layer`` deeper."""
    by_module: dict[str, list[str]] = {}
    for path in paths:
        module, _, name = path.rpartition(".")
        by_module.setdefault(module, []).append(name)
    keys = {}
    for module, names in by_module.items():
        names.sort(key=_registered_order)
        for depth, name in enumerate(reversed(names)):
            keys[f"{module}.{name}"] = module + BASE_LAYER * depth
    return keys


def _expert_tensor(path: str, parameters: Collection[str]) -> tuple[str | None, str | None]:
    """The expert tensor path a parsed key path (``P[.base_layer]*``) stands for, given the
    file's ``target_parameters``: (tensor path, None), (None, a problem), or (None, None)
    for a key of an ordinary module."""
    depth = 0
    while path.endswith(BASE_LAYER):
        path, depth = path[:-len(BASE_LAYER)], depth + 1
    names = sorted({t.rpartition(".")[2] for t in parameters if names_module(t, f"{path}.{t.rpartition('.')[2]}")},
                   key=_registered_order)
    if not names:
        return None, (f"nested .base_layer keys but no target_parameters names a tensor of {path}" if depth else None)
    if depth >= len(names):
        return None, f"{depth} .base_layer levels, but target_parameters names only {names} on this module"
    return f"{path}.{names[len(names) - 1 - depth]}", None


def _holds_experts(path: str, tensor_path: str, tensors: Mapping[str, Tensor], prefix: str, config: LoraConfig,
                   targets: Collection[str] | None) -> bool:
    """Whether the keys under module ``path`` are expert tensor ``tensor_path``'s: always when
    nested (``.base_layer``); else when the model targets that tensor or, without a model,
    when A holds more rows than the module's rank (E·r)."""
    if path.endswith(BASE_LAYER):
        return True
    if targets is not None:
        return tensor_path in targets
    A = tensors.get(f"{prefix}{path}.lora_A.weight")
    return A is not None and A.shape[0] != config.rank_for(path)


def key_pattern(prefix: str) -> re.Pattern[str]:
    """A tensor's key: the module path, and which tensor (A/B, embedding A/B, a kind's own)."""
    extras = "|".join(sorted(map(re.escape, tensor_names() - {"lora_A", "lora_B"}))) or "(?!)"
    return re.compile(rf"^{re.escape(prefix)}(?P<path>.+)\.(?:lora_(?:embedding_(?P<e>[AB])|(?P<l>[AB])\.weight)"
                      rf"|(?P<x>{extras}))$")


# PEFT stores the whole base weight of a targeted embedding next to its factors
# (``save_embedding_layers="auto"``), for a vocabulary resized before training.
BASE_COPY = re.compile(rf"^{re.escape(PREFIX)}(?P<path>.+)\.base_layer\.weight$")


# PEFT's LyCORIS family (LoHa, LoKr, ...) names alpha and its init apart from its LoRA
LORA_TYPE = "LORA"


def _kind_of_fields(data: Mapping[str, Any]) -> tuple[type[Kind] | None, str | None]:
    """The registered kind whose ``peft_config`` the fields fit (every field it names that the
    file has agrees; the most specific one wins), or None and the first field in the way."""
    if data.get(LORAKIT_VARIANT) in VARIANTS:
        return VARIANTS[data[LORAKIT_VARIANT]], None
    fitting, obstacle = [], None
    for kind in VARIANTS.values():
        fields = kind.peft_config or {}
        if fields.get("peft_type") != data.get("peft_type"):
            continue
        differ = [key for key, value in fields.items() if key in data and data[key] != value]
        if differ:
            obstacle = obstacle or f"{differ[0]}={data[differ[0]]!r}"
        else:
            fitting.append((-sum(key in data for key in fields), len(fields), kind))
    return (min(fitting, key=lambda f: f[:2])[2], None) if fitting else (None, obstacle)


def config_to_peft(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json contents for ``adapter``."""
    config = adapter.config
    base_model, revision = split_revision(adapter.base_model)
    parameters = sorted(p for p, v in adapter.layers.items() if v.layout.peft_parameter)
    targets = config.targets
    if targets == ALL_LINEAR or parameters:  # PEFT also stores all-linear expanded; it names tensors apart
        targets = sorted(p for p, v in adapter.layers.items() if not v.layout.peft_parameter)
    common = {
        "task_type": adapter.task_type,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": config.rank,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "exclude_modules": (config.exclude if isinstance(config.exclude, str) else list(config.exclude)) or None,
        "layers_to_transform": list(config.layers) if config.layers is not None else None,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": list(config.modules_to_save) or None,
        "inference_mode": True,
    }
    kind = adapter_class(config)
    fields = dict(kind.peft_config or {"peft_type": LORA_TYPE})
    if _kind_of_fields(fields)[0] is not VARIANTS[config.variant]:  # a kind PEFT's fields cannot name
        fields[LORAKIT_VARIANT] = config.variant
    if fields["peft_type"] != LORA_TYPE:
        return {"peft_type": fields["peft_type"], **common, "alpha": config.alpha, **fields, "init_weights": True}
    return {
        "peft_type": LORA_TYPE,
        **common,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_parameters": parameters or None,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if config.init == "default" else config.init,
        "fan_in_fan_out": any(layer.layout.fan_in_fan_out for layer in adapter.layers.values()),
        "bias": "none",
        "use_dora": False,
        **fields,
    }


def config_from_peft(data: Mapping[str, Any], source: Path | str) -> LoraConfig:
    """A LoraConfig from adapter_config.json contents; refuses options lorakit cannot honour."""
    types = list(dict.fromkeys((kind.peft_config or {}).get("peft_type", LORA_TYPE) for kind in VARIANTS.values()))
    peft_type = data.get("peft_type")
    if peft_type not in types:
        raise AdapterFileError(f"{source}: peft_type is {peft_type!r}, lorakit reads {', '.join(map(repr, types))} "
                               "adapters")
    lycoris = peft_type != LORA_TYPE
    for key, fine in ({} if lycoris else UNSUPPORTED).items():
        if data.get(key, fine[0]) not in fine:
            raise AdapterFileError(f"{source}: {key}={data[key]!r} is not supported by lorakit")
    kind, obstacle = _kind_of_fields(data)
    if kind is None and not data.get(LORAKIT_VARIANT):
        raise AdapterFileError(f"{source}: {obstacle} is not supported by lorakit")
    alpha_key = "alpha" if lycoris else "lora_alpha"
    for key in ("r", alpha_key, "target_modules"):
        if data.get(key) is None:
            raise AdapterFileError(f"{source}: missing required field {key!r}")
    layers = data.get("layers_to_transform")
    layers_pattern = data.get("layers_pattern")
    targets, parameters = data["target_modules"], data.get("target_parameters") or []
    if parameters and isinstance(targets, str):  # one pattern: PEFT's suffix rule for each tensor name
        targets = "|".join([f"(?:{targets})"] + [rf"(?:.*\.)?{re.escape(p)}" for p in parameters])
    elif parameters:
        targets = [*targets, *parameters]
    try:
        return LoraConfig(
            rank=data["r"],
            alpha=data[alpha_key],
            dropout=0.0 if lycoris else data.get("lora_dropout") or 0.0,
            targets=targets,
            exclude=data.get("exclude_modules") or (),
            layers=[layers] if isinstance(layers, int) else layers,
            layers_pattern=layers_pattern[0] if isinstance(layers_pattern, list) else layers_pattern,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            use_rslora=bool(data.get("use_rslora", False)) and not lycoris,
            init=data["init_lora_weights"] if isinstance(data.get("init_lora_weights"), str) else "default",
            variant=data.get(LORAKIT_VARIANT) or kind_name(kind),
            modules_to_save=data.get("modules_to_save") or (),
        )
    except (ConfigError, TypeError) as err:
        raise AdapterFileError(f"{source}: invalid LoRA config: {err}") from None


def to_tensors(adapter: Adapter, prefix: str = PREFIX) -> dict[str, Tensor]:
    """File key -> tensor: every layer's tensors, the modules stored whole."""
    tensors: dict[str, Tensor] = {}
    parameters = expert_key_paths(p for p, v in adapter.layers.items() if v.layout.peft_parameter)
    for path, layer in adapter.layers.items():
        for name, tensor in layer.layout.to_peft(layer.tensors).items():
            if path in parameters and name in ("lora_A", "lora_B"):
                tensors[f"{prefix}{parameters[path]}.{name}.weight"] = tensor
            else:
                tensors[tensor_key(path, name, layer.layout, prefix)] = tensor
    tensors.update({prefix + key: tensor for key, tensor in adapter.saved.items()})
    return tensors


def from_tensors(config: LoraConfig, tensors: Mapping[str, Tensor], source: Path | str, fan_in_fan_out: bool = False,
                 prefix: str = PREFIX, base_model: str | None = None, task_type: str | None = None,
                 targets: Collection[str] | None = None, parameters: Collection[str] = ()) -> Adapter:
    """The adapter value of a file's tensors: every key parsed, every module's tensors
    checked (a whole set of its kind, floating point, ranks as the config says). The layout
    of a module is its kind's reading of its tensors (for LoRA: a 4-D A is a Conv2d's; a 2-D
    pair is a GPT-2 Conv1D's when ``fan_in_fan_out``, an ``nn.Linear``'s otherwise).
    ``targets``: the module paths of the model it will load into; a key of another module
    is then unexpected, and shapes are left to ``install``'s check. ``parameters``: the
    file's ``target_parameters``, which say whose keys hold experts."""
    pattern = key_pattern(prefix)
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    saved, problems, expert_paths = {}, [], set()
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            if BASE_COPY.match(key):
                continue  # a copy of the base's embedding: not part of the adapter (files.base_copies)
            if key.startswith(prefix) and config.modules_to_save:
                saved[key.removeprefix(prefix)] = tensor
            else:
                problems.append(f"unexpected key {key}")
            continue
        expert, problem = _expert_tensor(match["path"], parameters)
        if expert and not _holds_experts(match["path"], expert, tensors, prefix, config, targets):
            expert = None  # a module's own key that a bare tensor name in target_parameters also fits
        if problem:
            problems.append(f"{key}: {problem}")
            continue
        path = expert or match["path"]
        if expert:
            expert_paths.add(path)
        if targets is not None and path not in targets:
            problems.append(f"unexpected key {key} (no such target in this model)")
            continue
        factor = match["x"] or ("lora_embedding_" + match["e"] if match["e"] else "lora_" + match["l"])
        parts.setdefault(path, {})[factor] = (key, tensor)
    layers = {}
    for path, part in sorted(parts.items()):
        problem, layer = _layer(path, part, config, fan_in_fan_out, prefix, checked=targets is None,
                                experts=path in expert_paths)
        if problem:
            problems.append(f"{path}: {problem}")
        else:
            layers[path] = layer
    if problems:
        raise AdapterFileError(f"{source}: " + "; ".join(problems[:10]))
    return Adapter(config, layers, saved, base_model=base_model, task_type=task_type)


def _key_of(path: str, name: str, part: Mapping[str, Any], prefix: str) -> str:
    """The key tensor ``name`` of the module at ``path`` has in a file holding ``part``."""
    if name not in ("lora_A", "lora_B"):
        return f"{prefix}{path}.{name}"
    if any(n.startswith("lora_embedding_") for n in part):
        return f"{prefix}{path}.{name.replace('lora_', 'lora_embedding_')}"
    return f"{prefix}{path}.{name}.weight"


def _layer(path: str, part: dict[str, tuple[str, Tensor]], config: LoraConfig, fan_in_fan_out: bool, prefix: str,
           checked: bool, experts: bool = False) -> tuple[str | None, LayerWeights | None]:
    """One module's tensors made a LayerWeights; or what is wrong with them (``checked``:
    also the ranks and products, which a model's check covers otherwise)."""
    kind = adapter_class(config)
    layout = parameter_layout() if experts else None
    tensors = {name.replace("lora_embedding_", "lora_"): tensor for name, (_, tensor) in part.items()}
    absent = [name for name in kind.required() if name not in tensors]
    if absent and not checked:  # a model is given: name the key its file lacks
        return f"missing key {_key_of(path, absent[0], part, prefix)}", None
    problem = kind.tensors_problem(set(tensors))
    if problem:
        return problem, None
    for key, tensor in part.values():
        if not tensor.is_floating_point():
            return f"{key} has dtype {tensor.dtype}, expected a floating-point tensor", None
    rank = config.rank_for(path)
    if experts:
        tensors = layout.from_peft(tensors, rank)
        if isinstance(tensors, str):
            return tensors, None
    else:
        layout = kind.file_layout(set(part), tensors, fan_in_fan_out)
    value = LayerWeights(kind, tensors, config.scaling_for(path), layout)
    return kind.value_problem(value, rank if checked and not experts else None), value

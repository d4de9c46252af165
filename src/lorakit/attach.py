"""Attach LoRA adapters to a model, manage several named adapters, and detach.

``attach`` finds every target, checks all of them, and only then swaps each target
for a LoraLayer that keeps the original ``weight``/``bias`` (Hu et al., 2021,
arXiv:2106.09685). A failed attach leaves the model exactly as it was.

The config of each adapter is kept on the model in ``model.lorakit_configs``
(a plain dict, name -> LoraConfig) so that saving can write it back out.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .bnb import LoraBnbLinear, is_bnb_linear
from .config import ALL_LINEAR, LoraConfig, names_module
from .experts import ExpertWeight, LoraExpertWeight, expert_parameters, unsupported_experts
from .layers import LoraConv1D, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .variants import LoraAdapter, adapter_class


class AttachError(ValueError):
    """An adapter cannot be attached (or named) as asked; the model is unchanged."""


@dataclass(frozen=True)
class Target:
    """One module that an adapter will be attached to."""

    path: str
    module: nn.Module
    layer_class: type[LoraLayer]
    rank: int
    alpha: float


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoraLayer in the model with its path, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were attached."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.active))
    return list(names)


def attach(model: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Add adapter ``name`` to every module ``config`` targets; return their paths.

    All base parameters are frozen; adapter parameters (and ``modules_to_save``)
    stay trainable. If no adapter is active (the first one on a model), the new one
    becomes active; otherwise it is added inactive, as PEFT's ``add_adapter`` does,
    until ``set_active`` names it.
    """
    check_new_name(model, name)
    targets = find_targets(model, config)
    find_saved_modules(model, config)  # fails before any change if one is missing
    first = not active_adapters(model)
    kind = adapter_class(config)

    for target in targets:
        layer = target.module
        if not isinstance(layer, LoraLayer):
            layer = target.layer_class.wrap(model, target.path, target.module)
        layer.add_adapter(name, kind, target.rank, target.alpha, config)
        if first:
            layer.active = [name]
    model.lorakit_configs = {**getattr(model, "lorakit_configs", {}), name: config}
    _freeze_base(model)
    return [t.path for t in targets]


def _freeze_base(model: nn.Module) -> None:
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.adapters.requires_grad_(True)
    for config in model.lorakit_configs.values():
        for module in find_saved_modules(model, config).values():
            module.requires_grad_(True)


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules (and expert tensors) ``config`` selects, each checked; raises AttachError
    listing all problems."""
    kind = adapter_class(config)
    targets: list[Target] = []
    refused = kind.check_config(config)
    problems: list[str] = [f"{kind.describe(config)}: {refused}"] if refused else []
    for path, module, layer_class in _candidates(model, config):
        if layer_class is None:
            why = unsupported_experts(module) or (f"{type(module).__name__} is not supported (supported: Linear, "
                                                  "GPT-2 Conv1D, Embedding, Conv2d, fused MoE experts)")
            problems.append(f"{path}: {why}")
            continue
        base = module.base_module if isinstance(module, LoraLayer) else module
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            problems.append(f"{path}: Conv2d with groups={base.groups} is not supported (groups must be 1)")
            continue
        refused = kind.check_layer(layer_class, base)
        if refused:
            problems.append(f"{path}: {kind.describe(config)}: {refused}")
            continue
        rank, alpha = config.rank_for(path), config.alpha_for(path)
        in_features, out_features = layer_class.dims(base)
        if rank > min(in_features, out_features):
            problems.append(f"{path}: rank {rank} > min(in={in_features}, out={out_features})")
            continue
        targets.append(Target(path, module, layer_class, rank, alpha))
    problems += _unmatched_names(model, config)
    if problems:
        raise AttachError("cannot attach LoRA:\n  " + "\n  ".join(problems))
    if not targets:
        raise AttachError(f"targets {config.targets!r} matched no module. "
                          f"Candidate module names: {', '.join(candidate_names(model)) or '(none)'}")
    return targets


def _candidates(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Module, type[LoraLayer] | None]]:
    """(path, module, layer type or None if unsupported) of every module, or expert tensor,
    that ``config`` names. A fused-experts module named as a whole gives all its tensors;
    "all-linear" takes Linear-like layers and expert tensors and leaves the output head."""
    linear_only = config.targets == ALL_LINEAR
    head = output_head(model) if linear_only else None
    inside_layer = tuple(path + "." for path, _ in lora_layers(model))
    for path, module in model.named_modules():
        if not path or module is head or path.startswith(inside_layer) or isinstance(module, LoraExpertWeight):
            continue
        experts = expert_parameters(module)
        if experts is not None:
            whole = config.is_target(path)
            for name, weight in experts.items():
                tensor_path = f"{path}.{name}"
                if whole or (config.is_target(tensor_path) and not config.excludes(path)):
                    member = getattr(module, name)
                    yield (tensor_path, member if isinstance(member, LoraLayer) else ExpertWeight(weight),
                           LoraExpertWeight)
            continue
        if not config.is_target(path):
            continue
        layer_class = layer_class_for(module)
        if linear_only and not (layer_class and issubclass(layer_class, LoraLinear)):
            why = unsupported_experts(module)
            if why:
                warnings.warn(f"all-linear leaves {path} untrained: {why}", stacklevel=3)
            continue
        yield path, module, layer_class


def _unmatched_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """On a model with fused experts, each name of a list of targets must name something (a
    module or an expert tensor): a name that misses there most often means experts left
    untrained without a word. Elsewhere, as in PEFT, one match among the names suffices
    (one list can then serve several model families)."""
    tensors = [f"{path}.{name}" for path, m in model.named_modules() for name in (expert_parameters(m) or ())]
    if isinstance(config.targets, str) or not tensors:
        return []
    paths = [path for path, _ in model.named_modules() if path] + tensors
    missing = [name for name in config.targets if not any(names_module(name, path) for path in paths)]
    return [f"target {name!r} matches no module or expert tensor of this model; candidates: "
            f"{', '.join(candidate_names(model))}" for name in missing]


def find_saved_modules(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """Path -> module for each of ``config.modules_to_save``; every name must match."""
    found = {path: m for path, m in model.named_modules() if path and config.saves(path)}
    missing = [m for m in config.modules_to_save if not any(names_module(m, p) for p in found)]
    if missing:
        raise AttachError(f"modules_to_save {missing} matched no module")
    return found


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last path components of the modules an adapter could go on."""
    names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if path and layer_class_for(m)}
    names |= {name for _, m in model.named_modules() for name in (expert_parameters(m) or ())}
    return sorted(names)


# module types registered from outside (register_layer) -> the layer class that adapts them
LAYER_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {}


def register_layer(module_type: type[nn.Module], layer_class: type[LoraLayer]) -> None:
    """Make ``attach`` adapt modules of ``module_type`` with ``layer_class`` (a LoraLayer
    subclass naming its layout, layouts.py)."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, LoraLayer)):
        raise TypeError(f"a layer class is a subclass of lorakit.layers.LoraLayer, got {layer_class!r}")
    LAYER_CLASSES[module_type] = layer_class


def unregister_layer(module_type: type[nn.Module]) -> None:
    del LAYER_CLASSES[module_type]


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    if isinstance(module, LoraLayer):
        return type(module)
    registered = next((layer for kind, layer in LAYER_CLASSES.items() if isinstance(module, kind)), None)
    if registered is not None:
        return registered
    if is_bnb_linear(module):
        return LoraBnbLinear
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    # Only transformers makes Conv1D; if it was never imported there is none to find.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        return LoraConv1D
    return None


def known_adapters(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """``names`` as a list, after checking that the model has every one of them."""
    names = [names] if isinstance(names, str) else list(names)
    present = adapters(model)
    unknown = [n for n in names if n not in present]
    if unknown:
        raise AttachError(f"unknown adapter(s) {unknown}; the model has {present}")
    return names


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` the active adapters (an empty list gives the base model)."""
    names = known_adapters(model, names)
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.adapters]


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: inside the block no adapter contributes, merged or not."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first); a layer left empty becomes its base module again."""
    known_adapters(model, name)
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        layer.remove_adapter(name)
        if not layer.adapters:
            layer.unwrap(model, path)
    model.lorakit_configs = {k: v for k, v in model.lorakit_configs.items() if k != name}


@dataclass(frozen=True)
class ParameterCount:
    """Parameter totals of a model with adapters.

    ``by_type`` maps a module name (q_proj, up_proj, ...) to (number of modules,
    trainable parameters in them).
    """

    by_type: dict[str, tuple[int, int]]
    base: int
    adapter: int
    trainable: int
    expert_tensors: int = 0  # fused MoE expert tensors with adapters (each holds ``experts`` updates)
    experts: int = 0

    @property
    def total(self) -> int:
        return self.base + self.adapter

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count base, adapter and trainable parameters, grouped by module name."""
    by_type: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        trainable = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if not trainable:
            continue
        if isinstance(module, LoraAdapter):  # ...q_proj.adapters.<name> counts as q_proj
            path = path.rsplit(".adapters.", 1)[0]
        key = path.rsplit(".", 1)[-1] or type(model).__name__
        modules, params = by_type.get(key, (0, 0))
        by_type[key] = (modules + 1, params + trainable)
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
    params = list(model.parameters())
    adapter = sum(p.numel() for p in params if id(p) in adapter_ids)
    experts = [layer.base_module.num_experts for _, layer in lora_layers(model) if isinstance(layer, LoraExpertWeight)]
    return ParameterCount(
        by_type=by_type,
        base=sum(p.numel() for p in params) - adapter,
        adapter=adapter,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        expert_tensors=len(experts),
        experts=max(experts, default=0),
    )


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AttachError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapters(model):
        raise AttachError(f"adapter name {name!r} is already used; the model has {adapters(model)}")


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output layer (``lm_head``), which "all-linear" leaves alone, as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None




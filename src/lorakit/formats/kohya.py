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
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ..adapter import Adapter, LayerWeights, product_rank
from ..attach import layer_class_for
from ..config import ConfigError, LoraConfig, config_for_layers
from ..layers import LoraLayer
from ..variants import VARIANTS, adapter_class
from . import LEGACY_TEXT_PREFIX, TEXT_COMPONENTS, AdapterFileError, is_flattened_text_model

# kohya prefix -> the pipeline component it belongs to.
PREFIXES = {"lora_unet": "unet", "lora_transformer": "transformer", "lora_te": "text_encoder",
            "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
WRITTEN = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
           "text_encoder_2": "lora_te2"}
KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha"
                 r"|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$")
UNSUPPORTED_PARTS = {"hada_t1": "LoHa Tucker factors", "hada_t2": "LoHa Tucker factors",
                     "lokr_t2": "LoKr Tucker factors", "dora_scale": "DoRA magnitudes"}
# the kind of a module's factors: the variant its adapter is
KINDS = {"lora_": "lora", "hada_": "loha", "lokr_": "lokr"}


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
        if not path or path.startswith(inside_layer) or layer_class is None or layer_class.layout not in (
                "linear", "conv2d"):
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
        lycoris = adapter.config.variant in ("loha", "lokr")
        if adapter.saved or not (kind.plain or lycoris):
            raise AdapterFileError(f"{component}: kohya files hold LoRA, LoHa or LoKr factors only (no "
                                   f"{kind.describe(adapter.config)}, no modules_to_save)")
        for path, layer in adapter.layers.items():
            if layer.layout not in ("linear", "conv2d"):
                raise AdapterFileError(f"{component}: {path}: a {layer.layout} layer has no kohya form")
            name = kohya_name(component, path)
            tensors.update({f"{name}.{part}": t for part, t in _factors(layer).items()})
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    return safetensors_bytes(tensors, metadata={"format": "pt"})


def _factors(layer: LayerWeights) -> dict[str, Tensor]:
    """One module's tensors under their kohya / LyCORIS key suffixes, with alpha."""
    if layer.A is not None:
        return {"lora_down.weight": layer.A, "lora_up.weight": layer.B,
                "alpha": torch.tensor(layer.scaling * layer.rank, dtype=torch.float32)}
    factors = dict(layer.extras)
    if layer.rank == 0:  # LoKr of whole W1 and W2: LyCORIS takes scaling 1, so W2 carries ours
        factors["lokr_w2"] = factors["lokr_w2"] * layer.scaling
        return {**factors, "alpha": torch.tensor(1.0)}
    return {**factors, "alpha": torch.tensor(layer.scaling * layer.rank, dtype=torch.float32)}


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
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            problems.append(_unknown_key(key))
            continue
        parts.setdefault(match["name"], {})[match["part"]] = tensor
    kinds = {name: _kind(part) for name, part in parts.items()}
    if len(set(kinds.values())) > 1:
        found = sorted(set(kinds.values()))
        problems.append(f"holds modules of several kinds ({', '.join(found)}); lorakit loads one kind per file")
    layers: dict[str, dict[str, LayerWeights]] = {}
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
    variant = next(iter(kinds.values()))
    return {component: Adapter(_config(found, variant), found) for component, found in layers.items()}


def _unknown_key(key: str) -> str:
    part = key.rsplit(".", 1)[-1]
    if part in UNSUPPORTED_PARTS:
        return f"{key}: {UNSUPPORTED_PARTS[part]} are not supported by lorakit"
    mixed = " (a PEFT/diffusers key: this file mixes formats)" if ".lora_A." in key or ".lora_B." in key else ""
    return (f"{key}: not a kohya LoRA key{mixed} (expected lora_unet_/lora_te_... with .lora_down.weight, "
            ".lora_up.weight, .alpha, or LyCORIS' .hada_*/.lokr_* factors)")


def _kind(part: Mapping[str, Tensor]) -> str:
    return next((kind for prefix, kind in KINDS.items() if any(p.startswith(prefix) for p in part)), "lora")


def _layer(name: str, part: dict[str, Tensor], kind: str, tables: Mapping[str, dict[str, str]],
           models: Mapping[str, nn.Module]) -> tuple[str | None, str, str, LayerWeights | None]:
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
    layer_class = layer_class_for(base)
    read = _lora_layer if kind == "lora" else _product_layer
    problem, layer = read(name, part, kind, float(alpha), layer_class, base, tuple(module.weight.shape))
    return (f"{name}: {problem} ({path}, {type(base).__name__} {tuple(module.weight.shape)})" if problem else None,
            component, path, layer)


def _lora_layer(name: str, part: dict[str, Tensor], kind: str, alpha: float, layer_class: type, base: nn.Module,
                shape: tuple[int, ...]) -> tuple[str | None, LayerWeights | None]:
    missing = [p for p in ("lora_down.weight", "lora_up.weight") if p not in part]
    if missing:
        return f"missing {', '.join(f'{name}.{p}' for p in missing)}", None
    A, B = part["lora_down.weight"], part["lora_up.weight"]
    rank = A.shape[0] if A.dim() else 0
    expected = layer_class.shapes(base, max(rank, 1))
    if tuple(A.shape) != expected[0] or tuple(B.shape) != expected[1]:
        return (f"{name}.lora_down.weight {tuple(A.shape)} / {name}.lora_up.weight {tuple(B.shape)} do not fit: "
                f"expected {expected[0]} / {expected[1]}"), None
    return None, LayerWeights(A, B, alpha / rank, layer_class.layout)


def _product_layer(name: str, part: dict[str, Tensor], kind: str, alpha: float, layer_class: type,
                   base: nn.Module, shape: tuple[int, ...]) -> tuple[str | None, LayerWeights | None]:
    """A LoHa's or LoKr's factors, checked against the shapes lorakit gives that kind on this
    module at the file's rank."""
    adapter = VARIANTS[kind]
    problem = adapter.factor_problem(set(part)) or adapter.check_layer(layer_class, base)
    if problem:
        return problem, None
    rank = product_rank(part)
    scaling = alpha / rank if rank else 1.0  # LyCORIS ignores alpha for a LoKr of whole W1 and W2
    rank = rank or _whole_rank(part["lokr_w2"])
    expected = adapter.tensor_shapes(layer_class, base, rank)
    misfits = [f"{name}.{n} {tuple(part[n].shape) if n in part else 'missing'}, expected {s}"
               for n, s in expected.items() if n not in part or tuple(part[n].shape) != tuple(s)]
    misfits += [f"{name}.{n}: not a factor lorakit's {kind} has here" for n in part if n not in expected]
    if misfits:
        return "; ".join(misfits), None
    return None, LayerWeights(None, None, scaling, layer_class.layout, part, shape)


def _config(layers: Mapping[str, LayerWeights], variant: str = "lora") -> LoraConfig:
    """The LoraConfig that reproduces these layers (targets: the exact module paths)."""
    ranks = {path: layer.rank or _whole_rank(layer.extras["lokr_w2"]) for path, layer in layers.items()}
    try:
        config = config_for_layers(ranks, {path: layers[path].scaling * rank for path, rank in ranks.items()})
        return dataclasses.replace(config, variant=variant)
    except ConfigError as err:
        raise AdapterFileError(f"kohya file: {err}") from None


def _whole_rank(W2: Tensor) -> int:
    """The rank a LoKr of whole W1 and W2 is given: the smallest at which lorakit keeps W2
    (b, d) whole, r >= max(b, d) / 2."""
    return max(1, math.ceil(max(W2.shape[0], W2.shape[1]) / 2))

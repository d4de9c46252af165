"""Adapter files in PEFT's on-disk format, read and written safely.

An adapter is a directory with two files:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ...
- ``adapter_model.safetensors``: for a module at path P,
  ``base_model.model.P.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r);
  embeddings use ``...P.lora_embedding_A`` / ``lora_embedding_B``; DoRA adds
  ``...P.lora_magnitude_vector``; modules_to_save are stored whole as
  ``base_model.model.P.<param>``.

In memory an adapter is a value (adapter.py's ``Adapter``): ``read_adapter`` and
``write_adapter`` move it from and to a directory, ``export_adapter`` and
``import_adapter`` from and to a live model.

Every key-name conversion between lorakit and PEFT lives in this module. Loading
reads and checks every key, shape and dtype before the model is touched, and never
unpickles. Saving writes a temporary directory and renames it into place.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .attach import (AttachError, adapters, attach, delete_adapter, find_saved_modules, find_targets,
                     known_adapters, lora_layers)
from .config import ALL_LINEAR, ConfigError, LoraConfig
from .adapter import Adapter, LayerWeights
from .dora import magnitude_shape
from .layers import LoraLayer, lora_scaling
from .principal import moved, relative_to_original

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."

# PEFT options whose non-default values change the math: lorakit refuses them rather
# than load an adapter that would compute something else.
UNSUPPORTED = {
    "bias": ("none", None), "lora_bias": (False, None),
    "target_parameters": (None, []), "trainable_token_indices": (None,), "layer_replication": (None,),
    "use_qalora": (False, None), "alora_invocation_tokens": (None,),
}


class AdapterFileError(ValueError):
    """An adapter directory is missing, unsafe, malformed or does not fit the model."""


# -- key names and config fields (ours <-> PEFT's) -----------------------------------
def peft_keys(path: str, layout: str) -> tuple[str, str]:
    """The file keys of A and B for the module at ``path`` (its ``layout``, see adapter.py)."""
    if layout == "embedding":
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def magnitude_key(path: str) -> str:
    """The file key of DoRA's magnitude for the module at ``path``."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def saved_module_keys(path: str, module: nn.Module) -> dict[str, Tensor]:
    """File key -> parameter for a module stored whole (modules_to_save)."""
    return {f"{PREFIX}{path}.{name}": p for name, p in module.named_parameters()}


def config_to_peft(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json contents for ``adapter``."""
    config = adapter.config
    targets = config.targets
    if targets == ALL_LINEAR:
        targets = sorted(adapter.layers)  # PEFT also stores all-linear expanded
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "exclude_modules": (config.exclude if isinstance(config.exclude, str) else list(config.exclude)) or None,
        "layers_to_transform": list(config.layers) if config.layers is not None else None,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if config.init == "default" else config.init,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(layer.layout == "conv1d" for layer in adapter.layers.values()),
        "bias": "none",
        "use_dora": config.variant == "dora",
        "inference_mode": True,
    }


def config_from_peft(data: dict[str, Any], source: Path) -> LoraConfig:
    """A LoraConfig from adapter_config.json contents; refuses options lorakit cannot honour."""
    if data.get("peft_type") != "LORA":
        raise AdapterFileError(f"{source}: peft_type is {data.get('peft_type')!r}, lorakit reads only 'LORA' adapters")
    for key, fine in UNSUPPORTED.items():
        if data.get(key, fine[0]) not in fine:
            raise AdapterFileError(f"{source}: {key}={data[key]!r} is not supported by lorakit")
    for key in ("r", "lora_alpha", "target_modules"):
        if data.get(key) is None:
            raise AdapterFileError(f"{source}: missing required field {key!r}")
    layers = data.get("layers_to_transform")
    layers_pattern = data.get("layers_pattern")
    try:
        return LoraConfig(
            rank=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout") or 0.0,
            targets=data["target_modules"],
            exclude=data.get("exclude_modules") or (),
            layers=[layers] if isinstance(layers, int) else layers,
            layers_pattern=layers_pattern[0] if isinstance(layers_pattern, list) else layers_pattern,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            use_rslora=bool(data.get("use_rslora", False)),
            init=data["init_lora_weights"] if isinstance(data.get("init_lora_weights"), str) else "default",
            variant="dora" if data.get("use_dora") else "lora",
            modules_to_save=data.get("modules_to_save") or (),
        )
    except (ConfigError, TypeError) as err:
        raise AdapterFileError(f"{source}: invalid LoRA config: {err}") from None


# -- the adapter value <-> a live model -------------------------------------------
def export_adapter(model: nn.Module, name: str = "default") -> Adapter:
    """Adapter ``name`` of ``model`` as a value (copies: later training does not change it)."""
    known_adapters(model, name)
    config: LoraConfig = model.lorakit_configs[name]
    layers = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            w = layer.weights(name)
            layers[path] = LayerWeights(w.A.clone(), w.B.clone(), w.scaling, w.layout,
                                        None if w.magnitude is None else w.magnitude.clone())
    saved = {key.removeprefix(PREFIX): p.detach().clone()
             for path, module in find_saved_modules(model, config).items()
             for key, p in saved_module_keys(path, module).items()}
    model_config = getattr(model, "config", None)
    return Adapter(config, layers, saved, base_model=getattr(model_config, "name_or_path", None) or None,
                   task_type="CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None)


def import_adapter(model: nn.Module, adapter: Adapter, name: str = "default") -> str:
    """Add ``adapter`` to ``model`` as ``name``; checked first, as ``load_adapter`` checks a file."""
    return _install(model, adapter.config, file_tensors(adapter), "adapter value", name)


# -- save ----------------------------------------------------------------------------
def file_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """File key -> tensor: A and B of every layer, and the modules stored whole."""
    tensors: dict[str, Tensor] = {}
    for path, layer in adapter.layers.items():
        key_a, key_b = peft_keys(path, layer.layout)
        tensors[key_a], tensors[key_b] = layer.A, layer.B
        if layer.magnitude is not None:
            tensors[magnitude_key(path)] = layer.magnitude
    tensors.update({PREFIX + key: tensor for key, tensor in adapter.saved.items()})
    return tensors


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """File key -> live parameter of adapter ``name`` (for restoring a checkpoint in place)."""
    known_adapters(model, name)
    tensors: dict[str, Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            key_a, key_b = peft_keys(path, layer.layout)
            tensors[key_a] = layer.adapters[name].lora_A
            tensors[key_b] = layer.adapters[name].lora_B
            if hasattr(layer.adapters[name], "lora_magnitude_vector"):
                tensors[magnitude_key(path)] = layer.adapters[name].lora_magnitude_vector
    for path, module in find_saved_modules(model, model.lorakit_configs[name]).items():
        tensors.update(saved_module_keys(path, module))
    return tensors


def adapter_bytes(adapter: Adapter) -> dict[str, bytes]:
    """The two files of ``adapter`` in PEFT's format, as bytes."""
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory (tied weights).
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in file_tensors(adapter).items()}
    return {
        CONFIG_NAME: json.dumps(config_to_peft(adapter), indent=2, sort_keys=True).encode() + b"\n",
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
    }


def adapter_files(model: nn.Module, name: str = "default") -> dict[str, bytes]:
    """The two files of adapter ``name`` of ``model`` in PEFT's format, as bytes."""
    return adapter_bytes(export_adapter(model, name))


def write_adapter(adapter: Adapter, directory: str | os.PathLike) -> Path:
    """Write ``adapter`` to ``directory`` in PEFT's format, atomically; return the path."""
    return write_directory(directory, adapter_bytes(adapter))


def save_adapter(model: nn.Module | Adapter, directory: str | os.PathLike, name: str = "default",
                 residual: bool = False) -> Path:
    """Write adapter ``name`` of ``model`` (or an adapter value, such as a combination) to
    ``directory`` in PEFT's format, atomically; return the path.

    A PiSSA/OLoRA adapter is written as an ordinary LoRA adapter of twice its rank relative
    to the original base weights (principal.py), unless ``residual``: then as it is, relative
    to the base it changed (lorakit reproduces that base by running the same init again)."""
    if isinstance(model, Adapter):
        return write_adapter(model, directory)
    adapter = export_adapter(model, name)
    moved_parts = {path: moved(layer, layer.adapters[name]) for path, layer in lora_layers(model)
                   if name in layer.adapters and layer.adapters[name].moved_A is not None}
    if moved_parts and not residual:
        adapter = relative_to_original(adapter, moved_parts)
    return write_adapter(adapter, directory)


def write_directory(directory: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write ``files`` into ``directory`` so that it holds either the old or the new set.

    The files go to a temporary sibling directory, are flushed to disk, and the
    directory is renamed into place (an existing one is moved aside first and removed
    after). A crash leaves at most a hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(directory, "tmp")
    try:
        for file_name, data in files.items():
            with open(staging / file_name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        old = None
        if directory.exists():
            old = hidden_sibling(directory, "old")
            os.replace(directory, old / directory.name)
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def hidden_sibling(directory: Path, kind: str) -> Path:
    """A new, empty ``.NAME.<kind>-XXXXXXXX`` directory beside ``directory``.

    Unlike ``tempfile.mkdtemp`` (always mode 0700) it is created with the process
    umask, so the directory renamed into place has the permissions of any other.
    """
    while True:
        candidate = directory.parent / f".{directory.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


# -- load ----------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> LoraConfig:
    """Parse and check ``directory/adapter_config.json``."""
    data, source = _read_json(directory)
    return config_from_peft(data, source)


def _read_json(directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: not an adapter directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    source = directory / CONFIG_NAME
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{source}: missing") from None
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
    return data, source


def read_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of ``directory/adapter_model.safetensors``; pickled files are refused."""
    directory = Path(directory)
    source = directory / WEIGHTS_NAME
    if not source.exists():
        pickled = [directory / n for n in PICKLED_NAMES if (directory / n).exists()]
        if pickled:
            raise AdapterFileError(
                f"{pickled[0]}: pickled weights are never loaded (unpickling can run arbitrary code); "
                f"convert the adapter to {WEIGHTS_NAME}")
        raise AdapterFileError(f"{source}: missing")
    try:
        return load_file(source)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{source}: not a readable safetensors file ({err})") from None


# PEFT stores the whole base weight of a targeted embedding next to its factors
# (``save_embedding_layers="auto"``), for a vocabulary resized before training.
BASE_COPY = re.compile(rf"^{re.escape(PREFIX)}(?P<path>.+)\.base_layer\.weight$")

KEY = re.compile(rf"^{re.escape(PREFIX)}(?P<path>.+)\.lora_(?:embedding_(?P<e>[AB])|(?P<l>[AB])\.weight"
                 rf"|(?P<m>magnitude_vector))$")


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """The adapter in ``directory`` as a value, without a model: every key parsed and every
    pair of factors checked (both present, floating point, ranks as the config says).
    A 4-D A is a Conv2d's; a 2-D pair is a GPT-2 Conv1D's when the file's one
    ``fan_in_fan_out`` flag is set, an ``nn.Linear``'s otherwise."""
    data, config_source = _read_json(directory)
    config = config_from_peft(data, config_source)
    tensors = read_tensors(directory)
    source = Path(directory) / WEIGHTS_NAME
    pairs: dict[str, dict[str, Tensor]] = {}
    saved, problems = {}, []
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            if BASE_COPY.match(key):
                continue  # a copy of the base's embedding: not part of the adapter (see base_copies)
            if key.startswith(PREFIX) and config.modules_to_save:
                saved[key.removeprefix(PREFIX)] = tensor
            else:
                problems.append(f"unexpected key {key}")
            continue
        factor = "M" if match["m"] else (match["e"] or match["l"]) + ("e" if match["e"] else "")
        pairs.setdefault(match["path"], {})[factor] = tensor
    layers = {}
    for path, pair in sorted(pairs.items()):
        embedding = "Ae" in pair or "Be" in pair
        A, B = (pair.get("Ae"), pair.get("Be")) if embedding else (pair.get("A"), pair.get("B"))
        magnitude = pair.get("M")
        rank = config.rank_for(path)
        if A is None or B is None or len(pair) != 2 + (magnitude is not None):
            problems.append(f"{path}: needs both lora_A and lora_B")
        elif (magnitude is not None) != (config.variant == "dora"):
            problems.append(f"{path}: " + ("lora_magnitude_vector without use_dora in the config" if magnitude
                                           is not None else "use_dora is set but lora_magnitude_vector is missing"))
        elif not (A.is_floating_point() and B.is_floating_point()):
            problems.append(f"{path}: lora_A / lora_B must be floating point, got {A.dtype} / {B.dtype}")
        elif A.shape[0] != rank or B.shape[1] != rank:
            problems.append(f"{path}: A {tuple(A.shape)}, B {tuple(B.shape)}; expected rank {rank} (config)")
        else:
            layout = ("embedding" if embedding else "conv2d" if A.dim() == 4
                      else "conv1d" if data.get("fan_in_fan_out") else "linear")
            scaling = lora_scaling(config.alpha_for(path), rank, config.use_rslora)
            if magnitude is not None and magnitude.numel() != B.shape[0]:
                problems.append(f"{path}: lora_magnitude_vector {tuple(magnitude.shape)}, expected one value per "
                                f"output unit ({B.shape[0]})")
                continue
            layers[path] = LayerWeights(A, B, scaling, layout, magnitude)
    if problems:
        raise AdapterFileError(f"{source}: " + "; ".join(problems[:10]))
    return Adapter(config, layers, saved, base_model=data.get("base_model_name_or_path"),
                   task_type=data.get("task_type"))


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Load a PEFT-format adapter into ``model`` as ``name``; return the name used.

    Without ``name`` the adapter is called "default", or after its directory if the
    model already has a "default". Every key, shape and dtype is checked against the
    model first; on any error the model is left exactly as it was.
    """
    directory = Path(directory)
    config = read_config(directory)
    tensors = base_copies(model, read_tensors(directory), directory / WEIGHTS_NAME)
    if name is None:
        name = "default" if "default" not in adapters(model) else re.sub(r"\W", "_", directory.name)
    return _install(model, config, tensors, directory, name)


def base_copies(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """``tensors`` without PEFT's copies of base embedding weights, each checked to equal the
    model's own: a different one (a resized vocabulary) is refused, never loaded."""
    kept, problems = {}, []
    for key, tensor in tensors.items():
        match = BASE_COPY.match(key)
        if match is None:
            kept[key] = tensor
            continue
        try:
            weight = model.get_submodule(match["path"]).weight
        except AttributeError:
            weight = None
        if weight is None or weight.shape != tensor.shape or not torch.equal(weight.detach().cpu(), tensor.to(
                weight.dtype)):
            problems.append(f"{match['path']}: the file holds a base weight {tuple(tensor.shape)} that differs from "
                            "the model's (a resized vocabulary?); lorakit loads adapter weights only")
    if problems:
        raise AdapterFileError(f"{source}: " + "; ".join(problems))
    return kept


def _install(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str | Path,
             name: str) -> str:
    """Attach ``name`` with ``config`` and copy in ``tensors`` (by file key), all checked first."""
    try:
        expected = _expected_tensors(model, config)
    except AttachError as err:
        raise AdapterFileError(f"{source}: does not fit this model: {err}") from None
    _check_tensors(Path(source) / WEIGHTS_NAME if isinstance(source, Path) else source, expected, tensors)

    attach(model, config, name)
    try:
        with torch.no_grad():
            for path, layer in lora_layers(model):
                if name in layer.adapters:
                    key_a, key_b = peft_keys(path, layer.layout)
                    layer.adapters[name].lora_A.copy_(tensors[key_a])
                    layer.adapters[name].lora_B.copy_(tensors[key_b])
                    if config.variant == "dora":
                        layer.adapters[name].lora_magnitude_vector.copy_(tensors[magnitude_key(path)])
            for path, module in find_saved_modules(model, config).items():
                for key, param in saved_module_keys(path, module).items():
                    param.copy_(tensors[key])
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def restore_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> None:
    """Overwrite the weights of the model's adapter ``name`` with those saved in ``directory``.

    For an adapter attached with the same config (a training run resuming from its
    checkpoint). Every key and shape is checked first; on error nothing changes.
    """
    params = adapter_tensors(model, name)
    tensors = read_tensors(directory)
    expected = {key: (key.removeprefix(PREFIX), tuple(p.shape)) for key, p in params.items()}
    _check_tensors(Path(directory) / WEIGHTS_NAME, expected, tensors)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def _expected_tensors(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """File key -> (module path, shape) that ``config`` implies for this model."""
    expected = {}
    for target in find_targets(model, config):
        base = target.module.base_module if isinstance(target.module, LoraLayer) else target.module
        shape_a, shape_b = target.layer_class.shapes(base, target.rank)
        key_a, key_b = peft_keys(target.path, target.layer_class.layout)
        expected[key_a] = (target.path, shape_a)
        expected[key_b] = (target.path, shape_b)
        if config.variant == "dora":
            out_features = target.layer_class.dims(base)[1]
            expected[magnitude_key(target.path)] = (target.path, magnitude_shape(target.layer_class.layout,
                                                                                 out_features))
    for path, module in find_saved_modules(model, config).items():
        for key, param in saved_module_keys(path, module).items():
            expected[key] = (path, tuple(param.shape))
    return expected


def _check_tensors(source: Path, expected: dict[str, tuple[str, tuple[int, ...]]], tensors: dict[str, Tensor]) -> None:
    problems = []
    for key, (path, shape) in expected.items():
        if key not in tensors:
            problems.append(f"{path}: missing key {key}")
        elif not tensors[key].is_floating_point():
            problems.append(f"{path}: {key} has dtype {tensors[key].dtype}, expected a floating-point tensor")
        elif tuple(tensors[key].shape) != shape:
            problems.append(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    problems += [f"unexpected key {key} (no such target in this model)" for key in tensors if key not in expected]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise AdapterFileError(f"{source}: does not fit this model:\n  " + "\n  ".join(shown))

"""Adapter directories: read, written and loaded safely, in PEFT's format.

In memory an adapter is a value (adapter.py's ``Adapter``), the one currency between
files and models: ``read_adapter`` and ``write_adapter`` move it from and to a
directory, ``export_adapter`` takes it out of a live model and ``install`` puts it in,
after one check of every module, shape and dtype against the model (a failed install
leaves the model as it was). ``load_adapter`` is ``read_adapter`` + ``install``. The key
names of each file format stay in ``formats/`` (PEFT's in formats/peft.py). Files are
never unpickled; saving writes a temporary directory and renames it into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from . import hub
from .adapter import Adapter
from .attach import (AttachError, Target, adapters, attach, check_new_name, delete_adapter, find_saved_modules,
                     find_targets, known_adapters, lora_layers)
from .config import LoraConfig, config_for_layers
from .formats import AdapterFileError, read_safetensors
from .formats.peft import (BASE_COPY, CONFIG_NAME, PICKLED_NAMES, PREFIX, WEIGHTS_NAME, config_from_peft,
                           config_to_peft, from_tensors, tensor_key, to_tensors)
from .layers import LoraLayer
from .layouts import Layout
from .variants import adapter_class

KeyNamer = Callable[[str, str, Layout], str]  # (module path, tensor name, layout) -> what messages call it
__all__ = ["AdapterFileError", "CONFIG_NAME", "WEIGHTS_NAME", "export_adapter", "import_adapter", "install", "read_adapter",
           "write_adapter", "save_adapter", "load_adapter", "restore_adapter", "write_directory", "import_adapters"]


# -- the adapter value <-> a live model -------------------------------------------
def export_adapter(model: nn.Module, name: str = "default", portable: bool = False) -> Adapter:
    """Adapter ``name`` of ``model`` as a value (copies: later training does not change it).
    ``portable``: as other tools load it, on the unchanged base (each adapter's ``exported``:
    a PiSSA/OLoRA adapter becomes plain LoRA of twice its rank, and the config follows)."""
    known_adapters(model, name)
    config: LoraConfig = model.lorakit_configs[name]
    layers = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            layers[path] = (adapter.exported(layer) if portable else adapter.value(layer)).cloned()
    saved = {f"{path}.{key}": p.detach().clone()
             for path, module in find_saved_modules(model, config).items() for key, p in module.named_parameters()}
    if portable and any(v.kind is not adapter_class(config) for v in layers.values()):  # exported as another kind
        refit = config_for_layers({p: v.rank for p, v in layers.items()},
                                  {p: v.scaling * v.rank for p, v in layers.items()})
        config = dataclasses.replace(refit, modules_to_save=config.modules_to_save)
    return Adapter(config, layers, saved, *described(model))


def described(model: nn.Module) -> tuple[str | None, str | None]:
    """What an adapter file says of the model it was trained on: its name (or Hub id) and task."""
    model_config = getattr(model, "config", None)
    return (getattr(model_config, "name_or_path", None) or None,
            "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None)


def install(model: nn.Module, adapter: Adapter, name: str = "default", source: str | Path = "adapter value",
            keys: KeyNamer | None = None) -> str:
    """Add ``adapter`` to ``model`` as ``name``: every module it holds matched to a target of
    its config by path and shape, and all of it checked, before anything changes.
    ``keys``: how messages name a tensor (a file format's key)."""
    check_fits(model, adapter, name, source, keys)
    attach(model, adapter.config, name)
    try:
        _copy_in(model, adapter, name)
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def import_adapter(model: nn.Module, adapter: Adapter, name: str = "default") -> str:
    """``install`` (the name by which lorakit 0.x code knows it)."""
    return install(model, adapter, name)


def _plain_names(path: str, name: str, layout: Layout) -> str:
    return f"{path}.{name}"


def check_fits(model: nn.Module, adapter: Adapter, name: str | None, source: str | Path,
               keys: KeyNamer | None = None) -> None:
    """Raise AdapterFileError listing every way ``adapter`` does not fit ``model`` (``name``:
    the new adapter's name, checked to be free; None to overwrite an existing one)."""
    if name is not None:
        check_new_name(model, name)
    try:
        targets = find_targets(model, adapter.config)
        saved_modules = find_saved_modules(model, adapter.config)
    except AttachError as err:
        raise AdapterFileError(f"{source}: does not fit this model: {err}") from None
    problems = fit_problems(adapter, targets, keys)
    expected = {f"{path}.{key}": (path, p) for path, m in saved_modules.items() for key, p in m.named_parameters()}
    problems += [_tensor_problem(path, f"{PREFIX}{key}", adapter.saved.get(key), tuple(p.shape))
                 for key, (path, p) in expected.items()]
    problems += [f"unexpected key {PREFIX}{key} (no such module to save)" for key in adapter.saved if key not in expected]
    problems = [p for p in problems if p]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise AdapterFileError(f"{source}: does not fit this model:\n  " + "\n  ".join(shown))


def fit_problems(adapter: Adapter, targets: list[Target], keys: KeyNamer | None = None) -> list[str]:
    """Every way the modules of ``adapter`` do not fit ``targets``: a tensor its kind has there
    missing, unexpected, mis-shaped or not floating point, a module of no target. Loading into
    a model and filling serving slots both check with it."""
    keys = keys or _plain_names
    kind = adapter_class(adapter.config)
    problems = []
    for target in targets:
        base = target.module.base_module if isinstance(target.module, LoraLayer) else target.module
        value, layout = adapter.layers.get(target.path), target.layer_class.layout
        shapes = kind.tensor_shapes(target.layer_class, base, target.rank)
        if value is None:
            problems.append(f"{target.path}: missing key {keys(target.path, next(iter(shapes)), layout)}")
            continue
        problems += [_tensor_problem(target.path, keys(target.path, n, layout), value.tensors.get(n), shape)
                     for n, shape in shapes.items()]
        problems += [f"{target.path}: unexpected tensor {n}" for n in value.tensors if n not in shapes]
    found = {t.path for t in targets}
    problems += [f"unexpected key {keys(path, next(iter(value.tensors)), value.layout)} (no such target in this model)"
                 for path, value in adapter.layers.items() if path not in found]
    return [p for p in problems if p]


def _tensor_problem(path: str, key: str, tensor: Tensor | None, shape: tuple[int, ...]) -> str | None:
    if tensor is None:
        return f"{path}: missing key {key}"
    if not tensor.is_floating_point():
        return f"{path}: {key} has dtype {tensor.dtype}, expected a floating-point tensor"
    if tuple(tensor.shape) != tuple(shape):
        return f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
    return None


def _copy_in(model: nn.Module, adapter: Adapter, name: str) -> None:
    """Copy ``adapter``'s tensors into the model's adapter ``name`` (shapes checked before)."""
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if name in layer.adapters:
                layer.adapters[name].load(adapter.layers[path])
        for path, module in find_saved_modules(model, adapter.config).items():
            for key, param in module.named_parameters():
                param.copy_(adapter.saved[f"{path}.{key}"])


# -- save ----------------------------------------------------------------------------
def adapter_bytes(adapter: Adapter) -> dict[str, bytes]:
    """The two files of ``adapter`` in PEFT's format, as bytes."""
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory (tied weights).
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in to_tensors(adapter).items()}
    return {
        CONFIG_NAME: json.dumps(config_to_peft(adapter), indent=2, sort_keys=True).encode() + b"\n",
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
    }


def adapter_files(model: nn.Module, name: str = "default") -> dict[str, bytes]:
    """The two files of adapter ``name`` of ``model`` as it is (a checkpoint), as bytes."""
    return adapter_bytes(export_adapter(model, name))


def write_adapter(adapter: Adapter, directory: str | os.PathLike) -> Path:
    """Write ``adapter`` to ``directory`` in PEFT's format, atomically; return the path."""
    return write_directory(directory, adapter_bytes(adapter))


def save_adapter(model: nn.Module | Adapter, directory: str | os.PathLike, name: str = "default",
                 residual: bool = False) -> Path:
    """Write adapter ``name`` of ``model`` (or an adapter value, such as a combination) to
    ``directory`` in PEFT's format, atomically; return the path.

    A PiSSA/OLoRA adapter is written as an ordinary LoRA adapter of twice its rank relative
    to the original base weights (variants/principal.py), unless ``residual``: then as it
    is, relative to the base it changed (lorakit reproduces that base by running the same
    init again)."""
    if isinstance(model, Adapter):
        return write_adapter(model, directory)
    return write_adapter(export_adapter(model, name, portable=not residual), directory)


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
def locate(source: str | os.PathLike) -> Path:
    """An adapter's local path: ``source`` itself, or the snapshot of the Hub id
    (``org/name[@revision]``) it spells; a local path of the same spelling wins."""
    return hub.local(source, hub.ADAPTER_FILES, "adapter")


def read_config(directory: str | os.PathLike) -> LoraConfig:
    """Parse and check ``directory/adapter_config.json``."""
    data, source = _read_json(directory)
    return config_from_peft(data, source)


def _read_json(directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    directory = locate(directory)
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
    pickled = [directory / n for n in PICKLED_NAMES if (directory / n).exists()]
    if pickled and not (directory / WEIGHTS_NAME).exists():
        raise AdapterFileError(
            f"{pickled[0]}: pickled weights are never loaded (unpickling can run arbitrary code); "
            f"convert the adapter to {WEIGHTS_NAME}")
    return read_safetensors(directory / WEIGHTS_NAME)[0]


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """The adapter in ``directory`` as a value, without a model (formats/peft.py parses and
    checks every key)."""
    data, config_source = _read_json(directory)
    return _parsed(data, config_from_peft(data, config_source), read_tensors(config_source.parent),
                   config_source.parent)


def _parsed(data: dict[str, Any], config: LoraConfig, tensors: dict[str, Tensor], directory: Path,
            targets: list[str] | None = None) -> Adapter:
    return from_tensors(config, tensors, directory / WEIGHTS_NAME, fan_in_fan_out=bool(data.get("fan_in_fan_out")),
                        base_model=_base_model(data), task_type=data.get("task_type"), targets=targets,
                        parameters=data.get("target_parameters") or ())


def _base_model(data: dict[str, Any]) -> str | None:
    """The base a file names, with PEFT's separate ``revision`` joined as ``org/name@revision``."""
    name, revision = data.get("base_model_name_or_path"), data.get("revision")
    return f"{name}@{revision}" if name and isinstance(revision, str) and revision else name


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Load a PEFT-format adapter into ``model`` as ``name``; return the name used.

    Without ``name`` the adapter is called "default", or after its directory if the
    model already has a "default". Every key, shape and dtype is checked against the
    model first; on any error the model is left exactly as it was.
    """
    spelled, directory = directory, locate(directory)
    data, config_source = _read_json(directory)
    config = config_from_peft(data, config_source)
    tensors = base_copies(model, read_tensors(directory), directory / WEIGHTS_NAME)
    adapter = _parsed(data, config, tensors, directory, _target_paths(model, config, directory))
    if name is None:  # a Hub id is named after its repository, not its snapshot's hash
        name = "default" if "default" not in adapters(model) else re.sub(r"\W", "_", hub.short_name(spelled))
    return install(model, adapter, name, directory / WEIGHTS_NAME, tensor_key)


def _target_paths(model: nn.Module, config: LoraConfig, source: Path) -> list[str]:
    try:
        return [target.path for target in find_targets(model, config)]
    except AttachError as err:
        raise AdapterFileError(f"{source}: does not fit this model: {err}") from None


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


def import_adapters(models: Mapping[str, nn.Module], values: Mapping[str, Adapter], name: str = "default",
                    source: str | Path = "adapter values", keys: Callable[[str], KeyNamer] | None = None) -> str:
    """Add one adapter spread over several models (a pipeline's ``unet`` and ``text_encoder``:
    ``values`` by the same component names) as ``name``. Every component is checked before
    any changes; a failure part-way removes what was added, so all or none is loaded."""
    unknown = sorted(set(values) - set(models))
    if unknown:
        raise AdapterFileError(f"{source}: holds an adapter for {', '.join(unknown)}, but no such model was given "
                               f"(given: {', '.join(sorted(models)) or 'none'})")
    namer = keys or (lambda component: None)
    for component, value in values.items():
        check_fits(models[component], value, name, f"{source} [{component}]", namer(component))
    done: list[str] = []
    try:
        for component, value in values.items():
            install(models[component], value, name, f"{source} [{component}]", namer(component))
            done.append(component)
    except Exception:
        for component in done:
            delete_adapter(models[component], name)
        raise
    return name


def restore_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> None:
    """Overwrite the weights of the model's adapter ``name`` with those saved in ``directory``.

    For an adapter attached with the same config (a training run resuming from its
    checkpoint). Every key and shape is checked first; on error nothing changes.
    """
    known_adapters(model, name)
    config = model.lorakit_configs[name]
    directory = Path(directory)
    targets = _target_paths(model, config, directory)
    experts = [path for path, layer in lora_layers(model) if name in layer.adapters and layer.layout.peft_parameter]
    adapter = from_tensors(config, read_tensors(directory), directory / WEIGHTS_NAME, targets=targets,
                           parameters=experts)
    check_fits(model, adapter, None, directory / WEIGHTS_NAME, tensor_key)
    _copy_in(model, adapter, name)

"""Image pipelines as lorakit sees them: a diffusers pipeline folder's adaptable models
(``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``), one adapter over
several of them in one diffusers or kohya file, and the conversion of an adapter between
PEFT's, diffusers' and kohya's files.

Converting needs the models' module trees (kohya names are looked up in them, and every
file is checked against them) but not their weights: the models are built from their
``config.json`` on the meta device, in no memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from . import hub
from .adapter import Adapter
from .attach import adapters
from .files import (CONFIG_NAME, AdapterFileError, KeyNamer, export_adapter, import_adapters, locate, read_adapter,
                    write_adapter, write_directory)
from .formats import diffusers, is_flattened_text_model, kohya, read_safetensors

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
FORMATS = ("peft", "diffusers", "kohya")


def pipeline_skeleton(folder: str | os.PathLike) -> dict[str, nn.Module]:
    """The adaptable models of a diffusers pipeline folder, built on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = hub.local(folder, hub.PIPELINE_CONFIGS, "pipeline")
    models = {}
    for component in COMPONENTS:
        config_file = folder / component / "config.json"
        if not config_file.is_file():
            continue
        with init_empty_weights():
            if component.startswith("text_encoder"):
                config = transformers.AutoConfig.from_pretrained(folder / component)
                models[component] = transformers.AutoModel.from_config(config)
            else:
                fields = json.loads(config_file.read_text())
                kind = getattr(diffusers, fields.get("_class_name", ""), None)
                if kind is None:
                    raise AdapterFileError(f"{config_file}: unknown diffusers model {fields.get('_class_name')!r}")
                models[component] = kind.from_config(kind.load_config(folder / component))
    if not models:
        raise AdapterFileError(f"{folder}: no {', '.join(c + '/config.json' for c in COMPONENTS)}: not a diffusers "
                               "pipeline folder")
    return models


def convert(source: str | os.PathLike, out: str | os.PathLike, to: str, pipeline: str | os.PathLike,
            component: str = "unet") -> Path:
    """Write the adapter of ``source`` (a PEFT directory, a diffusers or a kohya file) in the
    format ``to``; ``component``: the model a PEFT directory belongs to. Every tensor is
    checked against the pipeline's models before anything is written."""
    if to not in FORMATS:
        raise AdapterFileError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    models = pipeline_skeleton(pipeline)
    source = locate(source)
    if (source / CONFIG_NAME).is_file():
        if component not in models:
            raise AdapterFileError(f"{pipeline}: no {component} model for the PEFT adapter {source}")
        values = {component: read_adapter(source)}
    else:
        values = read_pipeline_adapter(source, models)
    import_adapters(models, values, "check", source=source)  # on the meta models: shapes and names only
    if to == "peft":
        if len(values) != 1:
            raise AdapterFileError(f"{source}: holds adapters for {', '.join(values)}; a PEFT directory holds one "
                                   "model's (convert to diffusers or kohya instead)")
        return write_adapter(next(iter(values.values())), out)
    from .formats import diffusers, kohya

    if to == "kohya":
        return kohya.write_file(values, out)
    return write_directory(out, {diffusers.WEIGHTS_NAME: diffusers.file_bytes(values)}) / diffusers.WEIGHTS_NAME


# -- pipelines: one adapter over several models, in diffusers' or kohya's file -------------
PIPELINE_FORMATS = ("diffusers", "kohya")


def save_pipeline_adapter(models: Mapping[str, nn.Module], path: str | os.PathLike, name: str = "default",
                          file_format: str = "diffusers") -> Path:
    """Write adapter ``name`` of a pipeline's models (``{"unet": unet, "text_encoder": te}``;
    components without it are skipped) as one file, atomically; return its path.

    ``diffusers``: ``path`` is a directory that gets ``pytorch_lora_weights.safetensors``
    (what ``pipe.load_lora_weights(path)`` reads); ``kohya``: ``path`` is the file."""
    values = {component: export_adapter(model, name) for component, model in models.items()
              if name in adapters(model)}
    if not values:
        raise AdapterFileError(f"no adapter {name!r} on any of {sorted(models)}")
    if file_format == "diffusers":
        return write_directory(path, {diffusers.WEIGHTS_NAME: diffusers.file_bytes(values)}) / diffusers.WEIGHTS_NAME
    if file_format == "kohya":
        return kohya.write_file(values, path)
    raise AdapterFileError(f"file_format must be one of {PIPELINE_FORMATS}, got {file_format!r}")


def read_pipeline_adapter(path: str | os.PathLike, models: Mapping[str, nn.Module]) -> dict[str, Adapter]:
    """The adapter values of a diffusers or kohya file (told apart by its keys), by component.
    ``models`` gives kohya's names their module paths."""
    return _read_pipeline_file(path, models)[0]


def _read_pipeline_file(path: str | os.PathLike, models: Mapping[str, nn.Module],
                        ) -> tuple[dict[str, Adapter], Callable[[str], KeyNamer]]:
    """``read_pipeline_adapter``, and how its format names a component's tensors."""
    source = locate(path)
    file = source / diffusers.WEIGHTS_NAME if source.is_dir() else source
    if source.is_dir() and not file.exists():  # a Hub repo or folder holding one kohya/diffusers file
        files = sorted(source.glob("*.safetensors"))
        file = files[0] if len(files) == 1 else file
    tensors, metadata = read_safetensors(file)
    kohya_keys = [k for k in tensors if k.startswith("lora_")]
    if kohya_keys and len(kohya_keys) != len(tensors):
        other = next(k for k in tensors if not k.startswith("lora_"))
        raise AdapterFileError(f"{file}: mixes formats: kohya key {kohya_keys[0]} and {other}")
    if kohya_keys:
        return kohya.parse(tensors, file, models), kohya.key_namer
    flattened = [c for c, m in models.items() if is_flattened_text_model(c, m)]
    return diffusers.parse(tensors, metadata, file, flattened), diffusers.key_namer


def load_pipeline_adapter(models: Mapping[str, nn.Module], path: str | os.PathLike, name: str = "default") -> str:
    """Load a diffusers or kohya LoRA file into a pipeline's models as ``name``: every
    component checked before any changes, so all of it loads or none."""
    values, keys = _read_pipeline_file(path, models)
    return import_adapters(models, values, name, Path(path), keys)

"""Image pipelines as lorakit sees them: a diffusers pipeline folder's adaptable models
(``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``), and the conversion of an
adapter between PEFT's, diffusers' and kohya's files.

Converting needs the models' module trees (kohya names are looked up in them, and every
file is checked against them) but not their weights: the models are built from their
``config.json`` on the meta device, in no memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from . import hub
from .files import (CONFIG_NAME, AdapterFileError, import_adapters, locate, read_adapter, read_pipeline_adapter,
                    write_adapter, write_directory)

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

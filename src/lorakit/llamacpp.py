"""Where CPU and laptop users run models: GGUF files for llama.cpp, Ollama and LM Studio.

- ``export_adapter_gguf``: a PEFT adapter directory -> a llama.cpp adapter file (plain LoRA;
  rsLoRA, rank/alpha patterns and PiSSA/OLoRA exports folded into the factors);
- ``import_adapter_gguf``: the inverse, a llama.cpp adapter file -> a PEFT directory;
- ``merge_to_gguf``: a base model with an adapter merged in -> a GGUF model file, any kind
  lorakit can merge (DoRA, LoHa, LoKr included);

each with an Ollama ``Modelfile`` written beside it (formats/gguf.py has the file rules).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .files import read_adapter, write_adapter
from .formats import AdapterFileError
from .formats import gguf as gguf_format
from .formats.gguf_model import write_model
from .pretrained import build_meta, load_model, resolve

CHATML = "<|im_start|>"
# Ollama's Go template for ChatML prompts (SmolLM2, Qwen): Ollama reads Go templates, not Jinja
CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n')


def export_adapter_gguf(adapter: str | os.PathLike, base: str, out: str | os.PathLike) -> Path:
    """The adapter directory ``adapter`` as a llama.cpp adapter file ``out`` for the model
    ``base`` (read for its shapes only; a base GGUF must hold every tensor the adapter changes)."""
    value = read_adapter(adapter)
    model = build_meta(base)
    path = gguf_format.write_adapter(value, model, out, _base_tensors(base))
    _write_modelfile(path, base, adapter=path)
    return path


def import_adapter_gguf(source: str | os.PathLike, base: str, out: str | os.PathLike) -> Path:
    """A llama.cpp adapter file as a PEFT adapter directory for the model ``base``."""
    value = gguf_format.read_adapter(source, build_meta(base))
    return write_adapter(value, out)


def merge_to_gguf(base: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32",
                  quantize: str | None = None) -> Path:
    """``base`` with ``adapter`` merged in (float32, rounded once) as a GGUF model file ``out``
    in ``dtype`` (f32, f16, bf16, q8_0); refused by name, before anything is written, for a
    family lorakit cannot write."""
    from .files import load_adapter, read_config
    from .merge import detach
    from .quantize import dequantize_model

    if dtype not in gguf_format.DTYPES:
        raise AdapterFileError(f"--dtype must be one of {', '.join(gguf_format.DTYPES)} for a GGUF model, got {dtype!r}")
    gguf_format.architecture(build_meta(base).config)  # an unsupported family fails before the model loads
    read_config(adapter)
    model = load_model(base, quantize=quantize)
    if quantize:
        dequantize_model(model, torch.float32)
    load_adapter(model, adapter)
    detach(model)
    path = write_model(model, _tokenizer_dir(base), out, dtype, pre=_pre_tokenizer(base))
    _write_modelfile(path, base, model=path)
    return path


def write_base_gguf(base: str, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """``base`` alone as a GGUF model file (what an adapter GGUF is applied to)."""
    model = load_model(base)
    path = write_model(model, _tokenizer_dir(base), out, dtype, pre=_pre_tokenizer(base))
    _write_modelfile(path, base, model=path)
    return path


def _tokenizer_dir(base: str) -> Path:
    path = resolve(base)
    return path.parent if path.suffix == ".gguf" else path


def _pre_tokenizer(base: str) -> str | None:
    """llama.cpp's pre-tokenizer name when the base is (or was converted from) a GGUF that says it."""
    from .pretrained import DEFAULT_MODEL, default_gguf

    source = default_gguf() if base == DEFAULT_MODEL else Path(base) if base.endswith(".gguf") else None
    if source is None:
        return None
    fields = gguf_format.fields(gguf_format.reader(source))
    return fields.get("tokenizer.ggml.pre")


def _base_tensors(base: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> (out, in) of a base given as a GGUF file (None for other bases)."""
    if not base.endswith(".gguf"):
        return None
    reader = gguf_format.reader(base)
    return {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}


def _write_modelfile(path: Path, base: str, model: Path | None = None, adapter: Path | None = None) -> Path:
    """An Ollama Modelfile beside ``path``: ``ollama create NAME -f <that file>``."""
    lines = ["# ollama create NAME -f " + path.with_suffix(".Modelfile").name]
    if model is not None:
        lines.append(f"FROM ./{model.name}")
    else:
        base_path = Path(base) if base.endswith(".gguf") else resolve(base)
        lines += ["# the base model: a GGUF of it (e.g. written by lorakit merge --to gguf) or its safetensors folder",
                  f"FROM {base_path.resolve()}", f"ADAPTER ./{adapter.name}"]
    template = _chat_template(base)
    if template and CHATML in template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    elif template:
        lines.append("# the chat template is the GGUF's own (tokenizer.chat_template), which Ollama reads")
    target = path.with_suffix(".Modelfile")
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, target)
    return target


def _chat_template(base: str) -> str | None:
    directory = _tokenizer_dir(base)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


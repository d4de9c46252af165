"""GGUF, the file format of llama.cpp, Ollama and LM Studio: LoRA adapters and merged models.

An adapter file is what llama.cpp's own converter writes:

    general.type = "adapter", general.architecture = the base's, adapter.type = "lora",
    adapter.lora.alpha = α;   per module:  <base tensor>.lora_a (r, in), <base tensor>.lora_b (out, r)

llama.cpp adds scale · (α / r) · B A to a weight, with one α per file and r read from each
module's A. lorakit folds each module's own scaling (rsLoRA's α/√r, rank_pattern,
alpha_pattern, PiSSA/OLoRA exported as plain LoRA) into B, B' = B · s · r / α, so that rule
gives the same ΔW. Tensors are named as the base's GGUF names them (the gguf package's map
from transformers' module paths: ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``),
and for the Llama family, whose q and k rows llama.cpp's converter permutes for its rope,
B's rows are permuted the same way (A acts on the input, which is not permuted).

A model file holds every weight of a transformers model (an adapter merged in beforehand),
its hyperparameters and its tokenizer (vocabulary, merges, special tokens, chat template).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..adapter import Adapter
from ..config import config_for_layers
from ..variants import lora_value
from . import AdapterFileError

# transformers' model type -> llama.cpp's architecture (Mistral's weights are a Llama's to llama.cpp)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED = {"llama"}  # llama.cpp's converter permutes q and k rows (rope on interleaved pairs)
ADAPTER_SUFFIXES = (".weight.lora_a", ".weight.lora_b")
DTYPES = ("f32", "f16", "bf16", "q8_0")
MERGE_INSTEAD = "use lorakit merge --to gguf to write the merged model instead"


def architecture(config: Any) -> str:
    """llama.cpp's name of the model's architecture; refused by name where lorakit writes none."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise AdapterFileError(f"GGUF: lorakit writes {', '.join(sorted(ARCHITECTURES))} models, not "
                               f"{model_type!r} ({getattr(config, 'architectures', None)}); nothing written")
    return ARCHITECTURES[model_type]


def name_map(config: Any, arch: str):
    """The gguf package's map from transformers' tensor names to llama.cpp's, for this model."""
    import gguf

    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)


def base_names(config: Any, paths: list[str]) -> dict[str, str]:
    """Module path -> the name of its weight in the base's GGUF, without ``.weight`` (paths
    llama.cpp has no tensor for are left out)."""
    names = name_map(config, architecture(config))
    return {path: name for path in paths if (name := names.get_name(path)) is not None}


def permuted_heads(config: Any, path: str) -> int | None:
    """How many heads the rows of the module at ``path`` are permuted in (None: not permuted)."""
    if architecture(config) not in PERMUTED:
        return None
    if path.endswith("q_proj"):
        return config.num_attention_heads
    if path.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_rows(rows: Tensor, heads: int, inverse: bool = False) -> Tensor:
    """llama.cpp's q/k row order: within each head, the two rope halves interleaved."""
    shape = rows.shape
    half = shape[0] // heads // 2
    if inverse:
        return rows.reshape(heads, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return rows.reshape(heads, 2, half, *shape[1:]).transpose(1, 2).reshape(shape)


# -- adapters --------------------------------------------------------------------------
def adapter_tensors(adapter: Adapter, config: Any, head: str | None) -> tuple[dict[str, Tensor], float]:
    """The GGUF tensors of ``adapter`` on a base with ``config`` (``head``: the path of its
    output head), and α; what llama.cpp cannot apply is refused by module."""
    if adapter.saved:
        raise AdapterFileError(f"GGUF adapters hold LoRA factors only, not modules_to_save "
                               f"{list(adapter.config.modules_to_save)}; {MERGE_INSTEAD}")
    names = base_names(config, list(adapter.layers))
    alpha = float(adapter.config.alpha)
    tensors: dict[str, Tensor] = {}
    for path, layer in adapter.layers.items():
        why = _refusal(path, layer, names, head)
        if why:
            raise AdapterFileError(f"{path}: {why}; {MERGE_INSTEAD}")
        A, B = layer.A.float(), layer.B.float() * (layer.scaling * layer.rank / alpha)  # llama.cpp: (α / r) B A
        heads = permuted_heads(config, path)
        if heads is not None:
            B = permute_rows(B, heads)
        tensors[f"{names[path]}{ADAPTER_SUFFIXES[0]}"] = A
        tensors[f"{names[path]}{ADAPTER_SUFFIXES[1]}"] = B
    return tensors, alpha


def _refusal(path: str, layer: Any, names: Mapping[str, str], head: str | None) -> str | None:
    if not layer.kind.plain:
        return f"a {layer.kind.display} adapter, which llama.cpp cannot apply (it adds (α / r) B A alone)"
    if layer.layout.peft_parameter:
        return "an adapter of fused MoE expert tensors, which llama.cpp's adapters do not address"
    if path == head or path not in names or not names[path].startswith("blk."):
        return "a trained embedding or output head, which llama.cpp's adapters do not address"
    return None


def write_adapter(adapter: Adapter, model: nn.Module, path: str | os.PathLike,
                  base_tensors: Mapping[str, tuple[int, ...]] | None = None) -> Path:
    """``adapter`` as a llama.cpp adapter file at ``path`` (``model``: its base, on any device,
    meta included; every module checked to fit it before anything is written), atomically.
    ``base_tensors``: name -> (out, in) of a base GGUF, which must hold every tensor changed."""
    import gguf

    from ..attach import output_head
    from ..files import check_fits

    config = model.config
    arch = architecture(config)
    _check_fits(model, adapter, "adapter")
    head = output_head(model)
    tensors, alpha = adapter_tensors(adapter, config, next((p for p, m in model.named_modules() if m is head), None))
    for name in tensors if base_tensors is not None else ():
        stem = name.removesuffix(ADAPTER_SUFFIXES[0]).removesuffix(ADAPTER_SUFFIXES[1]) + ".weight"
        if stem not in base_tensors:
            raise AdapterFileError(f"the base GGUF has no tensor {stem}, which the adapter changes; nothing written")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().cpu().numpy().astype(np.float32))
    return write_file(writer, Path(path))


def write_file(writer: Any, path: Path) -> Path:
    """Write ``writer``'s file to a temporary name beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer.path = temporary
        writer.write_header_to_file(temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_adapter(path: str | os.PathLike, model: nn.Module) -> Adapter:
    """A llama.cpp adapter file as an adapter value on ``model`` (its base); B's rows put back
    in transformers' order, α / r the scaling of each module."""
    found = reader(path)
    values = fields(found)
    if values.get("general.type") != "adapter" or values.get("adapter.type") != "lora":
        raise AdapterFileError(f"{path}: not a LoRA adapter GGUF (general.type {values.get('general.type')!r}, "
                               f"adapter.type {values.get('adapter.type')!r}); a model GGUF loads as a model")
    config = model.config
    arch = architecture(config)
    if values.get("general.architecture") != arch:
        raise AdapterFileError(f"{path}: an adapter for a {values.get('general.architecture')!r} model, the base is "
                               f"{arch!r}")
    alpha = float(values.get("adapter.lora.alpha", 0.0))
    paths = {name: p for p, name in base_names(config, [p for p, _ in model.named_modules()]).items()}
    factors: dict[str, dict[str, Tensor]] = {}
    for tensor in found.tensors:
        stem, suffix = _split(tensor.name)
        if suffix is None or stem not in paths:
            raise AdapterFileError(f"{path}: tensor {tensor.name!r} is no LoRA factor of a module of this base")
        factors.setdefault(paths[stem], {})[suffix] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    layers = {}
    for module, pair in factors.items():
        if set(pair) != {"a", "b"} or alpha <= 0:
            raise AdapterFileError(f"{path}: {module}: needs lora_a, lora_b and adapter.lora.alpha > 0")
        A, B = pair["a"], pair["b"]
        heads = permuted_heads(config, module)
        layers[module] = lora_value(A, permute_rows(B, heads, inverse=True) if heads else B, alpha / A.shape[0])
    ranks = {p: v.A.shape[0] for p, v in layers.items()}
    adapter = Adapter(config_for_layers(ranks, {p: alpha for p in ranks}), layers)
    _check_fits(model, adapter, path)
    return adapter


def _check_fits(model: nn.Module, adapter: Adapter, source: str | os.PathLike) -> None:
    """files.check_fits, its problems on one line."""
    from ..files import check_fits

    try:
        check_fits(model, adapter, None, source)
    except AdapterFileError as err:
        raise AdapterFileError(" ".join(str(err).split())) from None


def _split(name: str) -> tuple[str, str | None]:
    for suffix, short in zip(ADAPTER_SUFFIXES, ("a", "b")):
        if name.endswith(suffix):
            return name[:-len(suffix)], short
    return name, None


def reader(path: str | os.PathLike):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, struct.error) as err:
        raise AdapterFileError(f"{path}: not a readable GGUF file ({err})") from None


def fields(reader: Any) -> dict[str, Any]:
    values = {}
    for key, field in reader.fields.items():
        try:
            values[key] = field.contents()
        except Exception:  # a field of a type contents() does not decode: not one lorakit reads
            continue
    return values

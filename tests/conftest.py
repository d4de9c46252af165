"""Tiny transformers models with random weights, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.attach import lora_layers


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=89, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def token_batch(vocab: int, seed: int = 1, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, name: str = "default", seed: int = 2, scale: float = 0.1) -> None:
    """Give every B (and A) of ``name`` random values, as training would, so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                for param in layer.adapters[name].parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed operation must leave unchanged."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(path, type(m)) for path, m in model.named_modules()],
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "active": [(path, list(layer.active), list(layer.merged)) for path, layer in lora_layers(model)],
        "configs": dict(getattr(model, "lorakit_configs", {})),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["active"] == before["active"]
    assert after["configs"] == before["configs"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()

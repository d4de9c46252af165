"""Tiny transformers models with random weights, built from configs (no downloads)."""

from __future__ import annotations

import os
import tempfile

# No test reaches a hub: ids resolve from caches the tests lay out, and the datasets
# library keeps what it converts out of the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lorakit-test-datasets-"))
os.environ.setdefault("WANDB_MODE", "offline")

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


EPS = torch.finfo(torch.float32).eps


def assert_close_as_sums(actual: torch.Tensor, expected: torch.Tensor, terms: int, msg: str | None = None) -> None:
    """Equal up to the rounding of float32 sums of ``terms`` terms taken in another order
    (chunks, micro-batches, another kernel's blocking): |a - e| <= terms * eps * max|e|,
    the bound of recursive summation at the tensor's own scale. A fixed atol such as 1e-7
    is below one rounding of an element near 1 and fails on CPUs whose kernels add in
    another order; this holds on any of them, and still fails a real error."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=terms * EPS * scale, msg=msg)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def corpus_tokenizer(language: str = "swedish", vocab_size: int = 400):
    """A small BPE tokenizer trained on one chatterbot-corpus language, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.training.corpus import conversations

    texts = [m["content"] for r in conversations(language) for m in r["messages"]]
    specials = ["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_causal_lm(directory, language: str = "swedish", hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random Llama-style model and a corpus tokenizer saved as a local HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = corpus_tokenizer(language)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def logged_step(out) -> int:
    """The newest step a run logged to its metrics.jsonl (0 before its first)."""
    from lorakit.training.monitor import read_metrics

    return max((record.get("step", 0) for record in read_metrics(out / "metrics.jsonl")), default=0)


def save_tiny_moe_lm(directory, language: str = "swedish", seed: int = 0):
    """A random Qwen3-MoE model (4 experts, 2 per token) and a corpus tokenizer saved as a local
    HF model directory."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = corpus_tokenizer(language)
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=1024, initializer_range=0.1,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen3MoeForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def rewrite_weights(directory, change) -> None:
    """Apply ``change`` (a function editing a dict of tensors in place) to the adapter file in
    ``directory``: how tests make a bad file from a good one."""
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def resume_copy(finished, partial, step: int) -> None:
    """Lay out in ``partial`` what a run killed after its checkpoint of ``step`` leaves: the
    settings and that checkpoint of the ``finished`` run."""
    import shutil

    partial.mkdir()
    shutil.copy(finished / "config.yaml", partial / "config.yaml")
    name = f"step-{step:06d}"
    shutil.copytree(finished / "checkpoints" / name, partial / "checkpoints" / name)


def assert_resumes_bit_identical(make_config, tmp_path, step: int = 2):
    """A run stopped after its checkpoint of ``step`` and resumed ends with the adapter, bit
    for bit, of a run that was never stopped; ``make_config(out)`` gives the settings."""
    from lorakit.training import train

    full = train(make_config(tmp_path / "full"))
    partial = tmp_path / "partial"
    resume_copy(full.out, partial, step)
    resumed = train(make_config(partial), resume=True)
    assert resumed.resumed_from == step
    assert ((resumed.adapter / "adapter_model.safetensors").read_bytes()
            == (full.adapter / "adapter_model.safetensors").read_bytes())
    return full.out, partial

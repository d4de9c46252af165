"""LoRA on models quantized by transformers + bitsandbytes, checked against PEFT."""

import pytest
import torch
from conftest import assert_unchanged, snapshot, token_batch

import lorakit
from lorakit.attach import lora_layers
from lorakit.bnb import LoraBnbLinear

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # bitsandbytes' CPU 4-bit kernel wants rows of at least one 64-weight block
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load(directory, bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16)
                    if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu")


def randomize_b(model):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("bits", [4, 8])
def test_attach_keeps_the_base_exact_and_its_keys(saved_llama, bits):
    ids = token_batch(300)
    reference, model = load(saved_llama, bits), load(saved_llama, bits)
    keys = list(reference.state_dict())
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    layers = dict(lora_layers(model))
    assert layers and all(isinstance(layer, LoraBnbLinear) for layer in layers.values())
    assert [k for k in model.state_dict() if ".lora_" not in k] == keys  # statistics included
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_loads_in_peft_with_the_same_logits(saved_llama, bits, tmp_path):
    ids = token_batch(300)
    model = load(saved_llama, bits)
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    # saved before any forward: bitsandbytes 0.50 repacks 4-bit weights for its CPU kernel at
    # the first inference call and unpacks them in state_dict(), which is not bit-exact
    lorakit.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(saved_llama, bits), tmp_path / "adapter")
    with torch.no_grad():
        ours, expected = model(ids).logits, theirs(ids).logits
    assert torch.equal(ours, expected)
    with torch.no_grad(), lorakit.disabled(model):
        assert not torch.equal(model(ids).logits, ours)  # the adapter does change the logits


def test_training_on_a_bitsandbytes_base_moves_only_the_adapter(saved_llama):
    model = load(saved_llama, 4).train()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    ids = token_batch(300, shape=(2, 12))
    model(ids, labels=ids).loss.backward()
    with_grad = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"lora_A", "lora_B"}


def test_merging_into_bitsandbytes_weights_is_refused_and_changes_nothing(saved_llama):
    model = load(saved_llama, 4)
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    before = snapshot(model)
    with pytest.raises(lorakit.MergeError, match="q_proj: cannot merge into a bitsandbytes bnb-4bit weight"):
        lorakit.merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("init, variant, message", [("default", "dora", "DoRA is not supported on Linear4bit"),
                                                    ("pissa", "lora", "needs a Linear or GPT-2 Conv1D weight")])
def test_dora_and_pissa_on_bitsandbytes_weights_are_refused_and_change_nothing(saved_llama, init, variant, message):
    model = load(saved_llama, 4)
    before = snapshot(model)
    with pytest.raises(lorakit.AttachError, match=message):
        lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, init=init, variant=variant))
    assert_unchanged(model, before)

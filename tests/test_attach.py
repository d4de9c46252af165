"""attach / adapter management / merge / detach on small transformers models."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AttachError, LoraConfig
from lorakit.attach import lora_layers
from lorakit.layers import LoraConv1D, LoraLinear

from conftest import MODELS, assert_unchanged, randomize_adapters, snapshot, token_batch


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_all_linear_adapts_every_linear_layer_but_the_output_head(kind):
    model = MODELS[kind]()
    linear = {path for path, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    head = next(path for path, m in model.named_modules() if m is model.get_output_embeddings())
    paths = lorakit.attach(model, LoraConfig(rank=4, alpha=8))
    assert set(paths) == linear - {head}
    expected_class = LoraConv1D if kind == "gpt2" else LoraLinear
    assert all(type(layer) is expected_class for _, layer in lora_layers(model))


def test_state_dict_keys_are_pinned():
    """Base keys are unchanged; adapter keys sit beside them under adapters.<name>."""
    model = MODELS["llama"]()
    base_keys = set(model.state_dict())
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=["q_proj"]))
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert sorted(keys - base_keys) == [
        "model.layers.0.self_attn.q_proj.adapters.default.lora_A",
        "model.layers.0.self_attn.q_proj.adapters.default.lora_B",
        "model.layers.1.self_attn.q_proj.adapters.default.lora_A",
        "model.layers.1.self_attn.q_proj.adapters.default.lora_B",
    ]


def test_base_checkpoint_loads_into_adapted_model():
    model, donor = MODELS["llama"](seed=0), MODELS["llama"](seed=5)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8))
    result = model.load_state_dict(donor.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(".adapters." in key for key in result.missing_keys)
    x = token_batch(97)
    torch.testing.assert_close(model(x).logits, donor(x).logits, rtol=0, atol=0)


def test_only_adapters_are_trainable():
    model = MODELS["qwen2"]()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.lora_" in name for name in trainable)


def test_modules_to_save_stay_trainable():
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad
    counts = lorakit.trainable_parameters(model)
    assert counts.by_type["lm_head"] == (1, 97 * 32)
    assert counts.trainable == counts.adapter + 97 * 32


def test_trainable_parameters_counts_by_module_type():
    model = MODELS["llama"]()
    total_before = sum(p.numel() for p in model.parameters())
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "down_proj"]))
    counts = lorakit.trainable_parameters(model)
    # q_proj: 32 -> 32, down_proj: 48 -> 32; two layers each; r * (in + out) per module
    assert counts.by_type == {"q_proj": (2, 2 * 4 * (32 + 32)), "down_proj": (2, 2 * 4 * (48 + 32))}
    assert counts.base == total_before
    assert counts.trainable == counts.adapter == 2 * 4 * 64 + 2 * 4 * 80
    assert counts.percent == pytest.approx(100 * counts.trainable / (total_before + counts.trainable))


def test_rank_pattern_and_alpha_pattern_set_per_module_rank_and_scaling():
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*": 3}))
    v0 = model.model.layers[0].self_attn.v_proj.adapters["default"]
    q1 = model.model.layers[1].self_attn.q_proj.adapters["default"]
    assert v0.lora_A.shape == (2, 32) and v0.scaling == 8 / 2
    assert q1.lora_A.shape == (4, 32) and q1.scaling == 3 / 4


def test_qwen2_preset_reproduces_the_quoted_count():
    from lorakit.pretrained import build_meta

    model = build_meta("qwen2-0.5b")
    lorakit.attach(model, LoraConfig(rank=24, alpha=48, targets="all-linear"))
    counts = lorakit.trainable_parameters(model)
    assert counts.base == 494_032_768
    assert counts.trainable == 13_197_312
    assert round(counts.percent, 2) == 2.60


# -- errors leave the model as it was ---------------------------------------------------
@pytest.mark.parametrize("config, message", [
    (LoraConfig(rank=4, alpha=8, targets=["nope_proj"]), "matched no module. Candidate module names: .*q_proj"),
    (LoraConfig(rank=4, alpha=8, targets=["mlp"]), "LlamaMLP is not supported"),
    (LoraConfig(rank=40, alpha=8, targets=["q_proj"]), r"rank 40 > min\(in=32, out=32\)"),
    (LoraConfig(rank=4, alpha=8, rank_pattern={"k_proj": 17}), r"k_proj: rank 17 > min\(in=32, out=16\)"),
    (LoraConfig(rank=4, alpha=8, modules_to_save=["score"]), r"modules_to_save \['score'\] matched no module"),
])
def test_attach_errors_are_clear_and_change_nothing(config, message):
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["q_proj"]), name="first")
    before = snapshot(model)
    with pytest.raises(AttachError, match=message):
        lorakit.attach(model, config, name="second")
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["first", "", "a.b"])
def test_bad_or_used_adapter_name_is_refused(name):
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["q_proj"]), name="first")
    before = snapshot(model)
    with pytest.raises(AttachError, match="already used|non-empty string"):
        lorakit.attach(model, LoraConfig(rank=2, alpha=4), name=name)
    assert_unchanged(model, before)


# -- several adapters ---------------------------------------------------------------
def test_two_adapters_switch_disable_and_delete():
    model = MODELS["qwen2"]()
    x = token_batch(101)
    base = model(x).logits
    lorakit.attach(model, LoraConfig(rank=4, alpha=8), name="a")
    lorakit.attach(model, LoraConfig(rank=2, alpha=2, targets=["v_proj", "up_proj"]), name="b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    assert lorakit.adapters(model) == ["a", "b"]
    only_a = model(x).logits  # the first adapter is active, the second was added inactive
    lorakit.set_active(model, "b")
    only_b = model(x).logits
    lorakit.set_active(model, ["a", "b"])
    both = model(x).logits
    assert not torch.allclose(only_a, only_b) and not torch.allclose(both, only_a)
    with lorakit.disabled(model):
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(x).logits, both, rtol=0, atol=0)
    lorakit.set_active(model, [])
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    with pytest.raises(AttachError, match=r"unknown adapter\(s\) \['c'\]"):
        lorakit.set_active(model, ["c"])

    lorakit.set_active(model, ["a", "b"])
    lorakit.delete_adapter(model, "a")
    assert lorakit.adapters(model) == ["b"]
    torch.testing.assert_close(model(x).logits, only_b, rtol=1e-5, atol=1e-5)
    # layers that only had "a" are plain modules again
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    lorakit.delete_adapter(model, "b")
    assert not lora_layers(model)
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)


def with_two_adapters(model):
    """``model`` with random adapters "a" (active) and "b" (inactive) on all linear layers."""
    lorakit.attach(model, LoraConfig(rank=4, alpha=8), name="a")
    lorakit.attach(model, LoraConfig(rank=4, alpha=8), name="b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    return model


@pytest.mark.parametrize("training", [False, True])
def test_new_adapters_take_the_mode_of_the_model(training):
    model = MODELS["llama"]().train(training)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, dropout=0.5, targets="all-linear"))
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, dropout=0.5, targets="all-linear"), name="second")
    assert {m.training for m in model.modules()} == {training}

"""Merging (merge.py): merged equals unmerged, merge twice = merge once, unmerge restores,
one float32 rounding, the NaN check that changes nothing, detach, and the model-free merge
of an adapter value into a state dict."""

import pytest
import torch
from conftest import MODELS, assert_unchanged, randomize_adapters, snapshot, tiny_gpt2, token_batch
from test_adapter import every_layout
from test_attach import with_two_adapters
from test_layers import KINDS, set_random, single

import lorakit
from lorakit import LoraConfig, MergeError
from lorakit.attach import lora_layers
from lorakit.files import export_adapter
from lorakit.merge import merged_state_dict



def test_unsafe_merge_of_a_nan_adapter_is_refused_and_changes_nothing():
    model = MODELS["llama"]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.adapters["default"].lora_B[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.up_proj"):
        lorakit.merge(model)
    assert_unchanged(model, before)


def test_merged_adapter_that_is_switched_off_no_longer_contributes():
    """Merging changes speed, never meaning: output is always base + active adapters."""
    model = MODELS["llama"]()
    x = token_batch(97)
    base = model(x).logits.detach()
    with_two_adapters(model)
    with torch.no_grad():
        only_a = model(x).logits
        lorakit.merge(model, ["a", "b"])
        torch.testing.assert_close(model(x).logits, only_a, rtol=1e-4, atol=1e-4)
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x).logits, base, rtol=1e-4, atol=1e-4)
        lorakit.delete_adapter(model, "b")  # unmerges b first
        torch.testing.assert_close(model(x).logits, only_a, rtol=1e-4, atol=1e-4)


def test_detach_merges_only_active_adapters():
    model = with_two_adapters(tiny_gpt2())
    x = token_batch(89)
    with torch.no_grad():
        only_a = model(x).logits
        lorakit.merge(model, ["b"])
        plain = lorakit.detach(model)
    assert not lora_layers(plain) and not hasattr(plain, "lorakit_configs")
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(plain(x).logits, only_a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_merged_state_dict_equals_merging_the_model(family):
    model = MODELS[family]()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, modules_to_save=("lm_head",)
                                             if family != "qwen2" else ()))
    randomize_adapters(model)
    adapter = export_adapter(model)
    merged = merged_state_dict(base, adapter)
    lorakit.detach(model)  # merged in place, original module types
    expected = model.state_dict()
    assert merged.keys() == base.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0, msg=key)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # and base itself is untouched
    assert all(torch.equal(base[k], v) for k, v in MODELS[family]().state_dict().items())


def test_merged_state_dict_refuses_a_base_it_does_not_fit():
    adapter = export_adapter(every_layout())
    base = {"linear.weight": torch.zeros(12, 16), "conv1d.weight": torch.zeros(12, 12)}
    with pytest.raises(ValueError, match=r"conv1d: weight \(12, 12\), the adapter's update is \(16, 12\)") as err:
        merged_state_dict(base, adapter)
    assert "embedding: no 'embedding.weight' in the base state dict" in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_is_idempotent_and_unmerge_restores(kind):
    model, x = single(kind)
    base_weight = model.layer.weight.detach().clone()
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    set_random(model)
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge(model)
        merged_weight = model.layer.weight.detach().clone()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        lorakit.merge(model)
        assert torch.equal(model.layer.weight, merged_weight)
        assert model.layer.merged == ["default"]
        lorakit.unmerge(model)
        lorakit.unmerge(model)
    assert model.layer.merged == []
    torch.testing.assert_close(model.layer.weight.detach(), base_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_detach_gives_original_type_with_merged_weights(kind):
    model, x = single(kind)
    original_type = type(model.layer)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    set_random(model)
    with torch.no_grad():
        adapted = model(x)
        plain = lorakit.detach(model, merge=True)
    assert type(plain.layer) is original_type and not lora_layers(plain)
    torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_detach_without_merge_restores_the_exact_base(kind):
    model, x = single(kind)
    base = model(x).detach()
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    set_random(model)
    plain = lorakit.detach(model, merge=False)
    assert torch.equal(plain(x), base)


def test_merge_in_bf16_computes_in_fp32_and_rounds_once():
    model, x = single("linear", torch.bfloat16)
    W = model.layer.weight.detach().clone()
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    adapter = model.layer.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32  # adapters stay fp32 on half bases
    set_random(model)
    assert model(x).dtype == torch.bfloat16
    lorakit.merge(model)
    expected = (W.float() + adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()).to(torch.bfloat16)
    assert torch.equal(model.layer.weight, expected)

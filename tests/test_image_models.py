"""LoRA on image models: a diffusers UNet (Linear + 1x1/3x3 Conv2d), a DiT (SD3's MMDiT)
and the CLIP text encoder, against dense math and against PEFT on the same weights."""

import copy

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.attach import lora_layers
from lorakit.config import TARGET_SETS

from conftest import randomize_adapters
from image_models import dit_inputs, tiny_clip, tiny_dit, tiny_unet, unet_inputs

def no_grad(function):
    def call(model):
        with torch.no_grad():
            return function(model)
    return call


MODELS = {
    "unet": (tiny_unet, no_grad(lambda m: m(*unet_inputs()).sample)),
    "dit": (tiny_dit, no_grad(lambda m: m(**dit_inputs()).sample)),
    "clip": (tiny_clip, no_grad(lambda m: m(torch.tensor([[0, 5, 9, 2, 1], [0, 7, 7, 3, 1]])).last_hidden_state)),
}


def dense_reference(base, model):
    """``base`` with every adapted weight replaced by W + (alpha/r)·B·A, written out by hand."""
    dense = copy.deepcopy(base)
    for path, layer in lora_layers(model):
        adapter = layer.adapters["default"]
        A, B, s = adapter.lora_A.float(), adapter.lora_B.float(), adapter.scaling
        weight = dense.get_submodule(path).weight
        if weight.dim() == 4:  # (out, r, 1, 1) after (r, in, kh, kw): sum over r
            delta = (B[:, :, 0, 0] @ A.reshape(A.shape[0], -1)).reshape(weight.shape)
        else:
            delta = B @ A
        with torch.no_grad():
            weight.add_(s * delta)
    return dense


@pytest.mark.parametrize("targets", sorted(TARGET_SETS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_unmerged_equals_merged_equals_dense(kind, targets):
    build, run = MODELS[kind]
    base, model = build(), build()
    paths = lorakit.attach(model, LoraConfig(rank=4, alpha=6, targets=TARGET_SETS[targets]))
    assert paths
    if kind == "unet" and targets == "attention-conv":  # the 3x3 kernels of resnets and resamplers are adapted
        kernels = {tuple(model.get_submodule(p).weight.shape[2:]) for p in paths}
        assert (3, 3) in kernels and (1, 1) in kernels
    torch.testing.assert_close(run(model), run(base), rtol=0, atol=0)  # B = 0: exactly the base
    randomize_adapters(model, scale=0.2)
    unmerged = run(model)
    assert (unmerged - run(base)).abs().max() > 1e-3
    torch.testing.assert_close(unmerged, run(dense_reference(base, model)), rtol=0, atol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(run(model), unmerged, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(run(model), unmerged, rtol=0, atol=1e-5)


def test_attention_targets_are_what_diffusers_dreambooth_trains():
    model = tiny_unet()
    paths = lorakit.attach(model, LoraConfig(rank=4, alpha=4, targets=TARGET_SETS["attention"]))
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in paths)
    assert len(paths) == 4 * 2 * 4  # 4 projections x (self, cross) x 4 transformer blocks (down, mid, 2 up)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_format_round_trips_both_ways_on_image_models(kind, tmp_path):
    build, run = MODELS[kind]
    ours = build()
    lorakit.attach(ours, LoraConfig(rank=4, alpha=8, targets=TARGET_SETS["attention-conv"],
                                    rank_pattern={"to_k": 2}))
    randomize_adapters(ours, scale=0.2)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs.base_model.model), run(ours), rtol=0, atol=1e-5)

    torch.manual_seed(5)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False,
                                                          target_modules=list(TARGET_SETS["attention-conv"])))
    theirs.save_pretrained(tmp_path / "theirs")
    back = build()
    lorakit.load_adapter(back, tmp_path / "theirs")
    torch.testing.assert_close(run(back), run(theirs.base_model.model), rtol=0, atol=1e-5)

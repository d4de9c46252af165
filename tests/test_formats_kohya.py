"""kohya/A1111 LoRA files: names looked up in a table built from the model, alpha per
module, conv kernels; lorakit's files load through diffusers with the same outputs, and
files written by hand from kohya's naming rules load in lorakit with the right scaling."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.attach import lora_layers
from lorakit.config import TARGET_SETS
from lorakit.files import AdapterFileError
from lorakit.pipelines import load_pipeline_adapter, read_pipeline_adapter, save_pipeline_adapter
from lorakit.formats.kohya import name_table

from conftest import assert_unchanged, randomize_adapters, snapshot
from image_models import pipeline_outputs, tiny_pipeline

# Modules named as kohya names them, for the tiny UNet / CLIP of image_models.py.
HAND_MADE = {  # kohya name -> (down shape, up shape, alpha)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 32), (32, 4), 1.0),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0": ((4, 32), (32, 4), 1.0),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 32), (64, 4), 1.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((8, 32, 3, 3), (32, 8, 1, 1), 2.0),  # LoCon: a 3x3 kernel
    "lora_unet_up_blocks_0_resnets_0_conv_shortcut": ((8, 128, 1, 1), (64, 8, 1, 1), 2.0),
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": ((2, 32), (32, 2), 16.0),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ((2, 32), (37, 2), 0.5),
}
PATHS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),
    "lora_unet_up_blocks_0_resnets_0_conv_shortcut": ("unet", "up_blocks.0.resnets.0.conv_shortcut"),
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": ("text_encoder", "encoder.layers.1.self_attn.v_proj"),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ("text_encoder", "encoder.layers.0.mlp.fc1"),
}


def hand_made_file(path, skip=()):
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for name, (down, up, alpha) in HAND_MADE.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(down, generator=generator) * 0.2
        tensors[f"{name}.lora_up.weight"] = torch.randn(up, generator=generator) * 0.2
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file({k: v for k, v in tensors.items() if k not in skip}, path)
    return tensors


def models_of(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def test_hand_made_kohya_file_loads_with_alpha_over_rank(tmp_path):
    tensors = hand_made_file(tmp_path / "style.safetensors")
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    values = read_pipeline_adapter(tmp_path / "style.safetensors", models_of(pipe))
    for name, (component, path) in PATHS.items():
        layer = values[component].layers[path]
        rank = HAND_MADE[name][0][0]
        assert layer.scaling == HAND_MADE[name][2] / rank
        assert torch.equal(layer.A, tensors[f"{name}.lora_down.weight"])
        assert layer.layout == ("conv2d" if layer.A.dim() == 4 else "linear")
    # the weights it gives: W + (alpha / r) * up @ down, by hand
    load_pipeline_adapter(models_of(pipe), tmp_path / "style.safetensors")
    base = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.merge(pipe.unet)
    lorakit.merge(pipe.text_encoder)
    for name, (component, path) in PATHS.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(-1, *down.shape[1:]) * (HAND_MADE[name][2] / down.shape[0])
        W = getattr(base, component).get_submodule(path).weight
        torch.testing.assert_close(getattr(pipe, component).get_submodule(path).weight, W + delta, rtol=0, atol=1e-6)


def test_diffusers_and_lorakit_convert_a_kohya_file_to_the_same_weights(tmp_path):
    # The UNet part: diffusers 0.42 drops a kohya file's text-encoder attention modules
    # into a transformers-5 CLIPTextModel (its converted names no longer match), and it
    # reads one alpha for every attention module, so this file keeps alpha uniform there.
    hand_made_file(tmp_path / "style.safetensors", skip=[k for k in hand_made_keys() if k.startswith("lora_te")])
    ours, theirs = tiny_pipeline(tmp_path / "tokenizer"), tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter(models_of(ours), tmp_path / "style.safetensors")
    theirs.load_lora_weights(tmp_path / "style.safetensors")
    torch.testing.assert_close(pipeline_outputs(ours)["unet"], pipeline_outputs(theirs)["unet"], rtol=0, atol=1e-5)
    lorakit.merge(ours.unet)
    theirs.fuse_lora(components=["unet"])
    for component, path in PATHS.values():
        if component == "unet":  # the same merged weights, module by module
            torch.testing.assert_close(ours.unet.get_submodule(path).weight,
                                       theirs.unet.get_submodule(path).base_layer.weight, rtol=0, atol=1e-6)


def hand_made_keys():
    return [f"{name}.{part}" for name in HAND_MADE for part in ("lora_down.weight", "lora_up.weight", "alpha")]


def test_lorakits_kohya_files_load_through_diffusers_with_the_same_outputs(tmp_path):
    ours = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(ours.unet, LoraConfig(rank=4, alpha=6, targets=TARGET_SETS["attention-conv"],
                                         rank_pattern={"conv1": 8}, alpha_pattern={"conv2": 1}))
    lorakit.attach(ours.text_encoder, LoraConfig(rank=2, alpha=7, targets=TARGET_SETS["attention"]))
    randomize_adapters(ours.unet, scale=0.2)
    randomize_adapters(ours.text_encoder, seed=5, scale=0.2)
    expected = pipeline_outputs(ours)
    path = save_pipeline_adapter(models_of(ours), tmp_path / "ours.safetensors", file_format="kohya")
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
        alpha = handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert alpha.dim() == 0 and alpha.item() == 6.0
    theirs = tiny_pipeline(tmp_path / "tokenizer")
    theirs.load_lora_weights(path)
    got = pipeline_outputs(theirs)
    for component in expected:
        torch.testing.assert_close(got[component], expected[component], rtol=0, atol=1e-5, msg=component)
    back = tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter(models_of(back), path)
    for component, value in pipeline_outputs(back).items():
        torch.testing.assert_close(value, expected[component], rtol=0, atol=0)


def test_bad_kohya_files_are_refused_naming_the_key(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    before = {component: snapshot(model) for component, model in models_of(pipe).items()}
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"

    def refused(tensors, message):
        save_file(tensors, tmp_path / "bad.safetensors")
        with pytest.raises(AdapterFileError, match=message):
            load_pipeline_adapter(models_of(pipe), tmp_path / "bad.safetensors")

    good = {f"{q}.lora_down.weight": torch.zeros(4, 32), f"{q}.lora_up.weight": torch.zeros(32, 4),
            f"{q}.alpha": torch.tensor(4.0)}
    refused({**good, "lora_vae_decoder_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
             "lora_vae_decoder_conv_in.lora_up.weight": torch.zeros(4, 4, 1, 1)},
            "lora_vae_decoder_conv_in: unknown kohya prefix")
    refused({**good, f"{conv}.lora_down.weight": torch.zeros(8, 32, 1, 1), f"{conv}.lora_up.weight":
             torch.zeros(32, 8, 1, 1), f"{conv}.alpha": torch.tensor(8.0)},
            rf"{conv}.lora_down.weight \(8, 32, 1, 1\) .* expected \(8, 32, 3, 3\)")
    refused({k: v for k, v in good.items() if not k.endswith("alpha")}, rf"{q}: missing {q}.alpha")
    refused({**good, "lora_unet_down_blocks_9_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_down_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
             "lora_unet_down_blocks_9_attn1_to_q.alpha": torch.tensor(1.0)},
            "lora_unet_down_blocks_9_attn1_to_q: no module of the unet has this kohya name")
    refused({**good, "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)},
            "lora_te2_text_model_encoder_layers_0_mlp_fc1: a text_encoder_2 module, but no text_encoder_2 model")
    refused({**good, "unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3)}, "mixes formats")
    assert_unchanged(pipe.unet, before["unet"])
    assert_unchanged(pipe.text_encoder, before["text_encoder"])
    (tmp_path / "style.ckpt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterFileError, match="style.ckpt: pickled weights are never loaded"):
        load_pipeline_adapter(models_of(pipe), tmp_path / "style.ckpt")


def test_names_that_collide_when_flattened_are_refused():
    model = nn.Module()
    model.to_out = nn.ModuleList([nn.Linear(4, 4)])
    model.to_out_0 = nn.Linear(4, 4)
    with pytest.raises(AdapterFileError, match="share the kohya name 'lora_unet_to_out_0'"):
        name_table("unet", model)


def test_table_covers_every_adaptable_module_once():
    pipe_unet = tiny_pipeline_unet()
    table = name_table("unet", pipe_unet)
    adaptable = [p for p, m in pipe_unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sorted(table.values()) == sorted(adaptable)
    lorakit.attach(pipe_unet, LoraConfig(rank=2, alpha=2, targets=TARGET_SETS["attention"]))
    assert name_table("unet", pipe_unet) == table  # attached layers keep their names
    assert len(lora_layers(pipe_unet)) > 0


def tiny_pipeline_unet():
    from image_models import tiny_unet

    return tiny_unet()

"""diffusers' one-file LoRA format: lorakit's files load through diffusers' own
``load_lora_weights`` with the same outputs, and diffusers' files load in lorakit."""

import json

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig
from lorakit.config import TARGET_SETS
from lorakit.files import AdapterFileError
from lorakit.pipelines import load_pipeline_adapter, save_pipeline_adapter
from lorakit.formats.diffusers import METADATA_KEY, WEIGHTS_NAME

from conftest import assert_unchanged, randomize_adapters, snapshot
from image_models import dit_inputs, pipeline_outputs, tiny_dit, tiny_pipeline


def lorakit_pipeline(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(pipe.unet, LoraConfig(rank=4, alpha=6, targets=TARGET_SETS["attention-conv"]))
    lorakit.attach(pipe.text_encoder, LoraConfig(rank=2, alpha=3, targets=TARGET_SETS["attention"]))
    randomize_adapters(pipe.unet, scale=0.2)
    randomize_adapters(pipe.text_encoder, seed=4, scale=0.2)
    return pipe


def test_file_layout_is_diffusers(tmp_path):
    pipe = lorakit_pipeline(tmp_path)
    path = save_pipeline_adapter({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tmp_path / "lora")
    assert path == tmp_path / "lora" / WEIGHTS_NAME
    with safe_open(path, framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "unet.down_blocks.0.resnets.0.conv1.lora_B.weight" in keys
    # transformers >= 5 flattened CLIPTextModel (no ``text_model.``); diffusers saves the paths as they are
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    fields = json.loads(metadata[METADATA_KEY])
    assert (fields["unet.r"], fields["unet.lora_alpha"], fields["text_encoder.r"]) == (4, 6, 2)


def test_diffusers_load_lora_weights_gives_lorakits_outputs(tmp_path):
    ours = lorakit_pipeline(tmp_path)
    expected = pipeline_outputs(ours)
    save_pipeline_adapter({"unet": ours.unet, "text_encoder": ours.text_encoder}, tmp_path / "lora")
    theirs = tiny_pipeline(tmp_path / "tokenizer")
    base = pipeline_outputs(theirs)
    theirs.load_lora_weights(tmp_path / "lora", adapter_name="style")
    got = pipeline_outputs(theirs)
    for component in expected:
        assert (expected[component] - base[component]).abs().max() > 1e-3
        torch.testing.assert_close(got[component], expected[component], rtol=0, atol=1e-5, msg=component)
    theirs.fuse_lora()
    torch.testing.assert_close(pipeline_outputs(theirs)["unet"], expected["unet"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_lorakit_loads_files_diffusers_saved(tmp_path, with_metadata):
    from diffusers import StableDiffusionPipeline

    theirs = tiny_pipeline(tmp_path / "tokenizer")
    torch.manual_seed(7)
    unet_config = peft.LoraConfig(r=4, lora_alpha=4 if not with_metadata else 9, init_lora_weights=False,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    text_config = peft.LoraConfig(r=2, lora_alpha=2 if not with_metadata else 5, init_lora_weights=False,
                                  target_modules=["q_proj", "v_proj"])
    theirs.unet.add_adapter(unet_config)
    theirs.text_encoder.add_adapter(text_config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(theirs.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(theirs.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict() if with_metadata else None,
        text_encoder_lora_adapter_metadata=text_config.to_dict() if with_metadata else None)
    expected = pipeline_outputs(theirs)

    ours = tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter({"unet": ours.unet, "text_encoder": ours.text_encoder}, tmp_path / "lora")
    got = pipeline_outputs(ours)
    for component in expected:
        torch.testing.assert_close(got[component], expected[component], rtol=0, atol=1e-5, msg=component)


def test_dit_round_trips_through_diffusers_transformer_files(tmp_path):
    from diffusers import SD3Transformer2DModel

    ours = tiny_dit()
    lorakit.attach(ours, LoraConfig(rank=4, alpha=2, targets=TARGET_SETS["attention"]))
    randomize_adapters(ours, scale=0.2)
    with torch.no_grad():
        expected = ours(**dit_inputs()).sample
    path = save_pipeline_adapter({"transformer": ours}, tmp_path / "lora")
    theirs = tiny_dit()
    assert isinstance(theirs, SD3Transformer2DModel)
    with safe_open(path, framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    theirs.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    back = tiny_dit()
    load_pipeline_adapter({"transformer": back}, path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**dit_inputs()).sample, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(**dit_inputs()).sample, expected, rtol=0, atol=0)


def test_a_bad_second_component_leaves_every_model_unchanged(tmp_path):
    pipe = lorakit_pipeline(tmp_path)
    path = save_pipeline_adapter({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tmp_path / "lora")
    fresh = tiny_pipeline(tmp_path / "tokenizer")
    other_text = lorakit_pipeline(tmp_path).text_encoder  # already has "default": the second install must fail
    unet_before, text_before = snapshot(fresh.unet), snapshot(other_text)
    with pytest.raises(ValueError, match="default"):
        load_pipeline_adapter({"unet": fresh.unet, "text_encoder": other_text}, path)
    assert_unchanged(fresh.unet, unet_before)
    assert_unchanged(other_text, text_before)


def test_bad_diffusers_files_are_refused_by_key(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    before = snapshot(pipe.unet)
    good = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    pair = {f"{good}.lora_A.weight": torch.zeros(4, 32), f"{good}.lora_B.weight": torch.zeros(32, 4)}
    cases = {
        "vae.decoder.conv_in.lora_A.weight": "vae.decoder.conv_in.lora_A.weight: not a diffusers LoRA key",
        "unet.conv_in.lora_A.weight": "conv_in: needs both lora_A and lora_B",
    }
    for key, message in cases.items():
        save_file({**pair, key: torch.zeros(4, 4, 3, 3)}, tmp_path / "bad.safetensors")
        with pytest.raises(AdapterFileError, match=message):
            load_pipeline_adapter(models, tmp_path / "bad.safetensors")
    save_file({f"{good}.lora_A.weight": torch.zeros(4, 32), f"{good}.lora_B.weight": torch.zeros(32, 4),
               "lora_unet_conv_in.alpha": torch.tensor(1.0)}, tmp_path / "mixed.safetensors")
    with pytest.raises(AdapterFileError, match="mixes formats"):
        load_pipeline_adapter(models, tmp_path / "mixed.safetensors")
    save_file({f"{good}.lora_A.weight": torch.zeros(4, 31), f"{good}.lora_B.weight": torch.zeros(32, 4)},
              tmp_path / "shape.safetensors")
    with pytest.raises(AdapterFileError, match=r"attn1.to_q.lora_A.weight has shape \(4, 31\), expected \(4, 32\)"):
        load_pipeline_adapter(models, tmp_path / "shape.safetensors")
    (tmp_path / "pickled.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterFileError, match="pickled weights are never loaded"):
        load_pipeline_adapter(models, tmp_path / "pickled.bin")
    assert_unchanged(pipe.unet, before)

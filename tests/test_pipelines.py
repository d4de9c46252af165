"""``lorakit convert``: an image adapter between PEFT's, diffusers' and kohya's files,
checked against the pipeline's models built on the meta device."""

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit import LoraConfig
from lorakit.cli import app
from lorakit.files import AdapterFileError
from lorakit.pipelines import load_pipeline_adapter
from lorakit.pipelines import convert, pipeline_skeleton

from conftest import randomize_adapters
from image_models import pipeline_outputs, tiny_pipeline
from test_formats_kohya import hand_made_file, models_of


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline")
    tiny_pipeline(directory / "tokenizer-source").save_pretrained(directory / "sd")
    return directory / "sd"


def test_skeleton_is_the_pipelines_models_on_the_meta_device(pipeline_dir, tmp_path):
    models = pipeline_skeleton(pipeline_dir)
    assert sorted(models) == ["text_encoder", "unet"]
    real = tiny_pipeline(tmp_path / "tokenizer")
    for component, model in models.items():
        assert all(p.is_meta for p in model.parameters())
        shapes = {n: tuple(p.shape) for n, p in getattr(real, component).named_parameters()}
        assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes


def test_kohya_to_diffusers_and_peft_to_kohya_keep_the_outputs(pipeline_dir, tmp_path):
    hand_made_file(tmp_path / "style.safetensors")
    direct = tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter(models_of(direct), tmp_path / "style.safetensors")
    expected = pipeline_outputs(direct)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "style.safetensors"), str(tmp_path / "diffusers"),
                                      "--to", "diffusers", "--pipeline", str(pipeline_dir)])
    assert result.exit_code == 0, result.output
    theirs = tiny_pipeline(tmp_path / "tokenizer")
    theirs.load_lora_weights(tmp_path / "diffusers")  # diffusers reads the converted file
    for component, value in pipeline_outputs(theirs).items():
        torch.testing.assert_close(value, expected[component], rtol=0, atol=1e-5, msg=component)

    ours = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(ours.unet, LoraConfig(rank=4, alpha=6, targets="attention-conv"))
    randomize_adapters(ours.unet, scale=0.2)
    lorakit.save_adapter(ours.unet, tmp_path / "peft")
    convert(tmp_path / "peft", tmp_path / "unet.safetensors", "kohya", pipeline_dir)
    back = tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter({"unet": back.unet}, tmp_path / "unet.safetensors")
    torch.testing.assert_close(pipeline_outputs(back)["unet"], pipeline_outputs(ours)["unet"], rtol=0, atol=0)


def test_bad_conversions_are_refused_and_write_nothing(pipeline_dir, tmp_path):
    hand_made_file(tmp_path / "style.safetensors")
    with pytest.raises(AdapterFileError, match="--to must be one of peft, diffusers, kohya"):
        convert(tmp_path / "style.safetensors", tmp_path / "a", "ckpt", pipeline_dir)
    with pytest.raises(AdapterFileError, match="holds adapters for .*unet.*text_encoder|text_encoder.*unet"):
        convert(tmp_path / "style.safetensors", tmp_path / "b", "peft", pipeline_dir)
    other = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(other.unet, LoraConfig(rank=2, alpha=2, targets="attention"))
    lorakit.save_adapter(other.unet, tmp_path / "peft")
    with pytest.raises(AdapterFileError, match="no text_encoder_2 model"):
        convert(tmp_path / "peft", tmp_path / "c", "kohya", pipeline_dir, component="text_encoder_2")
    with pytest.raises(AdapterFileError, match="not a diffusers pipeline folder"):
        convert(tmp_path / "peft", tmp_path / "d", "kohya", tmp_path)
    assert not any((tmp_path / name).exists() for name in "abcd")

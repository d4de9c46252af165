"""What every adapter file passes through (formats/__init__.py): a NaN or an infinity in
any tensor of a PEFT, diffusers or kohya file is refused by name, wherever the file is
read (load, pipeline load, convert, combine), with the model unchanged and nothing written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.files import AdapterFileError
from lorakit.pipelines import load_pipeline_adapter
from lorakit.pipelines import convert

from conftest import assert_unchanged, randomize_adapters, snapshot, tiny_llama
from image_models import tiny_pipeline
from test_formats_kohya import hand_made_file, models_of
from test_pipelines import pipeline_dir  # noqa: F401  (a tiny pipeline folder, once per module)

runner = CliRunner()


def poison(path, key_part: str, value: float) -> str:
    """Put ``value`` into one element of the first tensor whose key contains ``key_part``."""
    tensors = load_file(path)
    key = sorted(k for k in tensors if key_part in k)[0]
    tensors[key].view(-1)[-1] = value
    save_file(tensors, path)
    return key


@pytest.fixture
def peft_adapter(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    randomize_adapters(model)
    return lorakit.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("key_part, value", [("lora_A", float("nan")), ("lora_B", float("inf")),
                                             ("lora_B", float("-inf"))])
def test_a_peft_file_with_a_non_finite_value_is_refused_by_tensor(peft_adapter, tmp_path, key_part, value):
    key = poison(peft_adapter / "adapter_model.safetensors", key_part, value)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=rf"tensor {key.replace('.', '[.]')} has NaN or infinite values"):
        lorakit.load_adapter(model, peft_adapter)
    assert_unchanged(model, before)
    with pytest.raises(AdapterFileError, match="has NaN or infinite values"):
        lorakit.read_adapter(peft_adapter)


def test_combine_refuses_a_nan_adapter_and_writes_nothing(peft_adapter, tmp_path):
    good = tmp_path / "good"
    import shutil

    shutil.copytree(peft_adapter, good)
    poison(peft_adapter / "adapter_model.safetensors", "lora_B", float("nan"))
    result = runner.invoke(app, ["combine", str(good), str(peft_adapter), "--out", str(tmp_path / "sum")])
    assert result.exit_code == 2 and "has NaN or infinite values" in result.output
    assert not (tmp_path / "sum").exists()


def test_a_kohya_file_with_a_nan_lora_up_neither_loads_nor_converts(pipeline_dir, tmp_path):
    path = tmp_path / "style.safetensors"
    hand_made_file(path)
    key = poison(path, "lora_up", float("nan"))
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    before = {component: snapshot(model) for component, model in models_of(pipe).items()}
    with pytest.raises(AdapterFileError, match=f"tensor {key} has NaN"):
        load_pipeline_adapter(models_of(pipe), path)
    for component, model in models_of(pipe).items():
        assert_unchanged(model, before[component])
    for target in ("diffusers", "peft"):
        out = tmp_path / f"as-{target}"
        with pytest.raises(AdapterFileError, match=f"tensor {key} has NaN"):
            convert(path, out, target, pipeline_dir)
        assert not out.exists()


def test_a_diffusers_file_with_an_infinite_value_is_refused(pipeline_dir, tmp_path):
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(pipe.unet, lorakit.LoraConfig(rank=2, alpha=2, targets="attention"))
    randomize_adapters(pipe.unet)
    written = lorakit.save_pipeline_adapter(models_of(pipe), tmp_path / "diffusers", file_format="diffusers")
    key = poison(written, "lora", float("inf"))
    fresh = tiny_pipeline(tmp_path / "tokenizer2")
    before = snapshot(fresh.unet)
    with pytest.raises(AdapterFileError, match=f"tensor {key} has NaN or infinite values"):
        load_pipeline_adapter(models_of(fresh), written)
    assert_unchanged(fresh.unet, before)
    result = runner.invoke(app, ["convert", str(written), str(tmp_path / "k.safetensors"), "--to", "kohya",
                                 "--pipeline", str(pipeline_dir)])
    assert result.exit_code == 2 and "has NaN or infinite values" in result.output
    assert not (tmp_path / "k.safetensors").exists()


def test_integer_and_empty_tensors_pass_the_check(tmp_path):
    from lorakit.formats import finite

    assert finite(torch.tensor([1, 2, 3])) and finite(torch.empty(0)) and finite(torch.ones(3, dtype=torch.bfloat16))
    assert not finite(torch.tensor([1.0, float("nan")], dtype=torch.float16))

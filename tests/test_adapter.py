"""The adapter value (adapter.py): export, files, import and the model-free merge."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from conftest import MODELS, randomize_adapters, token_batch
from torch import nn

import lorakit
from lorakit.adapter import Adapter, LayerWeights
from lorakit.variants import LoraAdapter, lora_value
from lorakit.files import AdapterFileError, export_adapter, import_adapter, read_adapter, write_adapter


def every_layout(conv1d: bool = False):
    """A model with one module of each layout, adapted, with random factors. PEFT's files
    have one fan_in_fan_out flag for all their modules, so GPT-2's Conv1D and nn.Linear
    never share a file: ``conv1d`` swaps the Linear for a Conv1D."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        linear=Conv1D(12, 16) if conv1d else nn.Linear(16, 12), conv1d=Conv1D(12, 16), embedding=nn.Embedding(20, 12),
        conv2d=nn.Conv2d(4, 6, 3)))
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=5, targets=["linear", "conv1d", "embedding", "conv2d"],
                                             rank_pattern={"conv2d": 2}, use_rslora=True))
    randomize_adapters(model, scale=0.3)
    return model


@pytest.mark.parametrize("conv1d", [False, True])
def test_a_model_exports_a_value_that_round_trips_through_files(tmp_path, conv1d):
    model = every_layout(conv1d)
    adapter = export_adapter(model)
    assert {path: layer.layout for path, layer in adapter.layers.items()} == {
        "linear": "conv1d" if conv1d else "linear", "conv1d": "conv1d", "embedding": "embedding",
        "conv2d": "conv2d"}
    assert adapter.layers["conv2d"].rank == 2 and adapter.layers["linear"].scaling == pytest.approx(5 / 3 ** 0.5)
    for path, layer in adapter.layers.items():  # the value's ΔW is the layer's own
        torch.testing.assert_close(layer.delta(), dict(model.named_modules())[path].delta_weight("default"))
    if not conv1d:  # a mixed Linear + Conv1D adapter: the file cannot say which is which
        adapter = Adapter(adapter.config, {p: w for p, w in adapter.layers.items() if w.layout != "conv1d"})
    write_adapter(adapter, tmp_path / "a")
    again = read_adapter(tmp_path / "a")
    assert again.config == adapter.config and again.layers.keys() == adapter.layers.keys()
    for path, layer in adapter.layers.items():
        other = again.layers[path]
        assert (other.layout, other.scaling) == (layer.layout, layer.scaling)
        assert torch.equal(other.A, layer.A) and torch.equal(other.B, layer.B)


def test_the_value_is_a_copy_and_cannot_be_changed():
    model = every_layout()
    adapter = export_adapter(model)
    before = adapter.layers["linear"].B.clone()
    with torch.no_grad():
        model.linear.adapters["default"].lora_B.add_(1.0)  # training goes on
    assert torch.equal(adapter.layers["linear"].B, before)
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.layers["linear"].scaling = 2.0
    with pytest.raises(TypeError):
        adapter.layers["new"] = adapter.layers["linear"]
    with pytest.raises(ValueError, match="layout must be one of"):
        LayerWeights(LoraAdapter, {"lora_A": before, "lora_B": before}, 1.0, "conv3d")


@pytest.mark.parametrize("family", sorted(MODELS))
def test_import_gives_the_exporting_models_outputs(family):
    source, target = MODELS[family](), MODELS[family]()
    lorakit.attach(source, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(source)
    assert import_adapter(target, export_adapter(source), "copy") == "copy"
    ids = token_batch(source.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_read_adapter_names_the_module_of_a_broken_pair(tmp_path):
    adapter = export_adapter(every_layout())
    layers = dict(adapter.layers)
    layers["linear"] = lora_value(layers["linear"].A[:2], layers["linear"].B[:, :2], 1.0)
    write_adapter(Adapter(adapter.config, layers), tmp_path / "a")
    with pytest.raises(AdapterFileError, match=r"linear: A \(2, 16\), B \(12, 2\); expected rank 3"):
        read_adapter(tmp_path / "a")

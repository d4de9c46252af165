"""The variant seam (variants/): a new kind of adapter, defined here alone, trains, saves,
loads and merges through the same code as LoRA and DoRA."""

import json

import pytest
import torch
from conftest import token_batch
from safetensors.torch import load_file
from test_training_loop import run
from torch import Tensor, nn

import lorakit
from lorakit import variants
from lorakit.adapter import LayerWeights
from lorakit.attach import lora_layers
from lorakit.variants import LoraAdapter


class GatedAdapter(LoraAdapter):
    """y = base(x) + g · s·B·A·x with a learned scalar gate g (starting at 1)."""

    plain = False  # the gate scales the update: not the sole-adapter path
    servable = combinable = shardable = False
    extras = ("lora_gate",)

    def __init__(self, layer, rank, alpha, config):
        super().__init__(layer, rank, alpha, config)
        self.lora_gate = nn.Parameter(torch.ones(1, device=self.lora_A.device, dtype=self.lora_A.dtype))

    @classmethod
    def extra_shapes(cls, layer_class, base):
        return {"lora_gate": (1,)}

    def forward(self, layer, x: Tensor, base, result, sign: float = 1.0) -> Tensor:
        return result + (sign * self.lora_gate * self.update(layer, x)).to(result.dtype)

    def unmerged_weight(self, layer, weight: Tensor) -> Tensor:
        value = self.value(layer)
        return weight - value.tensors["lora_gate"].float() * value.delta()

    @staticmethod
    def merge_value(weight: Tensor, value: LayerWeights) -> Tensor:
        return weight + value.tensors["lora_gate"].float().to(weight.device) * value.delta().to(weight.device)


@pytest.fixture
def gated():
    variants.register("gated", GatedAdapter, "gated LoRA")
    yield
    variants.unregister("gated")


def test_a_variant_defined_in_a_test_trains_saves_loads_and_merges(gated, tiny_lm_dir, tmp_path):
    model, result = run(tiny_lm_dir, tmp_path, variant="gated", rank=4, alpha=8, lr=1e-2, max_steps=4,
                        batch_size=8, eval_fraction=0.0, save_every=2)
    gates = {path: layer.adapters["default"].lora_gate.detach().clone() for path, layer in lora_layers(model)}
    assert all(type(layer.adapters["default"]) is GatedAdapter for _, layer in lora_layers(model))
    assert any(not torch.equal(g, torch.ones(1)) for g in gates.values())  # the gate trained

    written = json.loads((result.adapter / "adapter_config.json").read_text())
    assert written["lorakit_variant"] == "gated" and written["use_dora"] is False
    tensors = load_file(result.adapter / "adapter_model.safetensors")
    assert sum(key.endswith(".lora_gate") for key in tensors) == len(gates)

    ids = token_batch(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    fresh = lorakit.load_model(str(tiny_lm_dir)).eval()
    lorakit.load_adapter(fresh, result.adapter)
    for path, layer in lora_layers(fresh):
        assert type(layer.adapters["default"]) is GatedAdapter
        torch.testing.assert_close(layer.adapters["default"].lora_gate.detach(), gates[path], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained, rtol=0, atol=0)
        lorakit.merge(fresh)
        merged = fresh(ids).logits
        lorakit.unmerge(fresh)
        unmerged = fresh(ids).logits
        with lorakit.disabled(fresh):
            base = fresh(ids).logits
    assert not torch.allclose(trained, base, atol=1e-4)  # the adapter changes the output ...
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)  # ... and merged computes the same
    torch.testing.assert_close(unmerged, trained, rtol=1e-5, atol=1e-5)

    merged_dict = lorakit.merged_state_dict(lorakit.load_model(str(tiny_lm_dir)).state_dict(),
                                            lorakit.read_adapter(result.adapter))
    for path, layer in lora_layers(fresh):
        expected = layer.weight.detach().float() + gates[path].float() * layer.delta_weight("default")
        torch.testing.assert_close(merged_dict[f"{path}.weight"].float(), expected, rtol=1e-6, atol=1e-6)


def test_what_a_variant_does_not_support_is_refused_by_what_it_declares(gated, tiny_lm_dir, tmp_path):
    model = lorakit.load_model(str(tiny_lm_dir))
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, variant="gated"))
    value = lorakit.export_adapter(model)
    with pytest.raises(lorakit.CombineError, match="GATED adapter"):
        lorakit.combine([value, value])
    with pytest.raises(lorakit.ConfigError, match="--shard fsdp with variant gated is not supported"):
        lorakit.TrainConfig(model=str(tiny_lm_dir), variant="gated", shard="fsdp")


def test_an_unregistered_variant_is_refused():
    with pytest.raises(lorakit.ConfigError, match="variant must be one of"):
        lorakit.LoraConfig(rank=2, alpha=4, variant="gated")
    with pytest.raises(TypeError, match="subclass of lorakit.variants.Kind"):
        variants.register("bad", nn.Linear)

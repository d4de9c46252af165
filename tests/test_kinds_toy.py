"""A kind of adapter with its own factors, defined in this file alone plus ``register``: a
rank-r update written as three factors, ΔW = s · U M V. It declares its tensors and its ΔW
and nothing else, so it trains (its ΔW formed in each forward), saves to PEFT-style files,
loads with the same logits, merges, and is refused by name by everything that needs a
capability it does not declare (serving, combining, FSDP, kohya and diffusers files)."""

import json
import math

import pytest
import torch
from conftest import token_batch
from safetensors.torch import load_file
from test_training_loop import run
from torch import Tensor, nn

import lorakit
from lorakit.adapter import LayerWeights
from lorakit.attach import lora_layers
from lorakit.variants import Kind, register, unregister


class TripleAdapter(Kind):
    """ΔW = s · U M V, U (out, r), M (r, r), V (r, in): U starts at zero, so nothing changes."""

    @classmethod
    def tensor_shapes(cls, layer_class, base, rank):
        in_features, out_features = layer_class.dims(base)
        return {"triple_u": (out_features, rank), "triple_m": (rank, rank), "triple_v": (rank, in_features)}

    @classmethod
    def names(cls):
        return ("triple_u", "triple_m", "triple_v")

    @classmethod
    def delta_of(cls, value: LayerWeights) -> Tensor:
        t = {name: tensor.float() for name, tensor in value.tensors.items()}
        matrix = value.scaling * t["triple_u"] @ t["triple_m"] @ t["triple_v"]  # (out, r) (r, r) (r, in)
        return value.layout.weight(matrix)

    @classmethod
    def rank_of(cls, value: LayerWeights) -> int:
        return value.tensors["triple_m"].shape[0]

    def initialise(self, layer):
        nn.init.eye_(self.triple_m)
        nn.init.kaiming_uniform_(self.triple_v, a=math.sqrt(5))


@pytest.fixture
def triple():
    register("triple", TripleAdapter, "triple-factor LoRA")
    yield
    unregister("triple")


def test_the_toy_kind_trains_saves_loads_and_merges(triple, tiny_lm_dir, tmp_path):
    model, result = run(tiny_lm_dir, tmp_path, variant="triple", rank=4, alpha=8, lr=1e-2, max_steps=4,
                        batch_size=8, eval_fraction=0.0, save_every=2)
    layers = dict(lora_layers(model))
    assert layers and all(type(layer.adapters["default"]) is TripleAdapter for layer in layers.values())
    assert all(layer.adapters["default"].triple_u.abs().sum() > 0 for layer in layers.values())  # it trained

    written = json.loads((result.adapter / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["lorakit_variant"] == "triple"
    keys = load_file(result.adapter / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[1] for key in keys} == {"triple_u", "triple_m", "triple_v"}
    assert len(keys) == 3 * len(layers)

    ids = token_batch(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    fresh = lorakit.load_model(str(tiny_lm_dir)).eval()
    base = {k: v.clone() for k, v in fresh.state_dict().items()}
    lorakit.load_adapter(fresh, result.adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained, rtol=0, atol=0)
        lorakit.merge(fresh)
        merged = fresh(ids).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)
    # the merged weights equal W + s·U·M·V written out, and merging a state dict gives the same
    value = lorakit.read_adapter(result.adapter)
    state = lorakit.merged_state_dict(base, value)
    for path, layer in layers.items():
        t = {name: p.detach() for name, p in layer.adapters["default"].named_parameters()}
        scaling = layer.adapters["default"].scaling
        expected = base[f"{path}.weight"] + scaling * t["triple_u"] @ t["triple_m"] @ t["triple_v"]
        torch.testing.assert_close(state[f"{path}.weight"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fresh.get_submodule(path).weight.detach(), state[f"{path}.weight"], rtol=0, atol=0)


def test_the_toy_kind_is_refused_where_it_declares_no_capability(triple, tiny_lm_dir, tmp_path):
    from lorakit.combine import CombineError
    from lorakit.formats import AdapterFileError, diffusers, kohya
    from lorakit.serve.slots import enable_slots
    from lorakit.serve.store import AdapterStore, StoreError
    from lorakit.training.config import TrainConfig

    model = lorakit.load_model(str(tiny_lm_dir))
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, variant="triple", targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapters" / "toy")
    value = lorakit.export_adapter(model)

    with pytest.raises(CombineError, match="TRIPLE adapter"):
        lorakit.combine([value, value])
    with pytest.raises(AdapterFileError, match="no variant triple"):
        kohya.file_bytes({"unet": value})
    with pytest.raises(AdapterFileError, match="which a variant triple adapter does not have"):
        diffusers.file_bytes({"unet": value})
    with pytest.raises(lorakit.ConfigError, match="--shard fsdp with variant triple is not supported"):
        TrainConfig(model=str(tiny_lm_dir), variant="triple", shard="fsdp")
    served = lorakit.load_model(str(tiny_lm_dir))
    enable_slots(served, 2)
    with pytest.raises(StoreError, match="is a triple-factor LoRA adapter"):
        AdapterStore(served, tmp_path / "adapters", 2).prepare("toy", tmp_path / "adapters" / "toy")
    # it needs a layer that can apply a dense update: an embedding is refused by name, before anything changes
    with pytest.raises(lorakit.AttachError, match="embed_tokens: variant triple: not supported on Embedding"):
        lorakit.attach(lorakit.load_model(str(tiny_lm_dir)),
                       lorakit.LoraConfig(rank=2, alpha=4, variant="triple", targets=["embed_tokens"]))

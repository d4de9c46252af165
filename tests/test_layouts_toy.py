"""A layout defined in this file alone plus ``register_layout`` / ``register_layer``: a module
whose weight is a stack of heads, W (H, o, in), y = concat_h(x W_hᵀ) + b. Plain LoRA on it
is A (r, in) shared and B (H, o, r), ΔW_h = s · B_h A. It trains, saves to PEFT-style files,
loads with the same outputs, merges (in the model and in a state dict), and is refused by
name where it declares no capability (serving, kohya files, DoRA)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

import lorakit
from lorakit.attach import register_layer, unregister_layer
from lorakit.layers import LoraLayer
from lorakit.layouts import Layout, register_layout, unregister_layout


class HeadwiseLinear(nn.Module):
    """y = concat over heads h of x W_hᵀ, plus b; W (heads, per_head, in)."""

    def __init__(self, in_features: int, heads: int, per_head: int) -> None:
        super().__init__()
        self.in_features, self.heads, self.per_head = in_features, heads, per_head
        self.weight = nn.Parameter(torch.randn(heads, per_head, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.randn(heads * per_head) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...i,hoi->...ho", x, self.weight).flatten(-2) + self.bias


class Heads(Layout):
    """W (H, o, in); A (r, in), B (H, o, r): ΔW_h = B_h A."""

    name = "heads"

    def product(self, A: Tensor, B: Tensor) -> Tensor:
        return torch.einsum("hor,ri->hoi", B, A)

    def matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(-1, weight.shape[-1])

    def up_rank(self, B: Tensor) -> int:
        return B.shape[2]

    def update_shape(self, A: Tensor, B: Tensor) -> tuple[int, ...]:
        return (B.shape[0], B.shape[1], A.shape[1])

    def matches_peft(self, names, tensors, fan_in_fan_out) -> bool:
        return "lora_B" in tensors and tensors["lora_B"].dim() == 3


class LoraHeadwise(LoraLayer):
    layout = Heads()

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.heads * base.per_head

    @staticmethod
    def shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, base.in_features), (base.heads, base.per_head, rank)

    def base_forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...i,hoi->...ho", x, self.weight).flatten(-2) + self.bias

    def down(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        return F.linear(dropout(x.to(A.dtype)), A)  # (..., in) -> (..., r)

    def up(self, hidden: Tensor, B: Tensor, scaling: float) -> Tensor:
        return torch.einsum("...r,hor->...ho", hidden * scaling, B).flatten(-2)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = HeadwiseLinear(12, 3, 4)
        self.out = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.heads(x)))


@pytest.fixture
def heads():
    register_layout(LoraHeadwise.layout)
    register_layer(HeadwiseLinear, LoraHeadwise)
    yield
    unregister_layer(HeadwiseLinear)
    unregister_layout("heads")


def test_the_toy_layout_trains_saves_loads_and_merges(heads, tmp_path):
    model = Toy()
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=["heads", "out"]))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 12, generator=generator), torch.randn(64, 5, generator=generator)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    adapter = model.heads.adapters["default"]
    assert tuple(adapter.lora_B.shape) == (3, 4, 2) and adapter.lora_B.abs().sum() > 0

    lorakit.save_adapter(model, tmp_path / "toy")
    keys = load_file(tmp_path / "toy" / "adapter_model.safetensors")
    assert tuple(keys["base_model.model.heads.lora_B.weight"].shape) == (3, 4, 2)
    assert json.loads((tmp_path / "toy" / "adapter_config.json").read_text())["target_modules"] == ["heads", "out"]
    with torch.no_grad():
        expected = model(x)
    fresh = Toy()
    base = {k: v.clone() for k, v in fresh.state_dict().items()}
    lorakit.load_adapter(fresh, tmp_path / "toy")
    assert fresh.heads.layout is LoraHeadwise.layout
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
        lorakit.merge(fresh)
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    dense = base["heads.weight"] + adapter.scaling * torch.einsum("hor,ri->hoi", adapter.lora_B, adapter.lora_A)
    torch.testing.assert_close(fresh.heads.weight.detach(), dense.detach(), rtol=0, atol=1e-6)
    value = lorakit.read_adapter(tmp_path / "toy")  # no model: the layout is told by the factors
    assert value.layers["heads"].layout is LoraHeadwise.layout
    state = lorakit.merged_state_dict(base, value)
    torch.testing.assert_close(state["heads.weight"], fresh.heads.weight.detach(), rtol=0, atol=0)


def test_the_toy_layout_is_refused_where_it_declares_no_capability(heads, tmp_path):
    from lorakit.formats import AdapterFileError, kohya

    model = Toy()
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=["heads"]))
    with pytest.raises(AdapterFileError, match="heads: a heads layer has no kohya form"):
        kohya.file_bytes({"unet": lorakit.export_adapter(model)})
    with pytest.raises(lorakit.AttachError, match="heads: variant dora: DoRA is not supported on HeadwiseLinear"):
        lorakit.attach(Toy(), lorakit.LoraConfig(rank=2, alpha=4, variant="dora", targets=["heads"]))
    lorakit.save_adapter(model, tmp_path / "adapters" / "toy")
    from lorakit.serve.slots import enable_slots
    from lorakit.serve.store import AdapterStore, StoreError

    served = Toy()
    enable_slots(served, 2)
    with pytest.raises(StoreError, match="heads: a heads layer is not served"):
        AdapterStore(served, tmp_path / "adapters", 2).prepare("toy", tmp_path / "adapters" / "toy")

"""LoRA layers against dense math, for every supported base type."""

import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit

from conftest import assert_close_as_sums

KINDS = ["linear", "conv1d", "embedding", "conv2d"]


def single(kind: str, dtype: torch.dtype = torch.float32):
    """A one-module model named "layer" and an input batch for it."""
    torch.manual_seed(0)
    module = {
        "linear": lambda: nn.Linear(16, 12),
        "conv1d": lambda: Conv1D(12, 16),
        "embedding": lambda: nn.Embedding(20, 12, padding_idx=0),
        "conv2d": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    }[kind]()
    inputs = {
        "linear": lambda: torch.randn(3, 5, 16),
        "conv1d": lambda: torch.randn(3, 5, 16),
        "embedding": lambda: torch.randint(0, 20, (3, 5)),
        "conv2d": lambda: torch.randn(2, 4, 9, 9),
    }[kind]()
    model = nn.Sequential(OrderedDict(layer=module)).to(dtype)
    return model, (inputs.to(dtype) if inputs.is_floating_point() else inputs)


def set_random(model, name="default", seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.layer.adapters[name].parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def dense_reference(kind, W, b, A, B, scaling, x):
    """base(x) + scaling * B A x written out for each base type, independently of lorakit."""
    if kind == "linear":
        return x @ W.T + b + scaling * (x @ A.T @ B.T)
    if kind == "conv1d":
        return x @ W + b + scaling * (x @ A.T @ B.T)
    if kind == "embedding":
        return W[x] + scaling * (A.T[x] @ B.T)
    hidden = F.conv2d(x, A, stride=2, padding=1)
    return F.conv2d(x, W, b, stride=2, padding=1) + scaling * F.conv2d(hidden, B)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_exactly_the_base(kind):
    model, x = single(kind)
    base = model(x)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_dense_math(kind, use_rslora):
    model, x = single(kind)
    W = model.layer.weight.detach().clone()
    b = model.layer.bias.detach().clone() if getattr(model.layer, "bias", None) is not None else 0
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=5, targets=["layer"], use_rslora=use_rslora))
    set_random(model)
    adapter = model.layer.adapters["default"]
    scaling = 5 / math.sqrt(3) if use_rslora else 5 / 3
    assert adapter.scaling == pytest.approx(scaling)
    expected = dense_reference(kind, W, b, adapter.lora_A.detach(), adapter.lora_B.detach(), scaling, x)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_init():
    model = nn.Sequential(OrderedDict(layer=nn.Linear(512, 512)))
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets=["layer"], init="gaussian"))
    adapter = model.layer.adapters["default"]
    assert adapter.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(adapter.lora_B) == 0


def test_only_adapter_parameters_get_gradients():
    model, x = single("linear")
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    set_random(model)
    model(x).sum().backward()
    assert model.layer.weight.grad is None and model.layer.bias.grad is None
    assert model.layer.adapters["default"].lora_A.grad is not None
    assert model.layer.adapters["default"].lora_B.grad is not None


def test_dropout_applies_in_training_only():
    model, x = single("linear")
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"], dropout=0.5))
    set_random(model)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    first = model(x)
    assert not torch.equal(first, model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_torch_save_and_dtype_cast_keep_adapters(kind):
    model, x = single(kind)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    set_random(model)
    expected = model(x)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
    assert copied.layer.weight.data_ptr() != model.layer.weight.data_ptr()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    doubled = copy.deepcopy(model).to(torch.float64)
    assert doubled.layer.adapters["default"].lora_A.dtype == torch.float64
    x64 = x.double() if x.is_floating_point() else x
    torch.testing.assert_close(doubled(x64).float(), expected, rtol=1e-5, atol=1e-5)
    # detach after deepcopy rebuilds the copy's own module around the copy's weight
    plain = lorakit.detach(copied)
    assert plain.layer.weight.data_ptr() != model.layer.weight.data_ptr()


def test_half_precision_base_keeps_no_float32_copy_of_the_input_and_the_same_gradients():
    """A bf16 base with float32 adapters: the adapter's input is saved once, in bf16, and
    the gradients equal those of the plain float32 cast."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(layer=nn.Linear(64, 48))).to(torch.bfloat16)
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    set_random(model)
    adapter = model.layer.adapters["default"]
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    y.float().square().sum().backward()
    ours = (x.grad.clone(), adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone())
    for p in (x, adapter.lora_A, adapter.lora_B):
        p.grad = None
    W, b = model.layer.weight, model.layer.bias
    hidden = F.linear(x.float(), adapter.lora_A) * adapter.scaling  # the plain form
    reference = (F.linear(x, W, b) + F.linear(hidden, adapter.lora_B).to(torch.bfloat16))
    reference.float().square().sum().backward()
    for got, expected in zip(ours, (x.grad, adapter.lora_A.grad, adapter.lora_B.grad)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_computes_in_its_own_module_call(kind):
    """The variant seam: a layer's forward calls each active adapter module (what FSDP's
    per-module hooks rely on), and the merged-but-inactive path calls it too."""
    model, x = single(kind)
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=["layer"]))
    layer = model.layer
    calls = []
    layer.adapters["default"].register_forward_hook(lambda module, args, output: calls.append(args[-1]))
    model(x)
    assert len(calls) == 1
    layer.merge("default")
    with lorakit.disabled(model):
        model(x)
    assert len(calls) == 2 and calls[-1] == -1.0  # subtracted on the fly, by the adapter itself


def test_every_config_init_has_an_initializer():
    """Each init draws its own start (a fresh plain adapter is zero-B; PiSSA/OLoRA are not)."""
    from lorakit.config import INITS
    from lorakit.variants import PrincipalAdapter, adapter_class

    for init in INITS:
        model, x = single("linear")
        with torch.no_grad():
            before = model(x)
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=["layer"], init=init))
        adapter = model.layer.adapters["default"]
        assert type(adapter) is adapter_class(lorakit.LoraConfig(rank=2, alpha=4, init=init))
        assert (type(adapter) is PrincipalAdapter) == (init in ("pissa", "olora"))
        assert bool(adapter.lora_B.abs().max() > 0) == (init in ("pissa", "olora"))
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_sole_adapter_writes_its_update_first_with_the_same_values_and_gradients(kind):
    """One plain adapter alone: its update and the bias are written first and the base
    product accumulates onto them; values and gradients are those of the dense form, and
    the general path (taken with a second adapter active whose B is zero) agrees."""
    model, x = single(kind)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    set_random(model)
    layer, adapter = model.layer, model.layer.adapters["default"]
    assert layer.sole_plain_adapter(x) is adapter
    x.requires_grad_(True)
    sole = model(x)
    sole.square().sum().backward()
    grads = (x.grad.clone(), adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone())
    W = layer.weight.detach()
    expected = dense_reference(kind, W, layer.bias.detach(), adapter.lora_A.detach(), adapter.lora_B.detach(),
                               adapter.scaling, x.detach())
    torch.testing.assert_close(sole, expected, rtol=1e-5, atol=1e-5)

    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=2, targets=["layer"]), name="zero")
    lorakit.set_active(model, ["default", "zero"])
    assert layer.sole_plain_adapter(x) is None
    for p in (x, adapter.lora_A, adapter.lora_B):
        p.grad = None
    general = model(x)
    general.square().sum().backward()
    # The same products, accumulated in another order (one GEMM onto the update, or two
    # passes); no element sums more than x.numel() terms.
    assert_close_as_sums(general, sole, x.numel())
    for got, want in zip(grads, (x.grad, adapter.lora_A.grad, adapter.lora_B.grad)):
        assert_close_as_sums(got, want, x.numel())


def test_the_update_first_path_is_left_where_the_base_must_come_first():
    model, x = single("linear")
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"]))
    layer = model.layer
    assert layer.sole_plain_adapter(x) is not None
    assert layer.sole_plain_adapter(x.to(torch.bfloat16)) is None  # another dtype: cast and added
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.sole_plain_adapter(x) is None
    with lorakit.disabled(model):
        assert layer.sole_plain_adapter(x) is None
    layer.merge("default")
    assert layer.sole_plain_adapter(x) is None
    dora, _ = single("linear")
    lorakit.attach(dora, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"], variant="dora"))
    assert dora.layer.sole_plain_adapter(x) is None  # DoRA rescales the base output

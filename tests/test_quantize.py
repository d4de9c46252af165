"""Quantized frozen bases (quantize.py): keys, sizes, training, merging and bad input."""

import copy

import pytest
import torch
from conftest import assert_close_as_sums, assert_unchanged, randomize_adapters, snapshot, tiny_llama, token_batch
from torch import nn

import lorakit
from lorakit import frozen
from lorakit.attach import lora_layers
from lorakit.quantize import QuantizeError, dequantize_model, quantize_model, quantized_bytes
from lorakit.training.text import checkpoint_activations

METHODS = ["nf4", "int8"]


@pytest.mark.parametrize("method", METHODS)
def test_linear_weights_are_quantized_under_unchanged_keys(method):
    base = tiny_llama()
    model = quantize_model(copy.deepcopy(base), method)
    assert list(model.state_dict()) == list(base.state_dict())
    kinds = {path: frozen.quantization(m.weight) for path, m in model.named_modules() if hasattr(m, "weight")}
    assert kinds["lm_head"] is None and kinds["model.embed_tokens"] is None and kinds["model.norm"] is None
    linear = [p for p, m in base.named_modules() if isinstance(m, nn.Linear) and p != "lm_head"]
    assert linear and all(kinds[p] == method for p in linear)
    assert all(not p.requires_grad for p in model.parameters())


def test_nf4_weights_take_under_0_3_of_their_bf16_bytes():
    stored, dense = quantized_bytes(quantize_model(tiny_llama(), "nf4"))
    assert 0.25 < stored / dense <= 0.30
    stored, dense = quantized_bytes(quantize_model(tiny_llama(), "int8"))
    assert 0.5 < stored / dense <= 0.6  # int8: one byte per weight, plus per-row scales


@pytest.mark.parametrize("method", METHODS)
def test_adapter_on_a_quantized_base_matches_the_dequantized_dense_model(method):
    """The quantized model with an adapter computes what a bf16 model holding the
    dequantized weights computes with the same adapter, to within bf16 rounding."""
    model = quantize_model(tiny_llama(), method)
    # built again rather than deep-copied: torchao's NF4 clone re-quantizes with its
    # default block sizes, which these small weights do not divide into
    reference = dequantize_model(quantize_model(tiny_llama(), method), torch.bfloat16)
    ids = token_batch(97)
    with torch.no_grad():
        fresh_base = model(ids).logits
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    lorakit.attach(reference, lorakit.LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh_base)  # B = 0: exactly the quantized base
    randomize_adapters(model)
    randomize_adapters(reference)
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), reference(ids).logits.float()
        moved = (ours - fresh_base.float()).abs().max()
    assert moved > 0.05  # the adapter changes the output ...
    torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02)  # ... as the dense model does


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_the_adapter_and_training_lowers_the_loss(method):
    model = quantize_model(tiny_llama(), method).train()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    ids = token_batch(97, shape=(4, 12))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        with_grad = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {"lora_A", "lora_B"}
        assert all(p.dtype == torch.float32 for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_gradient_checkpointing_gives_the_same_gradients_on_a_quantized_base():
    ids = token_batch(97, shape=(2, 10))
    grads = []
    for checkpointing in (False, True):
        model = quantize_model(tiny_llama(), "nf4").train()
        lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
        randomize_adapters(model)
        if checkpointing:
            checkpoint_activations(model)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close_as_sums(grads[1][name], grads[0][name], ids.numel(), msg=name)  # sums over the tokens


def test_in_memory_merge_requantizes_and_unmerge_restores_within_one_step():
    model = quantize_model(tiny_llama(), "int8")
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(model, scale=0.1)
    ids = token_batch(97)
    before = {p: frozen.dense(layer.weight) for p, layer in lora_layers(model)}
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        lorakit.merge(model)
        assert all(frozen.quantization(layer.weight) == "int8" for _, layer in lora_layers(model))
        merged_step = {p: frozen.dense(layer.weight).abs().amax(dim=1, keepdim=True) / 127
                       for p, layer in lora_layers(model)}
        merged = model(ids).logits.float()
        lorakit.merge(model)  # idempotent
        torch.testing.assert_close(model(ids).logits.float(), merged, rtol=0, atol=0)
        lorakit.unmerge(model)
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)
    for path, layer in lora_layers(model):
        # two roundings to the int8 grid: of W + delta (its step) and of the result (W's step),
        # half a step each, plus bf16 rounding of the values that were quantized
        step = before[path].abs().amax(dim=1, keepdim=True) / 127
        bound = 0.5 * merged_step[path] + 0.5 * step + 2 ** -8 * (before[path].abs() + merged_step[path] * 127)
        assert ((frozen.dense(layer.weight) - before[path]).abs() <= bound).all(), path


def test_adapters_trained_on_a_quantized_base_are_ordinary_files(tmp_path):
    model = quantize_model(tiny_llama(), "nf4")
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    dense = tiny_llama()
    plain = copy.deepcopy(dense)
    lorakit.attach(plain, lorakit.LoraConfig(rank=4, alpha=8))
    lorakit.save_adapter(plain, tmp_path / "plain")
    from safetensors.torch import load_file

    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "plain"))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == torch.float32 and ours[k].shape == theirs[k].shape for k in ours)
    lorakit.load_adapter(dense, tmp_path / "adapter")  # and it loads onto the unquantized base
    for path, layer in lora_layers(model):
        assert torch.equal(dict(lora_layers(dense))[path].adapters["default"].lora_B, layer.adapters["default"].lora_B)


def test_bad_input_is_refused_before_anything_changes():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(QuantizeError, match="unknown quantization 'nf3'.*nf4, int8"):
        quantize_model(model, "nf3")
    assert_unchanged(model, before)
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    before = snapshot(model)
    with pytest.raises(QuantizeError, match="q_proj: has LoRA adapters; quantize the base before attaching"):
        quantize_model(model, "nf4")
    assert_unchanged(model, before)
    conv = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(3, 4, 3))
    before = snapshot(conv)
    with pytest.raises(QuantizeError, match="1: Conv2d cannot be quantized"):
        quantize_model(conv, "nf4")
    assert_unchanged(conv, before)
    quantized = quantize_model(tiny_llama(), "nf4")
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_model(quantized, "int8")
    with pytest.raises(ValueError, match="no weights to quantize"):
        lorakit.load_model("llama-2-7b", quantize="nf4")
    with pytest.raises(QuantizeError, match="unknown quantization 'fp4'"):
        lorakit.load_model("smollm2-135m", quantize="fp4")  # before the model loads


def test_smollm2_nf4_weights_counted_on_the_real_tensors():
    """SmolLM2-135M's shapes (random weights: the byte count does not depend on values):
    every quantized linear weight with its scales, against the same weights in bf16, and
    the planner's weight bytes against the whole quantized model's."""
    from transformers import AutoModelForCausalLM

    from lorakit.plan import plan
    from lorakit.pretrained import load_config

    model = AutoModelForCausalLM.from_config(load_config("smollm2-135m"), dtype=torch.bfloat16)
    quantize_model(model, "nf4")
    stored, dense = quantized_bytes(model)
    assert dense == 2 * 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # every projection of 30 blocks
    assert stored / dense <= 0.30
    whole = sum(frozen.nbytes(p) for p in model.parameters())
    assert abs(plan("smollm2-135m", "qlora").weights_bytes / whole - 1) < 0.005


def test_serving_a_quantized_base_adds_adapters_as_the_lora_layers_do(tiny_lm_dir, tmp_path):
    """The serving slots and LoraLinear share the quantized base computation (frozen.linear):
    a mixed batch equals each row run alone on an attached copy."""
    from lorakit.serve.engine import build_engine
    from lorakit.serve.slots import mixed_forward

    trained = lorakit.load_model(str(tiny_lm_dir), quantize="nf4")
    lorakit.attach(trained, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(trained, scale=0.2)
    lorakit.save_adapter(trained, tmp_path / "a")
    engine = build_engine(str(tiny_lm_dir), max_adapters=2, quantize="nf4")
    assert all(frozen.quantization(m.weight) == "nf4" for m in engine.model.modules()
               if type(m).__name__ == "SlotLinear")
    engine.store.add_directory("a", tmp_path / "a")
    lease = engine.store.lease("a")
    try:
        ids = token_batch(50, shape=(2, 6))
        with torch.no_grad():
            mixed = mixed_forward(engine.model, ids, [lease.slot, -1])
            alone = trained(ids[:1]).logits
            with lorakit.disabled(trained):
                base = trained(ids).logits
    finally:
        lease.release()
    torch.testing.assert_close(mixed[1:], base[1:], rtol=0, atol=0)
    torch.testing.assert_close(mixed[:1].float(), alone.float(), rtol=0.02, atol=0.02)
    assert (alone.float() - base[:1].float()).abs().max() > 0.05  # and the adapter does change the row


def test_merge_into_a_quantized_base_writes_a_dense_model(tiny_lm_dir, tmp_path):
    from typer.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from lorakit.cli import app

    model = lorakit.load_model(str(tiny_lm_dir), quantize="nf4")
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(tiny_lm_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"),
                                 "--quantize", "nf4", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ids = token_batch(50, shape=(1, 6))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits.float(), rtol=0.02, atol=0.02)
    result = runner.invoke(app, ["merge", str(tiny_lm_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "q"),
                                 "--dtype", "nf4"])
    assert result.exit_code == 2 and "written dense" in " ".join(result.output.split())
    result = runner.invoke(app, ["merge", str(tiny_lm_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "q"),
                                 "--quantize", "nf2"])
    assert result.exit_code == 2 and "unknown quantization 'nf2'" in result.output
    assert not (tmp_path / "q").exists()


def test_generate_and_train_take_quantize_and_refuse_unknown_values(tiny_lm_dir):
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.config import ConfigError
    from lorakit.training.config import TrainConfig

    runner = CliRunner()
    args = ["generate", str(tiny_lm_dir), "--prompt", "hej", "--max-tokens", "3", "--no-chat"]
    result = runner.invoke(app, [*args, "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "--quantize", "nf9"])
    assert result.exit_code == 2 and "unknown quantization 'nf9'; choose one of nf4, int8" in result.output
    with pytest.raises(ConfigError, match="quantize must be one of"):
        TrainConfig(quantize="fp8")

"""PiSSA and OLoRA (variants/principal.py): unchanged output at init, the papers' factors, and files
that load in PEFT on the original base."""

import json

import pytest
import torch
from conftest import MODELS, snapshot, assert_unchanged, token_batch
from test_layers import single
from test_training_loop import run

import lorakit
from lorakit.layouts import LINEAR
from lorakit.attach import AttachError, lora_layers

VOCAB = {"llama": 97, "qwen2": 101, "gpt2": 89}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_output_at_init_equals_the_base(kind, init):
    model = MODELS[kind]()
    ids = token_batch(VOCAB[kind])
    with torch.no_grad():
        before = model(ids).logits
        lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, init=init))
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        assert any(float(layer.adapters["default"].lora_B.abs().max()) > 0 for _, layer in lora_layers(model))


def test_pissa_takes_the_top_singular_part_and_olora_the_qr_part():
    for init in ("pissa", "olora"):
        model, _ = single("linear")
        W = model.layer.weight.detach().clone()
        lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"], init=init))
        layer, adapter = model.layer, model.layer.adapters["default"]
        taken = adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W.double())
            torch.testing.assert_close(taken.double(), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=1e-5, atol=1e-5)
        else:
            Q, R = torch.linalg.qr(W)
            torch.testing.assert_close(adapter.lora_B.detach(), Q[:, :3])
            torch.testing.assert_close(adapter.lora_A.detach(), R[:3])
        torch.testing.assert_close(layer.weight.detach(), W - taken, rtol=1e-5, atol=1e-6)  # W_res


def test_inactive_disabled_deleted_and_detached_adapters_give_back_the_original_base():
    model, x = single("conv1d")
    W = model.layer.weight.detach().clone()
    with torch.no_grad():
        base = model(x)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"], init="pissa"))
    with torch.no_grad():
        model.layer.adapters["default"].lora_B.mul_(1.5)  # as training would move it
        adapted = model(x)
        assert not torch.allclose(adapted, base, atol=1e-3)
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)
        lorakit.merge(model)
        with lorakit.disabled(model):  # merged and disabled: W_res + s·B·A - s·B·A + s·B₀A₀
            torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(model)
    lorakit.delete_adapter(model, "default")
    torch.testing.assert_close(model.layer.weight.detach(), W, rtol=1e-5, atol=1e-6)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=6, targets=["layer"], init="olora"))
    lorakit.detach(model, merge=False)
    torch.testing.assert_close(model.layer.weight.detach(), W, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_converts_to_a_plain_lora_that_peft_loads_on_the_original_base(tiny_lm_dir, tmp_path, init):
    peft = pytest.importorskip("peft")
    model, result = run(tiny_lm_dir, tmp_path, init=init, rank=4, alpha=8, lr=3e-3, max_steps=4, batch_size=8,
                        eval_fraction=0, save_every=4)
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r, an ordinary LoRA adapter
    ids = token_batch(len(lorakit.load_tokenizer(str(tiny_lm_dir))))
    with torch.no_grad():
        trained = model.eval()(ids).logits
    theirs = peft.PeftModel.from_pretrained(lorakit.load_model(str(tiny_lm_dir)), result.adapter).eval()
    ours = lorakit.load_model(str(tiny_lm_dir))
    lorakit.load_adapter(ours, result.adapter)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, trained, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.eval()(ids).logits, trained, rtol=1e-4, atol=1e-4)
    # the residual form (as checkpoints hold it) reloads by running the same init again
    lorakit.save_adapter(model, tmp_path / "residual", residual=True)
    again = lorakit.load_model(str(tiny_lm_dir))
    lorakit.load_adapter(again, tmp_path / "residual")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_pissa_and_olora_need_a_linear_weight_and_change_nothing_otherwise():
    model, _ = single("embedding")
    before = snapshot(model)
    with pytest.raises(AttachError, match="needs a Linear or GPT-2 Conv1D weight"):
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=2, targets=["layer"], init="pissa"))
    assert_unchanged(model, before)
    model, _ = single("linear")
    W = LINEAR.matrix(model.layer.weight.detach().clone())
    with pytest.raises(lorakit.ConfigError, match="with DoRA is not supported"):
        lorakit.LoraConfig(rank=2, alpha=2, init="olora", variant="dora")
    torch.testing.assert_close(model.layer.weight.detach(), W)

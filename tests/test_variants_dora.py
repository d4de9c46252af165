"""DoRA (dora.py) against the paper's dense formula, against PEFT, and through merge."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_gpt2, tiny_llama, token_batch
from test_layers import single

import lorakit
from lorakit.attach import lora_layers
from lorakit.variants.dora import DoraAdapter
from lorakit.files import AdapterFileError, export_adapter

DORA = dict(variant="dora")


def dora_model(kind: str, scale: float = 0.3):
    """A one-module model with a DoRA adapter whose A, B and m are all non-trivial."""
    model, x = single(kind)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=5, targets=["layer"], **DORA))
    randomize_adapters(model, scale=scale)
    with torch.no_grad():
        m = model.layer.adapters["default"].lora_magnitude_vector
        m.mul_(1 + 0.2 * torch.randn(m.shape, generator=torch.Generator().manual_seed(5)))
    return model, x


def dense_weight(layer, A, B, m):
    """The paper's W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ per output unit, with the norm detached."""
    W = layer.weight.detach()
    if layer.layout == "conv2d":
        updated = W + layer.adapters["default"].scaling * (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
        norm = updated.flatten(1).norm(dim=1).detach()
        return m.reshape(-1, 1, 1, 1) / norm.reshape(-1, 1, 1, 1) * updated
    update = layer.adapters["default"].scaling * (B @ A)  # (out, in)
    if layer.layout in ("conv1d", "embedding"):  # W is (in, out): (vocabulary, dim) for an embedding
        updated = W + update.T
        return updated * (m / updated.norm(dim=0).detach()).reshape(1, -1)
    updated = W + update
    return updated * (m / updated.norm(dim=1).detach()).reshape(-1, 1)


def dense_forward(model, x, A, B, m):
    layer = model.layer
    W = dense_weight(layer, A, B, m)
    if layer.layout == "linear":
        return F.linear(x, W, layer.bias)
    if layer.layout == "conv1d":
        return x @ W + layer.bias
    if layer.layout == "embedding":
        return F.embedding(x, W, layer.base_module.padding_idx)
    return layer.base_module._conv_forward(x, W, layer.bias)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
def test_forward_and_gradients_equal_the_dense_formula(kind):
    model, x = dora_model(kind)
    if kind == "embedding":  # the padding row gets no gradient in the lookup: keep it out of the batch
        x = x.clamp(min=1)
    adapter = model.layer.adapters["default"]
    out = model(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * target).sum().backward()
    A, B, m = (p.detach().clone().requires_grad_(True) for p in
               (adapter.lora_A, adapter.lora_B, adapter.lora_magnitude_vector))
    expected = dense_forward(model, x, A, B, m.flatten())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (expected * target).sum().backward()
    for ours, theirs in ((adapter.lora_A, A), (adapter.lora_B, B), (adapter.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [("plain", "default"), ("default", "plain")])
def test_a_plain_adapter_beside_an_active_dora_adapter_leaves_it_the_base_output(order):
    """Plain LoRA adds its update into the output in place; DoRA, active beside it, still rescales
    the base output alone: the sum equals the two dense formulas added."""
    model, x = dora_model("linear")
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=3, targets=["layer"]), name="plain")
    randomize_adapters(model, "plain")
    lorakit.set_active(model, list(order))
    dora, plain = model.layer.adapters["default"], model.layer.adapters["plain"]
    with torch.no_grad():
        out = model(x)
        expected = dense_forward(model, x, dora.lora_A, dora.lora_B, dora.lora_magnitude_vector)
        expected += plain.scaling * F.linear(F.linear(x, plain.lora_A), plain.lora_B)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
def test_a_fresh_dora_adapter_changes_nothing_and_m_starts_at_the_norm(kind):
    model, x = single(kind)
    before = model(x)
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=5, targets=["layer"], **DORA))
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    layer = model.layer
    W = layer.weight.detach()
    rows = W.T if layer.layout in ("conv1d", "embedding") else W.flatten(1)
    torch.testing.assert_close(layer.adapters["default"].lora_magnitude_vector.flatten(), rows.norm(dim=1))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
def test_merged_equals_unmerged_and_unmerge_restores_w(kind):
    model, x = dora_model(kind)
    layer = model.layer
    original = layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        for _ in range(3):  # merge/unmerge cycles; merge twice = merge once
            lorakit.merge(model)
            lorakit.merge(model)
            torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
            lorakit.unmerge(model)
    # the bound tested: float32 rounding of a multiply, a divide and an add, a few ulps of W
    assert float((layer.weight - original).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(
        original.abs().max())
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_a_merged_dora_adapter_cannot_be_taken_out_on_the_fly():
    model, x = dora_model("linear")
    lorakit.merge(model)
    with pytest.raises(RuntimeError, match="unmerge it before deactivating"), lorakit.disabled(model):
        model(x)
    lorakit.unmerge(model)
    with lorakit.disabled(model):
        model(x)


def test_detach_merges_dora_into_plain_modules():
    model, x = dora_model("linear")
    with torch.no_grad():
        expected = model(x)
        lorakit.detach(model)
        assert type(model.layer) is torch.nn.Linear
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_drops_the_input_of_the_whole_dora_term():
    """With dropout in training, the rescaled base term is computed on the dropped input too (as PEFT)."""
    model, x = single("linear")
    lorakit.attach(model, lorakit.LoraConfig(rank=3, alpha=5, targets=["layer"], dropout=0.5, **DORA))
    randomize_adapters(model, scale=0.3)
    layer, adapter = model.layer, model.layer.adapters["default"]
    model.train()
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    dropped = adapter.dropout(x)
    W = layer.weight.detach()
    update = adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
    scale = adapter.lora_magnitude_vector.detach() / (W + update).norm(dim=1)
    expected = F.linear(x, W, layer.bias) + (scale - 1) * F.linear(dropped, W) + scale * F.linear(dropped, update)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _peft_round_trip(tmp_path, model, fresh, ids):
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        ours = model(ids)
    ours = getattr(ours, "logits", ours)
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    with torch.no_grad():
        got = theirs(ids)
    torch.testing.assert_close(getattr(got, "logits", got), ours, rtol=1e-5, atol=1e-5)
    # and back: PEFT's own save loads into lorakit with the same outputs
    theirs.save_pretrained(tmp_path / "theirs")
    back = fresh()
    lorakit.load_adapter(back, tmp_path / "theirs")
    with torch.no_grad():
        again = back(ids)
    torch.testing.assert_close(getattr(again, "logits", again), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build, vocab", [(tiny_llama, 97), (tiny_gpt2, 89)])
def test_dora_files_load_in_peft_and_back_with_the_same_logits(tmp_path, build, vocab):
    model = build()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, **DORA))
    randomize_adapters(model, scale=0.2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_magnitude_vector.mul_(1.1)
    _peft_round_trip(tmp_path, model.eval(), build, token_batch(vocab))


def test_conv2d_dora_files_load_in_peft_and_back(tmp_path):
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3))

    model = build()
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=3, targets=["0", "2"], **DORA))
    randomize_adapters(model, scale=0.3)
    _peft_round_trip(tmp_path, model.eval(), build, torch.randn(2, 3, 8, 8))


def test_a_peft_trained_dora_adapter_gives_peft_logits_in_lorakit(tmp_path):
    """PEFT initialises m from W itself and trains all three: its file is the oracle."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.9)
    ids = token_batch(97)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert all(isinstance(layer.adapters["default"], DoraAdapter) for _, layer in lora_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_applies_dora():
    model, x = dora_model("linear")
    base = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    merged = lorakit.merged_state_dict(base, export_adapter(model))
    plain = torch.nn.Sequential()
    plain.add_module("layer", torch.nn.Linear(16, 12))
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_unsupported_dora_is_refused_and_nothing_changes(tmp_path):
    from conftest import assert_unchanged, snapshot

    with pytest.raises(lorakit.ConfigError, match="variant must be one of"):
        lorakit.LoraConfig(rank=2, alpha=2, variant="vera")
    # a DoRA file without magnitudes, and DoRA with PEFT options lorakit cannot honour
    model, _ = dora_model("linear")
    lorakit.save_adapter(model, tmp_path / "d")
    (tmp_path / "d" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "d" / "adapter_model.safetensors").read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(tmp_path / "d" / "adapter_model.safetensors").items()
               if "magnitude" not in k}
    save_file(tensors, tmp_path / "d" / "adapter_model.safetensors")
    fresh, _ = single("linear")
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector"):
        lorakit.load_adapter(fresh, tmp_path / "d")
    assert_unchanged(fresh, before)
    with pytest.raises(lorakit.CombineError, match="DORA adapter"):
        lorakit.combine([export_adapter(model), export_adapter(model)])


def test_the_cached_norm_follows_every_change_of_w_a_and_b():
    model, x = dora_model("linear")
    adapter = model.layer.adapters["default"]
    with torch.no_grad():
        model(x)  # fills the cache
        for change in (lambda: adapter.lora_B.add_(0.1), lambda: adapter.lora_A.mul_(1.5),
                       lambda: model.layer.weight.mul_(1.1)):  # as an optimizer step or a merge would
            change()
            expected = dense_forward(model, x, adapter.lora_A, adapter.lora_B,
                                     adapter.lora_magnitude_vector.flatten())
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_lorakit_train_variant_dora_trains_magnitudes_and_writes_a_peft_dora_adapter(tiny_lm_dir, tmp_path):
    import json

    from test_training_loop import run

    peft = pytest.importorskip("peft")
    model, result = run(tiny_lm_dir, tmp_path, variant="dora", rank=4, alpha=8, lr=3e-3, max_steps=4,
                        batch_size=8, eval_fraction=0, save_every=4)
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    fresh = lorakit.load_model(str(tiny_lm_dir))
    norms = {path: layer.weight.detach().norm(dim=1) for path, layer in fresh.named_modules()
             if isinstance(layer, torch.nn.Linear) and path in dict(lora_layers(model))}
    trained = {path: layer.adapters["default"].lora_magnitude_vector.detach() for path, layer in lora_layers(model)}
    assert any(not torch.allclose(trained[p], norms[p]) for p in norms)  # m moved away from ‖W‖
    ids = token_batch(len(lorakit.load_tokenizer(str(tiny_lm_dir))))
    theirs = peft.PeftModel.from_pretrained(fresh, result.adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_peft_files_with_a_copy_of_the_base_embedding_load_when_it_matches(tmp_path):
    """PEFT's default save adds the targeted embedding's whole weight: lorakit checks it equals
    the model's and skips it; a different one (a resized vocabulary) is refused."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    from conftest import assert_unchanged, snapshot

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                              target_modules=["embed_tokens", "q_proj"],
                                                              init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in load_file(path))
    ids = token_batch(97)
    ours = tiny_llama()
    lorakit.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("base_layer.weight"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match="differs from the model's"):
        lorakit.load_adapter(fresh, tmp_path / "peft")
    assert_unchanged(fresh, before)


def test_embedding_dora_files_load_in_peft_and_back(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj"], **DORA))
    randomize_adapters(model, scale=0.2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_magnitude_vector.mul_(1.1)
    _peft_round_trip(tmp_path, model.eval(), tiny_llama, token_batch(97))


@pytest.mark.parametrize("change, message", [
    (dict(lora_bias=True), "lora_bias=True is not supported"),
    (dict(init_lora_weights="loftq"), "init must be one of"),
    (dict(use_dora=True, init_lora_weights="pissa"), "with DoRA is not supported"),
])
def test_dora_files_with_options_lorakit_cannot_honour_are_refused(tmp_path, change, message):
    import json

    from conftest import assert_unchanged, snapshot

    model, _ = dora_model("linear")
    lorakit.save_adapter(model, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**config, **change}))
    fresh, _ = single("linear")
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(fresh, tmp_path / "d")
    assert_unchanged(fresh, before)

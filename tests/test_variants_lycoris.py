"""LoHa and LoKr (variants/lycoris.py): the dense formulas, PEFT's files both ways on Llama and
on a UNet, merge, what they refuse, bad files."""

import copy
import math

import peft
import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig
from lorakit.attach import AttachError, lora_layers
from lorakit.config import TARGET_SETS
from lorakit.files import AdapterFileError
from lorakit.variants.lycoris import LokrAdapter, kronecker_split

from conftest import assert_unchanged, randomize_adapters, rewrite_weights, snapshot, tiny_llama, token_batch
from image_models import tiny_unet, unet_inputs

PEFT_CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def run_unet(model):
    with torch.no_grad():
        return model(*unet_inputs()).sample


def assert_relative(actual, expected, tolerance=1e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("dimension, split", [(256, (16, 16)), (128, (8, 16)), (127, (1, 127)), (48, (6, 8)),
                                              (12, (3, 4)), (1, (1, 1))])
def test_kronecker_split_is_the_divisor_pair_nearest_the_square_root(dimension, split):
    from peft.tuners.lokr.layer import factorization

    assert kronecker_split(dimension) == split == factorization(dimension)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_a_fresh_adapter_is_the_base_and_a_trained_one_is_its_dense_formula(variant):
    model = tiny_llama()
    x = token_batch(model.config.vocab_size)
    base = logits(model, x)
    lorakit.attach(model, LoraConfig(rank=4, alpha=6, variant=variant, targets=["q_proj", "up_proj"]))
    torch.testing.assert_close(logits(model, x), base, rtol=0, atol=0)
    randomize_adapters(model, scale=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    factors = {name: p.detach() for name, p in adapter.named_parameters()}
    if variant == "loha":  # ΔW = s (W1a W1b) ⊙ (W2a W2b)
        expected = (factors["hada_w1_a"] @ factors["hada_w1_b"]) * (factors["hada_w2_a"] @ factors["hada_w2_b"])
    else:  # ΔW = s W1 ⊗ (W2a W2b), entry by entry
        W1 = factors["lokr_w1"]
        W2 = factors["lokr_w2"] if "lokr_w2" in factors else factors["lokr_w2_a"] @ factors["lokr_w2_b"]
        b, d = W2.shape
        expected = torch.empty(layer.weight.shape)
        for i in range(W1.shape[0]):
            for j in range(W1.shape[1]):
                expected[i * b:(i + 1) * b, j * d:(j + 1) * d] = W1[i, j] * W2
    torch.testing.assert_close(layer.delta_weight("default"), 1.5 * expected, rtol=1e-6, atol=1e-7)
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(h), h @ (layer.weight + 1.5 * expected).T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_merge_is_exact_and_unmerge_restores(variant):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, variant=variant))
    randomize_adapters(model, scale=0.3)
    x = token_batch(model.config.vocab_size)
    unmerged = logits(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    lorakit.merge(model)
    lorakit.merge(model)
    assert_relative(logits(model, x), unmerged)
    lorakit.unmerge(model)
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=2 * torch.finfo(torch.float32).eps
                                       * max(value.abs().max().item(), 1.0))
    fresh = tiny_llama()  # and into a state dict, with no model
    fresh.load_state_dict(lorakit.merged_state_dict(tiny_llama().state_dict(), lorakit.export_adapter(model)))
    assert_relative(logits(fresh, x), unmerged)


@pytest.mark.parametrize("rank", [2, 8])  # LoKr: W2 a rank-2 pair, or whole (8 >= max(b, d) / 2)
@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_peft_files_both_ways_on_llama(variant, rank, tmp_path):
    ours = tiny_llama()
    lorakit.attach(ours, LoraConfig(rank=rank, alpha=3, variant=variant, rank_pattern={"v_proj": 2}))
    randomize_adapters(ours, scale=0.3)
    x = token_batch(ours.config.vocab_size)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert_relative(logits(theirs, x), logits(ours, x))

    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), PEFT_CONFIGS[variant](
        r=rank, alpha=5, target_modules="all-linear", init_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = tiny_llama()
    lorakit.load_adapter(back, tmp_path / "theirs")
    assert_relative(logits(back, x), logits(theirs, x))


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_peft_files_both_ways_on_a_unet_with_convolutions(variant, tmp_path):
    ours = tiny_unet()
    lorakit.attach(ours, LoraConfig(rank=4, alpha=8, variant=variant, targets=TARGET_SETS["attention-conv"]))
    assert any(isinstance(layer.base_module, torch.nn.Conv2d) and layer.base_module.kernel_size == (3, 3)
               for _, layer in lora_layers(ours))
    randomize_adapters(ours, scale=0.2)
    base = run_unet(tiny_unet())
    assert (run_unet(ours) - base).abs().max() > 1e-3
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path / "ours").eval()
    assert_relative(run_unet(theirs.base_model.model), run_unet(ours))

    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_unet(), PEFT_CONFIGS[variant](
        r=3, alpha=5, init_weights=False, target_modules=list(TARGET_SETS["attention-conv"])))
    theirs.save_pretrained(tmp_path / "theirs")
    back = tiny_unet()
    lorakit.load_adapter(back, tmp_path / "theirs")
    assert_relative(run_unet(back), run_unet(theirs.base_model.model))
    merged = copy.deepcopy(back)
    lorakit.merge(merged)
    assert_relative(run_unet(merged), run_unet(back))


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_training_moves_every_factor_and_the_loss(variant):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, variant=variant, targets=["q_proj", "v_proj"]))
    x = token_batch(model.config.vocab_size, shape=(4, 12))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    zero = [name for name, p in model.named_parameters() if p.requires_grad and not p.abs().sum() > 0]
    assert not zero


@pytest.mark.parametrize("config, message", [
    (LoraConfig(rank=2, alpha=4, variant="loha", targets=["embed_tokens"]), "LoHa: not supported on Embedding"),
    (LoraConfig(rank=2, alpha=4, variant="lokr", dropout=0.1, targets=["q_proj"]), "LoKr: dropout is not defined"),
])
def test_what_they_cannot_do_is_refused_and_changes_nothing(config, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AttachError, match=message):
        lorakit.attach(model, config)
    assert_unchanged(model, before)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_combine_and_serving_refuse_them_by_name(variant, tmp_path):
    from lorakit.combine import CombineError
    from lorakit.serve.slots import enable_slots
    from lorakit.serve.store import AdapterStore, StoreError

    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, variant=variant, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    with pytest.raises(CombineError, match=variant.upper()):
        lorakit.combine([lorakit.export_adapter(model)] * 2)
    served = tiny_llama()
    enable_slots(served, 2)
    with pytest.raises(StoreError, match={"loha": "LoHa", "lokr": "LoKr"}[variant]):
        AdapterStore(served, tmp_path, 2).acquire("a")


def _rewritten(tmp_path, variant, change):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, variant=variant, targets=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    rewrite_weights(tmp_path / "a", change)
    return tmp_path / "a"


def _kronecker_misfit(tensors):  # W1 (4, 4) ⊗ W2 (8, 8) is 32 x 32; a (4, 2) W1 gives 32 x 16
    key = "base_model.model.model.layers.0.self_attn.q_proj.lokr_w1"
    tensors[key] = tensors[key][:, :2].contiguous()


def _nan(tensors):
    tensors["base_model.model.model.layers.1.self_attn.q_proj.hada_w2_b"][0, 0] = float("nan")


def _missing_pair(tensors):
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lokr_w2_b"]


@pytest.mark.parametrize("variant, change, message", [
    ("lokr", _kronecker_misfit, r"layers.0.self_attn.q_proj: .*lokr_w1 has shape \(4, 2\), expected \(4, 4\)"),
    ("loha", _nan, r"q_proj.hada_w2_b has NaN"),
    ("lokr", _missing_pair, r"layers.1.self_attn.q_proj: needs lokr_w2 or both lokr_w2_a and lokr_w2_b"),
])
def test_a_bad_file_is_refused_naming_the_tensor_and_changes_nothing(tmp_path, variant, change, message):
    directory = _rewritten(tmp_path, variant, change)
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["v_proj"]), name="other")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, directory)
    assert_unchanged(model, before)


def test_lokr_factors_that_do_not_give_the_weight_are_refused_without_a_model(tmp_path):
    directory = _rewritten(tmp_path, "lokr", _kronecker_misfit)
    value = lorakit.read_adapter(directory)  # read alone, the product is (32, 16): a valid LoKr of another weight
    from lorakit.merge import merged_state_dict

    with pytest.raises(ValueError, match=r"q_proj: weight \(32, 32\), the adapter's update is \(32, 16\)"):
        merged_state_dict(tiny_llama().state_dict(), value)
    assert math.prod(value.layers["model.layers.0.self_attn.q_proj"].delta().shape) == 32 * 16


# -- kohya / LyCORIS files -------------------------------------------------------------
def _pipeline_models(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.mark.parametrize("variant, rank", [("loha", 4), ("lokr", 2), ("lokr", 8)])
def test_lycoris_kohya_files_round_trip_on_unet_and_text_encoder(variant, rank, tmp_path):
    from safetensors import safe_open

    from image_models import pipeline_outputs, tiny_pipeline
    from lorakit.pipelines import load_pipeline_adapter, save_pipeline_adapter

    ours = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(ours.unet, LoraConfig(rank=rank, alpha=3, variant=variant, targets=TARGET_SETS["attention-conv"]))
    lorakit.attach(ours.text_encoder, LoraConfig(rank=rank, alpha=5, variant=variant, targets=TARGET_SETS["attention"]))
    randomize_adapters(ours.unet, scale=0.2)
    randomize_adapters(ours.text_encoder, seed=5, scale=0.2)
    expected = pipeline_outputs(ours)
    path = save_pipeline_adapter(_pipeline_models(ours), tmp_path / "ours.safetensors", file_format="kohya")
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
    prefix = "hada_w1_a" if variant == "loha" else "lokr_w1"
    assert f"lora_unet_down_blocks_0_resnets_0_conv1.{prefix}" in keys
    assert f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{prefix}" in keys
    back = tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter(_pipeline_models(back), path)
    for component, value in pipeline_outputs(back).items():
        assert_relative(value, expected[component], 1e-6)


def _lycoris_file(path, variant):
    """A file as LyCORIS writes it, by hand: random factors and an alpha per module."""
    generator = torch.Generator().manual_seed(7)
    modules = {  # kohya name -> (weight shape (out, in, kh, kw) or (out, in), rank, alpha)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((32, 32), 3, 2.0),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((32, 32, 3, 3), 2, 8.0),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": ((32, 32), 3, 1.5),
    }
    tensors, dense = {}, {}
    for name, (shape, rank, alpha) in modules.items():
        out, columns = shape[0], math.prod(shape[1:])
        def draw(*size):
            return torch.randn(size, generator=generator) * 0.3
        if variant == "loha":
            factors = {"hada_w1_a": draw(out, rank), "hada_w1_b": draw(rank, columns),
                       "hada_w2_a": draw(out, rank), "hada_w2_b": draw(rank, columns)}
            delta = (factors["hada_w1_a"] @ factors["hada_w1_b"]) * (factors["hada_w2_a"] @ factors["hada_w2_b"])
            scale = alpha / rank
        else:
            (a, b), (c, d) = kronecker_split(out), kronecker_split(shape[1])
            kernel = shape[2:]
            if name.endswith("v_proj"):  # whole W1 and W2: LyCORIS ignores alpha, scale 1
                factors = {"lokr_w1": draw(a, c), "lokr_w2": draw(b, d, *kernel)}
                scale = 1.0
            else:
                factors = {"lokr_w1": draw(a, c), "lokr_w2_a": draw(b, rank), "lokr_w2_b": draw(rank, d * math.prod(kernel))}
                scale = alpha / rank
            delta = LokrAdapter.product(factors, 1.0)
        tensors.update({f"{name}.{n}": t for n, t in factors.items()})
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        dense[name] = (scale * delta).reshape(shape)
    save_file(tensors, path)
    return tensors, dense


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_a_lycoris_file_loads_as_its_dense_formula_and_matches_the_lycoris_package(variant, tmp_path):
    from image_models import tiny_pipeline
    from lorakit.pipelines import load_pipeline_adapter

    tensors, dense = _lycoris_file(tmp_path / "style.safetensors", variant)
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    models = _pipeline_models(pipe)
    base = {name: m.state_dict() for name, m in models.items()}
    load_pipeline_adapter(models, tmp_path / "style.safetensors")
    paths = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
             ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
             "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),
             "lora_te_text_model_encoder_layers_1_self_attn_v_proj":
             ("text_encoder", "encoder.layers.1.self_attn.v_proj")}
    for name, (component, path) in paths.items():
        layer = models[component].get_submodule(path)
        torch.testing.assert_close(layer.merged_weight("default"), base[component][f"{path}.weight"] + dense[name],
                                   rtol=0, atol=1e-6)
    # the lycoris package's own modules, built from the same file, on the UNet
    lycoris = pytest.importorskip("lycoris")
    unet = tiny_pipeline(tmp_path / "tokenizer").unet
    weights = {key.replace("lora_unet_", "lycoris_", 1): t for key, t in tensors.items() if key.startswith("lora_unet_")}
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, unet, weights_sd=weights)
    network.apply_to()
    from image_models import unet_inputs

    with torch.no_grad():
        assert_relative(pipe.unet(*unet_inputs()).sample, unet(*unet_inputs()).sample)


def test_kohya_lycoris_files_refuse_what_lorakit_does_not_build(tmp_path):
    from image_models import tiny_pipeline
    from lorakit.pipelines import load_pipeline_adapter

    tensors, _ = _lycoris_file(tmp_path / "a.safetensors", "loha")
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({**tensors, f"{name}.hada_t1": torch.zeros(2, 2, 3, 3)}, tmp_path / "tucker.safetensors")
    lokr, _ = _lycoris_file(tmp_path / "b.safetensors", "lokr")
    save_file({**tensors, **{k.replace(name, name.replace("conv1", "conv2")): v for k, v in lokr.items()
                             if k.startswith(name)}}, tmp_path / "mixed.safetensors")
    bad_shape = dict(lokr)
    bad_shape[f"{name}.lokr_w1"] = torch.zeros(3, 4)
    save_file(bad_shape, tmp_path / "shape.safetensors")
    both = {k: v for k, v in lokr.items() if k != f"{name}.lokr_w1"}  # W1 as two factors (decompose_both)
    both.update({f"{name}.lokr_w1_a": torch.zeros(4, 1), f"{name}.lokr_w1_b": torch.zeros(1, 4)})
    save_file(both, tmp_path / "both.safetensors")
    pipe = tiny_pipeline(tmp_path / "tokenizer")
    models = _pipeline_models(pipe)
    before = {component: snapshot(m) for component, m in models.items()}
    for file, message in [("tucker", r"hada_t1: LoHa Tucker factors are not supported"),
                          ("mixed", r"holds modules of several kinds \(loha, lokr\)"),
                          ("shape", r"conv1.lokr_w1 \(3, 4\), expected \(4, 4\)"),
                          ("both", r"conv1: a LoKr W1 in two factors, lokr_w1_a / lokr_w1_b \(decompose_both\), is "
                                   r"not supported")]:
        with pytest.raises(AdapterFileError, match=message):
            load_pipeline_adapter(models, tmp_path / f"{file}.safetensors")
    for component, m in models.items():
        assert_unchanged(m, before[component])


def test_lorakit_convert_takes_a_lycoris_file_to_peft_which_peft_loads(tmp_path):
    from typer.testing import CliRunner

    from image_models import pipeline_folder, tiny_pipeline, unet_inputs
    from lorakit.cli import app
    from lorakit.pipelines import load_pipeline_adapter

    folder = tmp_path / "pipe"
    tiny_pipeline(tmp_path / "tokenizer").save_pretrained(folder)
    tensors, _ = _lycoris_file(tmp_path / "style.safetensors", "loha")
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, tmp_path / "unet.safetensors")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "unet.safetensors"), str(tmp_path / "peft"),
                                      "--to", "peft", "--pipeline", str(folder)])
    assert result.exit_code == 0, result.output
    ours = tiny_pipeline(tmp_path / "tokenizer")
    load_pipeline_adapter({"unet": ours.unet}, tmp_path / "unet.safetensors")
    theirs = peft.PeftModel.from_pretrained(tiny_pipeline(tmp_path / "tokenizer").unet, tmp_path / "peft").eval()
    with torch.no_grad():
        assert_relative(theirs.base_model.model(*unet_inputs()).sample, ours.unet(*unet_inputs()).sample)
    del pipeline_folder


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_lorakit_train_takes_them_and_peft_reads_the_result(variant, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from lorakit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_lm_dir), "--variant", variant, "--rank", "4",
                                      "--targets", "q_proj,v_proj", "--max-steps", "3", "--batch-size", "4",
                                      "--micro-batch-size", "2", "--lr", "1e-2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ours = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    lorakit.load_adapter(ours, out / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out / "adapter").eval()
    x = token_batch(ours.config.vocab_size)
    assert (logits(ours, x) - logits(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), x)).abs().max() > 0
    assert_relative(logits(theirs, x), logits(ours, x))


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_alone_it_joins_the_base_product_and_gives_what_the_separate_sum_gives(variant):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, variant=variant, targets=["q_proj"]), name="a")
    lorakit.attach(model, LoraConfig(rank=2, alpha=2, variant=variant, targets=["q_proj"]), name="fresh")  # ΔW = 0
    randomize_adapters(model, "a", scale=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    lorakit.set_active(model, ["a"])
    assert layer.sole_plain_adapter(h) is layer.adapters["a"]  # one GEMM with W + ΔW
    fused = layer(h)
    grad_fused = torch.autograd.grad(fused.square().sum(), [h, *layer.adapters["a"].parameters()])
    lorakit.set_active(model, ["a", "fresh"])  # two in use: x Wᵀ and x ΔWᵀ apart
    assert layer.sole_plain_adapter(h) is None
    apart = layer(h)
    grad_apart = torch.autograd.grad(apart.square().sum(), [h, *layer.adapters["a"].parameters()])
    assert_relative(fused, apart, 1e-6)
    for one, other in zip(grad_fused, grad_apart):
        assert_relative(one, other, 1e-5)


@pytest.mark.parametrize("variant, name", [("loha", "LoHa"), ("lokr", "LoKr")])
def test_a_diffusers_file_is_refused_for_kinds_without_lora_factors(variant, name, tmp_path):
    from image_models import tiny_pipeline
    from lorakit.formats import AdapterFileError
    from lorakit.pipelines import save_pipeline_adapter

    ours = tiny_pipeline(tmp_path / "tokenizer")
    lorakit.attach(ours.unet, LoraConfig(rank=4, alpha=3, variant=variant, targets=TARGET_SETS["attention"]))
    with pytest.raises(AdapterFileError, match=rf"unet: a diffusers LoRA file holds lora_A / lora_B factors, which "
                                               rf"a {name} adapter does not have; write it as kohya"):
        save_pipeline_adapter(_pipeline_models(ours), tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()

"""Adapter algebra (combine.py) against dense math and against PEFT."""

import pytest
import torch
from conftest import randomize_adapters, tiny_llama, token_batch
from test_adapter import every_layout

import lorakit
from lorakit.combine import CombineError, combine, compress
from lorakit.files import export_adapter, import_adapter, write_adapter


def two_adapters():
    """Two adapters on one tiny Llama: different ranks, alphas, rsLoRA, overlapping targets."""
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]), "a")
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=3, use_rslora=True, targets=["v_proj", "o_proj"],
                                             rank_pattern={"o_proj": 3}), "b")
    randomize_adapters(model, "a", seed=1, scale=0.3)
    randomize_adapters(model, "b", seed=2, scale=0.3)
    return model, export_adapter(model, "a"), export_adapter(model, "b")


def dense_sum(adapters, weights):
    paths = {p for a in adapters for p in a.layers}
    return {p: sum(w * a.layers[p].delta() for a, w in zip(adapters, weights) if p in a.layers) for p in paths}


def assert_relative(got, expected, tolerance):
    assert (got - expected).norm() <= tolerance * expected.norm(), (got - expected).norm() / expected.norm()


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_is_the_exact_weighted_sum_with_negative_weights(method):
    _, a, b = two_adapters()
    combined = combine([a, b], [0.7, -1.3], method).adapter
    expected = dense_sum([a, b], [0.7, -1.3])
    assert combined.layers.keys() == expected.keys()
    for path, delta in expected.items():
        assert_relative(combined.layers[path].delta(), delta, 1e-5)
    assert combined.layers["model.layers.0.self_attn.v_proj"].rank == 4 + 2  # both adapters there


def test_cat_gives_the_logits_of_both_adapters_active_at_once(tmp_path):
    model, a, b = two_adapters()
    ids = token_batch(97)
    lorakit.set_active(model, ["a", "b"])
    with torch.no_grad():
        both = model(ids).logits
    fresh = tiny_llama()
    import_adapter(fresh, combine([a, b]).adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, both, rtol=1e-5, atol=1e-5)
    # and the combined file, rank_pattern and all, loads in PEFT with the same logits
    peft = pytest.importorskip("peft")
    write_adapter(combine([a, b]).adapter, tmp_path / "ab")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, both, rtol=1e-5, atol=1e-5)


def test_conv2d_embedding_and_conv1d_adapters_combine_too():
    for conv1d in (False, True):
        first, second = export_adapter(every_layout(conv1d)), export_adapter(every_layout(conv1d))
        second = combine([second], [2.0]).adapter  # a different adapter on the same modules
        combined = combine([first, second], [0.5, 0.25]).adapter
        for path, delta in dense_sum([first, second], [0.5, 0.25]).items():
            assert combined.layers[path].layout == first.layers[path].layout
            assert_relative(combined.layers[path].delta(), delta, 1e-5)


def test_svd_is_exact_at_full_rank_and_the_dense_truncation_below():
    _, a, b = two_adapters()
    exact = dense_sum([a, b], [1.0, 0.5])
    full = combine([a, b], [1.0, 0.5], "svd", rank=6)
    for path, delta in exact.items():
        assert_relative(full.adapter.layers[path].delta(), delta, 1e-5)
        assert full.kept[path] == pytest.approx(1.0, abs=1e-9)
    low = combine([a, b], [1.0, 0.5], "svd", rank=2)
    for path, delta in exact.items():
        S = torch.linalg.svdvals(delta.double())
        ours = torch.linalg.svdvals(low.adapter.layers[path].delta().double())[:2]
        torch.testing.assert_close(ours, S[:2], rtol=1e-4, atol=1e-6)
        assert low.kept[path] == pytest.approx(float((S[:2] ** 2).sum() / (S**2).sum()), rel=1e-6)
        U, _, Vh = torch.linalg.svd(delta.double())
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]  # Eckart-Young: the dense truncated SVD
        assert_relative(low.adapter.layers[path].delta().double(), best, 1e-4)


def test_compress_to_a_rank_or_an_energy():
    _, a, _ = two_adapters()
    half = compress(a, rank=2)
    assert {layer.rank for layer in half.adapter.layers.values()} == {2}
    for path, layer in a.layers.items():
        S = torch.linalg.svdvals(layer.delta().double())
        assert half.kept[path] == pytest.approx(float((S[:2] ** 2).sum() / (S**2).sum()), rel=1e-6)
    kept = compress(a, energy=0.9)
    for path, layer in a.layers.items():
        S2 = torch.linalg.svdvals(layer.delta().double()) ** 2
        needed = int((torch.cumsum(S2, 0) / S2.sum() < 0.9 - 1e-12).sum()) + 1
        assert kept.adapter.layers[path].rank == needed and kept.kept[path] >= 0.9


def test_compressed_logits_stay_within_the_discarded_singular_value():
    """The bound tested: on a one-layer model the logits are x (W + ΔW)^T, so compressing ΔW to
    rank k moves each token's logits by ‖x (ΔW - ΔW_k)^T‖ <= σ_{k+1} ‖x‖, and the whole batch by
    at most sqrt(discarded energy) ‖X‖_F, with ‖ΔW - ΔW_k‖²_F = (1 - kept) ‖ΔW‖²_F exactly.
    On a whole model (no such bound through the nonlinearities) the change shrinks as the
    kept energy grows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40))
    lorakit.attach(model, lorakit.LoraConfig(rank=8, alpha=8, targets=["0"]))
    randomize_adapters(model, scale=0.3)
    adapter = export_adapter(model)
    x = torch.randn(64, 24)
    with torch.no_grad():
        original = model(x)
    S = torch.linalg.svdvals(adapter.layers["0"].delta().double())
    for k in (1, 3, 6):
        result = compress(adapter, rank=k)
        discarded = float((S[k:] ** 2).sum())
        assert (1 - result.kept["0"]) * float((S**2).sum()) == pytest.approx(discarded, rel=1e-6)
        small = torch.nn.Sequential(torch.nn.Linear(24, 40))
        small.load_state_dict({key: value for key, value in model.state_dict().items() if "lora" not in key})
        import_adapter(small, result.adapter)
        with torch.no_grad():
            moved = small(x) - original
        per_token = moved.norm(dim=1) / x.norm(dim=1)
        assert float(per_token.max()) <= float(S[k]) * (1 + 1e-5)
        assert float(moved.norm()) <= discarded**0.5 * float(x.norm()) * (1 + 1e-5)

    full, _, _ = two_adapters()
    ids = token_batch(97)
    with torch.no_grad():
        reference_logits = full(ids).logits
    a = export_adapter(full, "a")
    changes = []
    for k in (1, 2, 3):
        fresh = tiny_llama()
        import_adapter(fresh, compress(a, rank=k).adapter)
        with torch.no_grad():
            changes.append(float((fresh(ids).logits - _alone(a, ids)).norm()))
    assert changes[0] > changes[1] > changes[2] >= 0 and reference_logits.isfinite().all()


def _alone(adapter, ids):
    model = tiny_llama()
    import_adapter(model, adapter)
    with torch.no_grad():
        return model(ids).logits


def test_combine_and_compress_take_directories(tmp_path):
    _, a, b = two_adapters()
    write_adapter(a, tmp_path / "a")
    write_adapter(b, tmp_path / "b")
    from_files = lorakit.combine([tmp_path / "a", str(tmp_path / "b")], [0.5, 2.0]).adapter
    from_values = combine([a, b], [0.5, 2.0]).adapter
    for path, layer in from_values.layers.items():
        torch.testing.assert_close(from_files.layers[path].delta(), layer.delta())
    lorakit.save_adapter(from_files, tmp_path / "ab")  # a value saves like any adapter
    assert lorakit.read_adapter(tmp_path / "ab").layers.keys() == from_values.layers.keys()
    assert lorakit.compress(tmp_path / "a", rank=1).adapter.layers.keys() == a.layers.keys()


def test_bad_input_is_refused():
    model, a, b = two_adapters()
    with pytest.raises(CombineError, match="no adapters"):
        combine([])
    with pytest.raises(CombineError, match="1 weights for 2 adapters"):
        combine([a, b], [1.0])
    with pytest.raises(CombineError, match="svd needs a rank >= 1, got 0"):
        combine([a, b], method="svd", rank=0)
    with pytest.raises(CombineError, match="unknown method 'tie'"):
        combine([a, b], method="tie")
    with pytest.raises(CombineError, match="ties needs a rank >= 1, got None"):
        combine([a, b], method="ties")
    with pytest.raises(CombineError, match=r"density must be in \(0, 1\], got 0"):
        combine([a, b], method="ties", rank=4, density=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    # same module names, other shapes: another base model
    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    lorakit.attach(other, lorakit.LoraConfig(rank=4, alpha=8, targets=["q_proj"]))
    with pytest.raises(CombineError, match=r"model.layers.0.self_attn.q_proj: adapter 1 has A \(4, 64\).*not the "
                                           r"same base model"):
        combine([a, export_adapter(other)])
    with pytest.raises(CombineError, match="exactly one of rank and energy"):
        compress(a)


def test_cli_combine_and_compress_write_adapters_and_refuse_bad_input(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.files import read_adapter

    _, a, b = two_adapters()
    write_adapter(a, tmp_path / "a")
    write_adapter(b, tmp_path / "b")
    write_adapter(b, tmp_path / "pickled")
    (tmp_path / "pickled" / "adapter_model.safetensors").rename(tmp_path / "pickled" / "adapter_model.bin")
    write_adapter(b, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    runner = CliRunner()
    result = runner.invoke(app, ["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.7,-0.3",
                                 "--method", "svd", "--rank", "3", "--out", str(tmp_path / "ab")])
    assert result.exit_code == 0, result.output
    assert "kept energy" in result.output
    combined = read_adapter(tmp_path / "ab")
    assert {layer.rank for layer in combined.layers.values()} == {3}
    result = runner.invoke(app, ["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "dare_ties",
                                 "--rank", "4", "--density", "0.5", "--seed", "7", "--out", str(tmp_path / "dt")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compress", str(tmp_path / "a"), "--energy", "0.95", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "->" in result.output and (tmp_path / "c" / "adapter_config.json").exists()
    for args, message in [
        (["combine", str(tmp_path / "a"), "--weights", "1,2", "--out", str(tmp_path / "x")], "2 weights for 1 adapters"),
        (["combine", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "not an adapter"),
        (["compress", str(tmp_path / "a"), "--rank", "0", "--out", str(tmp_path / "x")], "rank must be >= 1"),
        (["combine", str(tmp_path / "a"), str(tmp_path / "pickled"), "--out", str(tmp_path / "x")],
         "pickled weights are never loaded"),
        (["combine", str(tmp_path / "corrupt"), str(tmp_path / "a"), "--out", str(tmp_path / "x")],
         "not a readable safetensors file"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "x").exists()


def reference(adapters, weights, method, density, majority_sign, seed):
    """The papers' formulas on dense task vectors, written out independently."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for path in sorted({p for a in adapters for p in a.layers}):
        taus = [w * a.layers[path].delta() for a, w in zip(adapters, weights) if path in a.layers]
        trimmed = []
        for tau in taus:
            if method.startswith("dare"):
                mask = torch.rand(tau.shape, generator=generator) < density
                trimmed.append(tau * mask / density)
            else:
                k = max(1, int(density * tau.numel()))
                top = tau.abs().flatten().topk(k).values.min()
                trimmed.append(tau * (tau.abs() >= top))
        stack = torch.stack(trimmed)
        if method.endswith("ties"):
            sign = torch.sign(stack.sum(0) if majority_sign == "total" else torch.sign(stack).sum(0))
            sign[sign == 0] = 1
            agree = (torch.sign(stack) == sign) & (stack != 0)
            result[path] = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        else:
            result[path] = stack.sum(0)
    return result


@pytest.mark.parametrize("method, majority_sign", [("magnitude_prune", "total"), ("ties", "total"),
                                                   ("ties", "frequency"), ("dare_linear", "total"),
                                                   ("dare_ties", "total")])
def test_pruning_methods_match_the_papers_dense_formulas(method, majority_sign):
    _, a, b = two_adapters()
    weights, density = [1.0, -0.6], 0.4
    # rank 64 >= every module's size: the factoring back is exact, so the formulas are compared
    result = combine([a, b], weights, method, rank=64, density=density, majority_sign=majority_sign, seed=3)
    expected = reference([a, b], weights, method, density, majority_sign, seed=3)
    for path, delta in expected.items():
        assert_relative(result.adapter.layers[path].delta(), delta, 1e-5)
    low = combine([a, b], weights, method, rank=2, density=density, majority_sign=majority_sign, seed=3)
    for path, delta in expected.items():
        S = torch.linalg.svdvals(delta.double())
        assert low.kept[path] == pytest.approx(float((S[:2] ** 2).sum() / (S**2).sum()), rel=1e-6)


def test_a_ties_adapter_loads_in_peft_with_lorakits_logits(tmp_path):
    peft = pytest.importorskip("peft")
    _, a, b = two_adapters()
    ties = combine([a, b], [1.0, 1.0], "ties", rank=4, density=0.5).adapter
    ours = tiny_llama()
    import_adapter(ours, ties)
    write_adapter(ties, tmp_path / "ties")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ties")
    ids = token_batch(97)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)

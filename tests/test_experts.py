"""LoRA on fused mixture-of-experts tensors (experts.py): per-expert math, PEFT's
target_parameters files both ways, merge, bad input."""

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.attach import AttachError, lora_layers, trainable_parameters
from lorakit.experts import LoraExperts, LoraExpertWeight
from lorakit.files import AdapterFileError, read_adapter

from conftest import assert_unchanged, randomize_adapters, rewrite_weights, snapshot, token_batch


def tiny_qwen3_moe(seed: int = 0) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=67, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config).eval()


def tiny_mixtral(seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=71, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


MOE = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral}
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_relative(actual, expected, tolerance=1e-5):
    """|a - e| <= tolerance * max|e|: what the issue asks of logits computed two ways."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * expected.abs().max().item())


def expert_forward(experts: nn.Module, x: torch.Tensor, e: int, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense reference: expert e with W_e + ΔW_e, as a formula."""
    gate_up, down = (experts.weight_of(name)[e] + deltas[name][e] for name in ("gate_up_proj", "down_proj"))
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (experts.act_fn(gate) * up) @ down.T


@pytest.mark.parametrize("kind", sorted(MOE))
def test_all_linear_adapts_every_expert_tensor_and_keeps_base_keys(kind):
    model = MOE[kind]()
    keys = set(model.state_dict())
    x = token_batch(model.config.vocab_size)
    before = logits(model, x)
    paths = lorakit.attach(model, LoraConfig(rank=4, alpha=8))
    tensors = [p for p in paths if p.endswith(("gate_up_proj", "down_proj"))]
    assert tensors == [f"model.layers.{i}.mlp.{name}" for i in range(2) for name in EXPERTS]
    assert {k for k in model.state_dict() if ".adapters." not in k} == keys
    assert_relative(logits(model, x), before, 1e-6)  # B = 0: the base, whatever kernel runs the experts
    count = trainable_parameters(model).by_type
    E, H, I = 4, 32, model.model.layers[0].mlp.experts.down_proj.weight.shape[-1]
    assert count["gate_up_proj"] == (2, 2 * E * 4 * (H + 2 * I))
    assert count["down_proj"] == (2, 2 * E * 4 * (I + H))


@pytest.mark.parametrize("kind", sorted(MOE))
def test_all_linear_differs_from_peft_by_the_routers_alone(kind):
    """PEFT's all-linear on a transformers-5 MoE model also adapts each router (mlp.gate);
    lorakit's leaves the routers to the base. Everything else is the same set."""
    import peft

    theirs = peft.get_peft_model(MOE[kind](), peft.LoraConfig(r=2, target_modules="all-linear"))
    adapted = {name.removeprefix("base_model.model.").split(".lora_A")[0] for name, _ in theirs.named_parameters()
               if ".lora_A" in name}
    ours = set(lorakit.attach(MOE[kind](), LoraConfig(rank=2, alpha=4)))
    routers = {f"model.layers.{i}.mlp.gate" for i in range(2)}
    outside_experts = {p for p in adapted if ".experts" not in p}
    assert routers <= outside_experts and not routers & ours
    assert {p for p in ours if ".experts" not in p} == outside_experts - routers
    assert {p for p in ours if ".experts" in p} == {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in EXPERTS}


def test_each_expert_gets_its_own_low_rank_update():
    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=3, alpha=6, targets=list(EXPERTS)))
    randomize_adapters(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoraExperts)
    deltas = {name: getattr(experts, name).delta_weight("default") for name in ("gate_up_proj", "down_proj")}
    for name, delta in deltas.items():
        adapter = getattr(experts, name).adapters["default"]
        for e in range(4):  # ΔW_e = s B_e A_e, expert by expert
            torch.testing.assert_close(delta[e], 2.0 * adapter.lora_B[e].detach() @ adapter.lora_A[e].detach())
    hidden = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))
    top_k = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 2], [2, 0], [3, 1], [0, 3]])
    weights = torch.rand(9, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = experts(hidden, top_k, weights)
        expected = torch.zeros_like(hidden)
        for t in range(9):
            for k in range(2):
                e = int(top_k[t, k])
                expected[t] += weights[t, k] * expert_forward(experts, hidden[t:t + 1], e, deltas)[0]
    assert_relative(got, expected, 1e-6)


@pytest.mark.parametrize("kind", sorted(MOE))
def test_merge_unmerge_and_detach_are_exact(kind):
    model = MOE[kind]()
    base = copy.deepcopy(model)
    x = token_batch(model.config.vocab_size)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", *EXPERTS]))
    randomize_adapters(model)
    unmerged = logits(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    lorakit.merge(model)
    lorakit.merge(model)  # a second merge is a no-op
    assert_relative(logits(model, x), unmerged)
    lorakit.unmerge(model)
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6 * value.abs().max().item())
    lorakit.detach(model, merge=False)
    assert type(model.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert_relative(logits(model, x), logits(base, x), 1e-6)


@pytest.mark.parametrize("kind", sorted(MOE))
def test_merged_state_dict_merges_expert_tensors_as_the_model_does(kind):
    """An expert tensor's base key is its own path (not path.weight): merging the adapter
    value into a plain state dict gives exactly what merging the model gives."""
    base = {k: v.clone() for k, v in MOE[kind]().state_dict().items()}
    model = MOE[kind]()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4))
    randomize_adapters(model)
    merged = lorakit.merged_state_dict(base, lorakit.export_adapter(model))
    lorakit.merge(model)
    expected = {k: v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(merged[k], base[k]) for k in base if k.endswith("experts.down_proj"))


@pytest.mark.parametrize("kind", sorted(MOE))
def test_peft_loads_lorakit_expert_adapters_with_the_same_logits(kind, tmp_path):
    model = MOE[kind]()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, rank_pattern={"down_proj": 2}))
    randomize_adapters(model)
    x = token_batch(model.config.vocab_size)
    expected = logits(model, x)
    lorakit.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(MOE[kind](), tmp_path / "a").eval()
    assert_relative(logits(theirs, x), expected)


@pytest.mark.parametrize("parameters", [EXPERTS, ("experts.down_proj",), ("gate_up_proj",)])
@pytest.mark.parametrize("kind", sorted(MOE))
def test_lorakit_loads_peft_target_parameters_with_the_same_logits(kind, parameters, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=list(parameters),
                             rank_pattern={"gate_up_proj": 3}, init_lora_weights=False)
    theirs = peft.get_peft_model(MOE[kind](), config).eval()
    x = token_batch(theirs.config.vocab_size)
    expected = logits(theirs, x)
    theirs.save_pretrained(tmp_path / "a")
    ours = MOE[kind]()
    lorakit.load_adapter(ours, tmp_path / "a")
    adapted = sorted(path for path, layer in lora_layers(ours) if isinstance(layer, LoraExpertWeight))
    assert len(adapted) == 2 * len(parameters)
    assert_relative(logits(ours, x), expected)
    # and the value read without a model knows its experts
    value = read_adapter(tmp_path / "a")
    assert {p for p, v in value.layers.items() if v.layout == "experts"} == set(adapted)


def test_a_second_adapter_on_experts_switches_and_deletes_cleanly():
    model = tiny_mixtral()
    x = token_batch(model.config.vocab_size)
    base = logits(model, x)
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=list(EXPERTS)), name="a")
    lorakit.attach(model, LoraConfig(rank=3, alpha=3, targets=["down_proj"]), name="b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    lorakit.set_active(model, ["b"])
    only_b = logits(model, x)
    lorakit.set_active(model, ["a", "b"])
    both = logits(model, x)
    lorakit.delete_adapter(model, "a")
    lorakit.set_active(model, ["b"])
    assert_relative(logits(model, x), only_b, 1e-6)
    assert not torch.allclose(both, only_b)
    lorakit.delete_adapter(model, "b")
    assert not isinstance(model.model.layers[0].mlp.experts, LoraExperts)
    assert_relative(logits(model, x), base, 1e-6)


def test_a_base_checkpoint_loads_into_an_adapted_model():
    model = tiny_qwen3_moe()
    fresh = tiny_qwen3_moe(seed=5).state_dict()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4))
    missing, unexpected = model.load_state_dict(fresh, strict=False)
    assert not unexpected and all(".adapters." in key for key in missing)
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj.weight, fresh["model.layers.1.mlp.experts.down_proj"])


def test_training_moves_every_experts_factors():
    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=list(EXPERTS)))
    x = token_batch(model.config.vocab_size, shape=(4, 16))
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    for path, layer in lora_layers(model):
        grad = layer.adapters["default"].lora_B.grad
        assert grad is not None and torch.isfinite(grad).all(), path
        assert grad.abs().amax(dim=(1, 2)).gt(0).sum() >= 2, path  # experts that got tokens learn


def test_a_target_that_matches_nothing_on_a_moe_model_is_refused_with_candidates():
    model = tiny_qwen3_moe()
    before = snapshot(model)
    with pytest.raises(AttachError, match=r"'experts.w1' matches no module or expert tensor.*down_proj.*gate_up_proj"):
        lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["q_proj", "experts.w1"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("config, message", [
    (LoraConfig(rank=2, alpha=4, targets=list(EXPERTS), variant="dora"), "DoRA is not supported"),
    (LoraConfig(rank=2, alpha=4, targets=list(EXPERTS), init="pissa"), "needs a Linear or GPT-2 Conv1D weight"),
    (LoraConfig(rank=40, alpha=4, targets=["down_proj"]), r"rank 40 > min\(in=16, out=32\)"),
])
def test_expert_tensors_refuse_what_they_cannot_do(config, message):
    model = tiny_qwen3_moe()
    before = snapshot(model)
    with pytest.raises(AttachError, match=message):
        lorakit.attach(model, config)
    assert_unchanged(model, before)


def _saved_with(tmp_path, change):
    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=list(EXPERTS)))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    rewrite_weights(tmp_path / "a", change)
    return tmp_path / "a"


def _more_experts(tensors):
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"  # down_proj's: outermost
    tensors[key] = torch.cat([tensors[key], tensors[key]])  # 8 experts' A
    b_key = key.replace("lora_A", "lora_B")
    tensors[b_key] = torch.cat([tensors[b_key], tensors[b_key]], dim=1)


def _nan(tensors):
    tensors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("change, message", [
    (_more_experts, r"model.layers.0.mlp.experts.down_proj: .*lora_A.weight \(down_proj\) has shape \(8, 2, 16\), "
                    r"expected \(4, 2, 16\)"),
    (_nan, r"experts.base_layer.lora_B.weight has NaN"),
])
def test_a_bad_expert_file_is_refused_naming_the_tensor_and_changes_nothing(tmp_path, change, message):
    directory = _saved_with(tmp_path, change)
    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=["q_proj"]), name="other")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, directory)
    assert_unchanged(model, before)


@pytest.mark.parametrize("shuffled", [False, True], ids=["grouped rows", "shuffled rows"])
def test_mixed_batches_give_every_row_its_own_experts(tmp_path, shuffled):
    from lorakit.serve.slots import BASE, enable_slots, mixed_forward, routing
    from lorakit.serve.store import AdapterStore

    base = tiny_qwen3_moe()
    singles = {}
    for i, config in enumerate([LoraConfig(rank=4, alpha=8), LoraConfig(rank=2, alpha=2, targets=["down_proj"]),
                                LoraConfig(rank=3, alpha=6, targets=["q_proj", "experts"])]):
        model = copy.deepcopy(base)
        lorakit.attach(model, config)
        randomize_adapters(model, seed=i, scale=0.2)
        lorakit.save_adapter(model, tmp_path / f"a{i}")
        singles[f"a{i}"] = model
    served = copy.deepcopy(base)
    enable_slots(served, 3)
    store = AdapterStore(served, tmp_path, 3)
    names = ["a2", None, "a0", "a1", "a0", None, "a2", "a1"]
    slots = [store.acquire(n) if n else BASE for n in names]
    ids = torch.randint(0, base.config.vocab_size, (len(names), 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if shuffled:
            with routing(served, slots, ids.shape[1]):
                mixed = served(ids).logits
        else:
            mixed = mixed_forward(served, ids, slots)
        for row, name in enumerate(names):
            expected = (singles[name] if name else base)(ids[row:row + 1]).logits[0]
            assert_relative(mixed[row], expected)


def test_combine_and_compress_keep_each_experts_update(tmp_path):
    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=3, alpha=6, targets=list(EXPERTS)), name="a")
    lorakit.attach(model, LoraConfig(rank=2, alpha=2, targets=list(EXPERTS)), name="b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    a, b = lorakit.export_adapter(model, "a"), lorakit.export_adapter(model, "b")
    path = "model.layers.1.mlp.experts.down_proj"
    expected = 0.5 * a.layers[path].delta() + 2.0 * b.layers[path].delta()
    combined = lorakit.combine([a, b], [0.5, 2.0]).adapter
    assert combined.layers[path].rank == 5
    torch.testing.assert_close(combined.layers[path].delta(), expected, rtol=0, atol=1e-6)
    svd = lorakit.combine([a, b], [0.5, 2.0], method="svd", rank=5).adapter  # rank 5 holds all of it
    torch.testing.assert_close(svd.layers[path].delta(), expected, rtol=0, atol=1e-5)
    ties = lorakit.combine([a, b], method="ties", rank=4, density=0.5).adapter
    assert ties.layers[path].A.shape == (4, 4, 16) and ties.layers[path].B.shape == (4, 32, 4)
    best = lorakit.compress(a, rank=1).adapter.layers[path]
    for e in range(4):  # each expert's own best rank-1 approximation
        U, S, Vh = torch.linalg.svd(a.layers[path].delta()[e].double())
        torch.testing.assert_close(best.delta()[e].double(), S[0] * U[:, :1] @ Vh[:1], rtol=0, atol=1e-6)
    lorakit.save_adapter(combined, tmp_path / "c")
    fresh = tiny_qwen3_moe()
    lorakit.load_adapter(fresh, tmp_path / "c")  # a combination is an ordinary expert adapter file


def test_analyze_reports_expert_tensors_per_expert():
    from lorakit.analyze import analyze

    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=3, alpha=6))
    randomize_adapters(model)
    report = analyze(lorakit.export_adapter(model), base=tiny_qwen3_moe())
    stats = report["modules"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert stats["experts"] == 4 and stats["rank"] == 3 and len(stats["singular_values"]) == 3
    assert 1.0 <= stats["effective_rank"] <= 3.0 and stats["rank_99"] <= 3 and stats["relative_norm"] > 0
    assert "experts" not in report["modules"]["model.layers.0.self_attn.q_proj"]


def test_lorakit_train_on_a_moe_model_trains_the_experts_and_peft_reads_the_result(tmp_path):
    import json

    from typer.testing import CliRunner

    from lorakit.cli import app

    from conftest import save_tiny_moe_lm

    model_dir = save_tiny_moe_lm(tmp_path / "moe")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(model_dir), "--rank", "2", "--max-steps", "4",
                                      "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 MoE expert tensors adapted (4 experts each)" in " ".join(result.output.split())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{n}" for i in range(2)
                                           for n in ("down_proj", "gate_up_proj")]
    trained = read_adapter(out / "adapter")
    assert all(v.B.abs().amax(dim=(1, 2)).gt(0).sum() >= 2 for v in trained.layers.values() if v.layout == "experts")
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lorakit.load_adapter(ours, out / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    x = token_batch(ours.config.vocab_size)
    assert_relative(logits(theirs, x), logits(ours, x))


def test_inspect_counts_expert_tensors(tmp_path):
    from lorakit.report import inspect_model

    model_dir = tmp_path / "m"
    tiny_qwen3_moe().save_pretrained(model_dir)
    report = inspect_model(str(model_dir), LoraConfig(rank=4, alpha=8))
    assert (report.expert_tensors, report.experts) == (4, 4)
    assert report.by_type["gate_up_proj"] == (2, 2 * 4 * 4 * (32 + 32))


def test_plan_counts_expert_adapters_and_runs_the_experts_on_fake_tensors(tmp_path):
    from lorakit.plan import plan
    from lorakit.report import inspect_model

    model_dir = tmp_path / "m"
    tiny_qwen3_moe().save_pretrained(model_dir)
    lora = plan(str(model_dir), method="lora", rank=4, batch=2, seq=16)
    assert lora.trainable_params == inspect_model(str(model_dir), LoraConfig(rank=4, alpha=8)).trainable_params
    assert lora.activations_bytes > 0


def test_the_per_expert_loop_and_the_grouped_gemm_agree_forward_and_backward(monkeypatch):
    """Where F.grouped_mm does not run (older torch, some GPUs) the experts loop: same numbers."""
    from lorakit import experts as module

    model = tiny_qwen3_moe()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=list(EXPERTS)))
    randomize_adapters(model)
    x = token_batch(model.config.vocab_size, shape=(3, 9))
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(module, "grouped_mm_works", lambda device, dtype, grouped=grouped: grouped)
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    assert_relative(results[1][0], results[0][0], 1e-6)
    for looped, grouped in zip(results[1][1], results[0][1]):
        assert_relative(looped, grouped, 1e-5)

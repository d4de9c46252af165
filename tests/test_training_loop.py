"""The training loop: accumulation, determinism, schedules, LoRA+, the NaN guard, and
that training on real dialogs lowers the held-out loss."""

import json
import math
from contextlib import nullcontext

import pytest
import torch
from conftest import EPS, assert_close_as_sums, randomize_adapters
from test_training_batches import random_examples
from safetensors.torch import load_file

import lorakit
from lorakit.training import TrainConfig, TrainingError, fit
from lorakit.training.batches import collate
from lorakit.training.loop import accumulate, learning_rate, parameter_groups
from lorakit.training.text import prepare_data
from lorakit.training.loss import LossModule


def run(tiny_lm_dir, tmp_path, name="run", **settings):
    config = TrainConfig(model=str(tiny_lm_dir), out=str(tmp_path / name), **settings)
    tokenizer = lorakit.load_tokenizer(config.model)
    train_set, eval_set = prepare_data(config, tokenizer)
    model = lorakit.load_model(config.model)
    return model, fit(model, train_set, eval_set, config)


def adapter_weights(result):
    return load_file(result.adapter / "adapter_model.safetensors")


BASE = dict(rank=4, alpha=8, lr=3e-3, max_steps=6, batch_size=8, eval_fraction=0.2, save_every=3)


def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch(llama):
    lorakit.attach(llama, lorakit.LoraConfig(rank=4, alpha=8))
    randomize_adapters(llama)
    examples = random_examples(llama.config.vocab_size, [5, 9, 3, 7, 4, 11, 2, 6], seed=3)
    rows = [(e,) for e in examples]
    tokens = sum(e.trained_tokens for e in examples)
    runner = LossModule(llama)

    def gradients(micro: int) -> tuple[float, dict[str, torch.Tensor]]:
        llama.zero_grad(set_to_none=True)
        batches = [collate(rows[i:i + micro]) for i in range(0, len(rows), micro)]
        loss = accumulate(runner, batches, tokens, 1, nullcontext())
        return loss, {n: p.grad.clone() for n, p in llama.named_parameters() if p.requires_grad}

    loss_large, large = gradients(8)
    for micro in (1, 2, 4):
        loss, accumulated = gradients(micro)
        # sums over the step's trained tokens, split into micro-batches
        assert math.isclose(loss, loss_large, rel_tol=tokens * EPS)
        for name, grad in large.items():
            assert_close_as_sums(accumulated[name], grad, tokens, msg=name)
    assert all(g.abs().sum() > 0 for g in large.values())


def test_accumulated_run_tracks_the_large_batch_run(tiny_lm_dir, tmp_path):
    _, large = run(tiny_lm_dir, tmp_path, "large", micro_batch_size=8, **BASE)
    _, accumulated = run(tiny_lm_dir, tmp_path, "accumulated", micro_batch_size=2, **BASE)
    a, b = adapter_weights(large), adapter_weights(accumulated)
    assert a.keys() == b.keys()
    for key in a:  # float rounding differs in the sums, and Adam magnifies it on near-zero gradients
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=5e-5, msg=key)
    assert math.isclose(large.train_loss, accumulated.train_loss, rel_tol=1e-6)


def test_same_seed_same_adapter_bit_for_bit(tiny_lm_dir, tmp_path):
    first = adapter_weights(run(tiny_lm_dir, tmp_path, "one", dropout=0.1, **BASE)[1])
    second = adapter_weights(run(tiny_lm_dir, tmp_path, "two", dropout=0.1, **BASE)[1])
    other = adapter_weights(run(tiny_lm_dir, tmp_path, "three", dropout=0.1, seed=1, **BASE)[1])
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_run_directory_has_metrics_plot_summary_and_a_peft_adapter(tiny_lm_dir, tmp_path):
    model, result = run(tiny_lm_dir, tmp_path, **BASE)
    out = result.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6]
    assert all(r["tokens_per_second"] > 0 and r["lr"] > 0 for r in records if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["peak_memory_bytes"] > 0 and summary["adapter_bytes"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    # the final adapter is the trained one and loads into a fresh base
    fresh = lorakit.load_model(str(tiny_lm_dir))
    lorakit.load_adapter(fresh, result.adapter)
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        trained = model.eval()(ids).logits
        torch.testing.assert_close(fresh(ids).logits, trained, rtol=0, atol=0)
    # ... and into PEFT
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(lorakit.load_model(str(tiny_lm_dir)), str(result.adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_trained_adapter_lowers_held_out_loss_on_real_dialogs(tiny_lm_dir, tmp_path):
    _, result = run(tiny_lm_dir, tmp_path, rank=8, alpha=16, lr=1e-2, epochs=8, batch_size=4, micro_batch_size=4,
                    eval_fraction=0.15, warmup_steps=4, save_every=1000)
    assert result.eval_loss_after < result.eval_loss_before - 0.3, (result.eval_loss_before, result.eval_loss_after)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_lm_dir, tmp_path):
    plain = adapter_weights(run(tiny_lm_dir, tmp_path, "plain", **BASE)[1])
    recomputed = adapter_weights(run(tiny_lm_dir, tmp_path, "ckpt", gradient_checkpointing=True, **BASE)[1])
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_autocast_trains_float32_adapters(tiny_lm_dir, tmp_path):
    _, result = run(tiny_lm_dir, tmp_path, bf16=True, **BASE)
    weights = adapter_weights(result)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert math.isfinite(result.eval_loss_after)


def nan_at_forward(model, n: int) -> dict[str, int]:
    """Make the model's ``n``-th forward pass return NaN; the returned dict counts the passes."""
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == n else output

    model.model.norm.register_forward_hook(poison)
    return calls


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_lm_dir, tmp_path):
    config = TrainConfig(model=str(tiny_lm_dir), out=str(tmp_path / "nan"), **{**BASE, "save_every": 2})
    train_set, eval_set = prepare_data(config, lorakit.load_tokenizer(config.model))
    model = lorakit.load_model(config.model)
    nan_at_forward(model, 5)  # the 5th forward pass is step 5's
    with pytest.raises(TrainingError, match=r"diverged at step 5: loss nan.*last good checkpoint is .*step-000004"):
        fit(model, train_set, None, config)
    out = tmp_path / "nan"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (out / "adapter").exists()
    saved = load_file(out / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_schedule_warms_up_then_decays():
    config = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    rates = [learning_rate(config, s, 14) for s in range(14)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4] == 1.0 and all(a > b for a, b in zip(rates[4:], rates[5:]))
    assert math.isclose(learning_rate(config, 14, 14), 0.1)
    linear = TrainConfig(lr=2.0, schedule="linear")
    assert [learning_rate(linear, s, 4) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]
    assert learning_rate(TrainConfig(lr=2.0, schedule="constant"), 3, 4) == 2.0


def test_loraplus_puts_every_b_in_its_own_group(llama):
    lorakit.attach(llama, lorakit.LoraConfig(rank=2, alpha=4))
    randomize_adapters(llama)
    plain = parameter_groups(llama, TrainConfig())
    assert len(plain) == 1 and plain[0]["lr_scale"] == 1.0
    groups = parameter_groups(llama, TrainConfig(loraplus_ratio=16))
    names = {id(p): n for n, p in llama.named_parameters()}
    assert all(names[id(p)].endswith("lora_A") for p in groups[0]["params"])
    assert all(names[id(p)].endswith("lora_B") for p in groups[1]["params"])
    assert groups[1]["lr_scale"] == 16 and len(groups[0]["params"]) == len(groups[1]["params"]) == 14


def test_loraplus_run_moves_b_faster(tiny_lm_dir, tmp_path):
    plain = adapter_weights(run(tiny_lm_dir, tmp_path, "plain", **BASE)[1])
    plus = adapter_weights(run(tiny_lm_dir, tmp_path, "plus", loraplus_ratio=8, **BASE)[1])
    norm = lambda w: sum(t.norm() for k, t in w.items() if "lora_B" in k)  # noqa: E731
    assert norm(plus) > 2 * norm(plain)


@pytest.mark.slow
def test_smollm2_learns_swedish_dialogs(tmp_path):
    """The real task: SmolLM2-135M-Instruct on held-out chatterbot-corpus Swedish dialogs."""
    result = lorakit.train(TrainConfig(language="swedish", out=str(tmp_path / "run"), rank=16, alpha=32,
                                       max_steps=10, batch_size=4, micro_batch_size=4, lr=5e-4, warmup_steps=3,
                                       save_every=100))
    assert result.eval_loss_after < result.eval_loss_before - 0.3, (result.eval_loss_before, result.eval_loss_after)

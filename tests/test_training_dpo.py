"""DPO (training/preference.py): loss, gradients, reference and metrics equal TRL's DPOTrainer
with a PEFT LoRA of the same weights; data formats, dropping, precomputed references,
resume and bad input."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit import LoraConfig
from lorakit.attach import lora_layers
from lorakit.cli import app
from lorakit.config import ConfigError
from lorakit.training import TrainConfig, train
from lorakit.training.preference import DpoLoss, build_pairs, collate_pairs, reference_logps
from lorakit.training.sources import DataError

from conftest import assert_resumes_bit_identical, randomize_adapters

STANDARD = [{"prompt": f"Säg {w}", "chosen": f" {w} {w}", "rejected": " nej tack"} for w in ("hej", "tack", "bra")]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": f"Vad heter {w}?"}],
                   "chosen": [{"role": "assistant", "content": f"{w} heter {w}."}],
                   "rejected": [{"role": "assistant", "content": "Jag vet inte."}]} for w in ("hon", "han", "den")]
TARGETS = ("q_proj", "v_proj", "down_proj")


def models(model_dir, tmp_path):
    """lorakit's model and TRL's PEFT model, with the same random adapter (B ≠ 0, so the
    policy differs from the reference)."""
    import peft
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.attach(ours, LoraConfig(rank=4, alpha=8, targets=TARGETS))
    randomize_adapters(ours, scale=0.2)
    lorakit.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter",
                                            is_trainable=True)
    return ours.train(), theirs


def trl_trainer(theirs, tokenizer, records, tmp_path, **settings):
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(records), **settings)
    trainer = DPOTrainer(model=theirs, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(records))
    # TRL keeps a copy of an adapter it was handed as the reference ("ref"); a fresh lorakit
    # adapter's reference is the adapter switched off, which is TRL's for a fresh adapter.
    if "ref" in theirs.peft_config:
        theirs.delete_adapter("ref")
    theirs.set_adapter("default")
    theirs.train()
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])


def lorakit_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for path, layer in lora_layers(model):
        adapter = layer.adapters["default"]
        grads[f"{path}.lora_A"], grads[f"{path}.lora_B"] = adapter.lora_A.grad, adapter.lora_B.grad
    return grads


def assert_same_gradients(ours, theirs) -> None:
    """Every adapter gradient of lorakit's model equals PEFT's, to float32 summation error
    relative to the gradient's own scale."""
    theirs_grads, ours_grads = peft_grads(theirs), lorakit_grads(ours)
    assert sorted(theirs_grads) == sorted(ours_grads)
    for name, grad in ours_grads.items():
        scale = theirs_grads[name].abs().max().item()
        torch.testing.assert_close(grad, theirs_grads[name], rtol=0, atol=1e-5 * max(scale, 1e-3),
                                   msg=lambda text, name=name: f"{name}: {text}")


def peft_grads(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
            for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("records", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_gradients_and_metrics_equal_trl(tiny_lm_dir, tmp_path, loss_type, records):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ours, theirs = models(tiny_lm_dir, tmp_path)
    beta = 0.3
    trainer, inputs = trl_trainer(theirs, tokenizer, records, tmp_path, beta=beta, loss_type=loss_type)
    expected = trainer.compute_loss(theirs, inputs)
    expected.backward()

    pairs = build_pairs([(str(i), r) for i, r in enumerate(records)], tokenizer, 512, "records")
    batch = collate_pairs(pairs.pairs, tokenizer.pad_token_id)
    torch.testing.assert_close(batch.rows.targets[batch.rows.targets != -100],  # the same completion tokens
                               inputs["input_ids"][:, 1:][inputs["completion_mask"][:, 1:] == 1])
    loss = DpoLoss(ours, beta, loss_type)
    actual = loss(batch) / len(records)  # the loop divides the summed loss by the step's pairs
    actual.backward()

    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)
    assert_same_gradients(ours, theirs)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):  # TRL's metric names and values
        ours_value = loss.sums[name].item() / len(records)
        assert ours_value == pytest.approx(trainer._metrics["train"][name][-1], rel=1e-4, abs=1e-5), name


def test_reference_log_probabilities_equal_trl_and_are_the_base_model(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.training.sequences import sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ours, theirs = models(tiny_lm_dir, tmp_path)
    beta = 0.1
    trainer, inputs = trl_trainer(theirs, tokenizer, STANDARD, tmp_path, beta=beta)
    trainer.compute_loss(theirs, inputs)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    batch = collate_pairs(build_pairs([(str(i), r) for i, r in enumerate(STANDARD)], tokenizer, 512, "r").pairs,
                          tokenizer.pad_token_id)
    reference = reference_logps(ours, batch.rows)
    chosen, rejected = reference.chunk(2)
    # TRL logs logps and rewards = beta (logps - reference): its reference, per kind, on average
    for values, kind in ((chosen, "chosen"), (rejected, "rejected")):
        theirs_reference = logged[f"logps/{kind}"] - logged[f"rewards/{kind}"] / beta
        assert values.mean().item() == pytest.approx(theirs_reference, rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)  # no adapter at all: the same numbers
    with torch.no_grad():
        torch.testing.assert_close(reference, sequence_logps(base, batch.rows), rtol=0, atol=1e-5)
    assert not torch.allclose(reference, sequence_logps(ours, batch.rows).detach(), atol=1e-3)  # the adapter counts


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def dpo(model_dir, out, data, **changes):
    values = dict(model=str(model_dir), out=str(out), method="dpo", data=str(data), rank=4, alpha=8, max_steps=4,
                  batch_size=4, micro_batch_size=2, lr=5e-3, save_every=2, eval_fraction=0.25, log_every=1)
    return TrainConfig(**{**values, **changes})


def test_a_run_learns_the_preferences_and_logs_trl_metrics(tiny_lm_dir, tmp_path):
    records = STANDARD * 4 + CONVERSATIONAL * 4
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = train(dpo(tiny_lm_dir, tmp_path / "run", data, max_steps=12))
    assert result.eval_loss_after < result.eval_loss_before
    assert result.eval_accuracy_after >= result.eval_accuracy_before
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert all(name in line for line in steps), name
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert {"eval_loss", "eval_rewards/accuracies"} <= set(lines[0])
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_precomputed_references_are_stored_and_resume_reads_them(tiny_lm_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD * 4)
    live = train(dpo(tiny_lm_dir, tmp_path / "live", data, dropout=0.0))
    stored = train(dpo(tiny_lm_dir, tmp_path / "stored", data, precompute_ref=True))
    assert (tmp_path / "stored" / "reference_logps.safetensors").exists()
    assert stored.train_loss == pytest.approx(live.train_loss, rel=1e-4)
    # a resumed run reads the stored references instead of computing them again
    shutil.rmtree(tmp_path / "stored" / "adapter")
    (tmp_path / "stored" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "stored" / "checkpoints" / "step-000004")
    from lorakit.training import preference

    monkeypatch.setattr(preference, "reference_logps", lambda *a: pytest.fail("references computed again"))
    resumed = train(dpo(tiny_lm_dir, tmp_path / "stored", data, precompute_ref=True), resume=True)
    assert resumed.resumed_from == 2


def test_resume_is_bit_identical(tiny_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD * 4)
    assert_resumes_bit_identical(lambda out: dpo(tiny_lm_dir, out, data, keep_checkpoints=3, dropout=0.1), tmp_path)


def test_a_pair_cut_to_nothing_is_dropped_and_counted(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    long_prompt = {"prompt": "hej " * 40, "chosen": " ja", "rejected": " nej"}
    pairs = build_pairs([("a:1", STANDARD[0]), ("a:2", long_prompt)], tokenizer, 20, "a")
    assert len(pairs.pairs) == 1 and pairs.dropped == 1 and pairs.truncated == 1
    assert all(len(p.prompt) + len(p.chosen) <= 20 for p in pairs.pairs)


runner = CliRunner()


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hej", "chosen": "ja"}, r"pairs\.jsonl:2: a preference record needs \"chosen\" and \"rejected\""),
    ({"prompt": "hej", "chosen": "ja", "rejected": "nej", "score": 1}, r"pairs\.jsonl:2: unknown key\(s\) \['score'\]"),
    ({"prompt": "hej", "chosen": [{"role": "assistant", "content": "ja"}], "rejected": "nej"},
     r"pairs\.jsonl:2: \"prompt\", \"chosen\" and \"rejected\" must all be strings or all be lists"),
])
def test_bad_preference_records_are_named_before_anything_loads(tiny_lm_dir, tmp_path, record, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", [STANDARD[0], record])
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--method", "dpo", "--model", str(tiny_lm_dir), "--data", str(data),
                                 "--out", str(out)])
    assert result.exit_code == 2, result.output
    import re

    assert re.search(message, " ".join(result.output.split())), result.output
    assert not out.exists()


@pytest.mark.parametrize("changes, message", [
    (dict(method="grpo", precompute_ref=True, reward=("match:answer",)), r"--precompute-ref belongs to --method dpo"),
    (dict(method="dpo", num_generations=4), r"--num-generations belongs to --method grpo"),
    (dict(method="sft", beta=0.1), r"--beta belongs to --method dpo, grpo, not sft"),
    (dict(method="dpo", loss_type="dapo"), r"loss_type must be one of sigmoid, ipo, hinge"),
    (dict(method="ppo"), r"method must be one of sft, dpo, grpo"),
])
def test_a_method_and_flag_mismatch_is_one_clear_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_a_tiny_learning_rate_warns_why(tiny_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD * 4)
    with pytest.warns(UserWarning, match=r"lr 5e-06 is a full fine-tuning rate.*LoRA Without Regret"):
        train(dpo(tiny_lm_dir, tmp_path / "run", data, lr=5e-6, max_steps=1))


def test_cli_dpo_run_reports_accuracy(tiny_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD * 4)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--method", "dpo", "--model", str(tiny_lm_dir), "--data", str(data),
                                 "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                                 "--micro-batch-size", "2", "--rank", "2",
                                 "--eval-fraction", "0.25", "--beta", "0.2"])
    assert result.exit_code == 0, result.output
    assert "held-out reward accuracy" in result.output
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_bad_data_error_keeps_file_and_line_for_hub_style_tables(tmp_path):
    from lorakit.training.preference import check_pairs

    with pytest.raises(DataError, match=r"x row 0: a preference record needs"):
        check_pairs([("x row 0", {"prompt": "a"})], "x")


@pytest.mark.parametrize("variant", ["dora", "loha"])
def test_dpo_trains_every_kind_of_adapter(tiny_lm_dir, tmp_path, variant):
    """The reference is the adapter switched off whatever its kind: the first step's
    rewards are 0 (policy = reference) and later ones are not."""
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD * 4)
    train(dpo(tiny_lm_dir, tmp_path / "run", data, variant=variant, max_steps=3, eval_fraction=0, lr=2e-2))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(steps[0]["rewards/margins"]) < 1e-5
    assert abs(steps[-1]["rewards/margins"]) > 1e-4


def test_other_column_names_map_onto_a_preference_record(tiny_lm_dir, tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": i}
            for i, r in enumerate(STANDARD * 4)]
    data = write_jsonl(tmp_path / "table.jsonl", rows)
    result = train(dpo(tiny_lm_dir, tmp_path / "run", data, columns="prompt=question,chosen=good,rejected=bad",
                       max_steps=2))
    assert result.steps == 2 and (result.adapter / "adapter_model.safetensors").exists()

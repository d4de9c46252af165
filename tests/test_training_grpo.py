"""GRPO (training/grpo.py): advantages, loss and gradients equal TRL's GRPOTrainer on the same
prompts, completions and rewards; the engine's rollouts sample from the live weights (their
log-probabilities equal the trainer's, and an optimizer step shows in the very next rollout);
resume is bit-identical; rewards and bad input fail loudly."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit import LoraConfig
from lorakit.cli import app
from lorakit.config import ConfigError
from lorakit.training import TrainConfig, TrainingError, train
from lorakit.training.grpo import GrpoTask
from lorakit.training.policy import Completion, GrpoLoss, Prompt, advantages, collate_rollouts
from lorakit.training.rewards import load_reward, score

from conftest import assert_resumes_bit_identical, randomize_adapters
from test_training_dpo import assert_same_gradients, write_jsonl

G = 4
TEMP = 0.7
WORDS = ("hej", "tack", "bra")
TARGETS = ("q_proj", "v_proj", "up_proj")


def reward_length(completions, **columns):
    return [float(len(c)) for c in completions]


def reward_vowels(completions, answer, **columns):
    return [None if i % 5 == 0 else float(sum(ch in "aeiouyåäö" for ch in c)) - len(a) for i, (c, a)
            in enumerate(zip(completions, answer))]


def fixed_completions(tokenizer, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 7, (count,), generator=generator).tolist()
    return [torch.randint(5, 300, (n,), generator=generator).tolist() + ([tokenizer.eos_token_id] if n % 2 else [])
            for n in lengths]


def trl_rollout(tiny_lm_dir, tmp_path, beta: float, loss_type: str, records, completion_ids):
    """TRL's advantages and loss (and its PEFT model, gradients filled) on fixed completions."""
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)

    def rollout(prompts, trainer):
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        return {"prompt_ids": ids, "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids]}

    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "adapter",
                                            is_trainable=True)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=loss_type, num_generations=G,
                      per_device_train_batch_size=len(records) * G, report_to=[], use_cpu=True, bf16=False,
                      max_completion_length=8, temperature=TEMP, reward_weights=[1.0, 0.5])
    trainer = GRPOTrainer(model=theirs, reward_funcs=[reward_length, reward_vowels], args=args,
                          processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(records),
                          rollout_func=rollout)
    if "ref" in theirs.peft_config:  # TRL's copy of a handed-in adapter; lorakit's reference is the adapter off
        theirs.delete_adapter("ref")
    theirs.set_adapter("default")
    theirs.train()
    inputs = trainer._generate_and_score_completions([r for r in records for _ in range(G)])
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(theirs, inputs)
    loss.backward()
    return theirs, inputs, loss.detach(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta, loss_type", [(0.0, "dapo"), (0.2, "dapo"), (0.0, "grpo"), (0.1, "dr_grpo")])
def test_advantages_loss_and_gradients_equal_trl(tiny_lm_dir, tmp_path, beta, loss_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    lorakit.attach(ours, LoraConfig(rank=4, alpha=8, targets=TARGETS))
    randomize_adapters(ours, scale=0.2)
    lorakit.save_adapter(ours, tmp_path / "adapter")
    records = [{"prompt": f"Säg {w}", "answer": w} for w in WORDS]
    completion_ids = fixed_completions(tokenizer, len(records) * G)
    theirs, inputs, expected, logged = trl_rollout(tiny_lm_dir, tmp_path, beta, loss_type, records, completion_ids)

    config = TrainConfig(method="grpo", reward=("a:b", "c:d"), reward_weights="1,0.5", beta=beta,
                         loss_type=loss_type, num_generations=G, batch_size=len(records) * G,
                         micro_batch_size=len(records) * G, temperature=0.7, max_completion_length=8)
    prompts = [Prompt(tokenizer(r["prompt"])["input_ids"], r["prompt"], {"answer": r["answer"]}, f"r:{i}")
               for i, r in enumerate(records)]
    every = [p for p in prompts for _ in range(G)]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    rewards = torch.tensor(score([load_reward("test_training_grpo:reward_length"),
                                  load_reward("test_training_grpo:reward_vowels")],
                                 [p.prompt for p in every], texts, completion_ids,
                                 {"answer": [p.columns["answer"] for p in every]}, list(range(len(every)))))
    _, advantage = advantages(rewards, torch.tensor([1.0, 0.5]), G, "group")
    torch.testing.assert_close(advantage, inputs["advantages"], rtol=1e-5, atol=1e-6)

    completions = [Completion(ids, [0.0] * len(ids), clipped=False) for ids in completion_ids]
    batch = collate_rollouts(list(zip(every, completions)), advantage, tokenizer.pad_token_id)
    loss = GrpoLoss(ours.train(), config).eval()  # eval: no rollout check (these completions were not sampled)
    tokens = sum(len(c) for c in completion_ids)
    units = {"dapo": tokens, "grpo": len(completions), "dr_grpo": len(completions) * 8}[loss_type]
    actual = loss(batch) / units
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert_same_gradients(ours, theirs)
    if beta:
        assert loss.sums["kl"].item() / tokens == pytest.approx(logged["kl"], rel=1e-4, abs=1e-7)
        assert logged["kl"] > 1e-4  # the reference (adapter off) differs from the policy


def prompts_file(tmp_path, count=12):
    records = [{"prompt": [{"role": "user", "content": f"Säg {WORDS[i % 3]}"}], "answer": WORDS[i % 3]}
               for i in range(count)]
    return write_jsonl(tmp_path / "prompts.jsonl", records)


def grpo(model_dir, out, data, **changes):
    values = dict(model=str(model_dir), out=str(out), method="grpo", data=str(data), rank=4, alpha=8, max_steps=4,
                  batch_size=8, micro_batch_size=4, num_generations=4, lr=5e-3, save_every=2, eval_fraction=0.25,
                  reward=("normalized_match:answer", "length:4"), max_completion_length=6, log_every=1)
    return TrainConfig(**{**values, **changes})


def test_a_run_logs_trl_metrics_and_the_rollouts_match_the_trainer(tiny_lm_dir, tmp_path):
    result = train(grpo(tiny_lm_dir, tmp_path / "run", prompts_file(tmp_path), beta=0.05))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 4
    for name in ("reward", "reward_std", "rewards/normalized_match/mean", "rewards/length/std",
                 "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "kl",
                 "frac_reward_zero_std", "rollout/logprob_diff", "rollout/logprob_diff_max"):
        assert all(name in line for line in steps), name
    # the engine sampled from exactly the weights the trainer differentiates (float32, dropout off)
    assert max(line["rollout/logprob_diff_max"] for line in steps) < 1e-4
    assert all(line["rollout/weight_bytes_copied"] == 0 for line in steps)
    assert result.eval_reward_before is not None and result.eval_reward_after is not None
    assert {"eval_reward", "eval_rewards/length/mean"} <= set(lines[0])


def live_task(tiny_lm_dir, tmp_path):
    """A model with a fresh adapter and the GRPO task around it, on one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8))
    config = grpo(tiny_lm_dir, tmp_path / "run", "unused")
    prompt = Prompt(tokenizer("Säg hej")["input_ids"], "Säg hej", {"answer": "hej"}, "p:1")
    return model, tokenizer, config, prompt, GrpoTask(model, tokenizer, [prompt], [], config)


def test_the_next_rollout_reflects_an_optimizer_step(tiny_lm_dir, tmp_path):
    """Rollouts read the live tensors: after changing the adapter in place, the engine's
    sampling log-probabilities are those of the new weights (a stale copy would keep the old)."""
    model, tokenizer, config, prompt, task = live_task(tiny_lm_dir, tmp_path)
    task.loss_module()
    first = task.generate([prompt], [1, 2], 2)
    randomize_adapters(model, scale=0.5)  # what an optimizer step does: the same tensors, new values
    second = task.generate([prompt], [1, 2], 2)
    for before, after in zip(first, second):
        batch = collate_rollouts([(prompt, after)], torch.zeros(1), tokenizer.pad_token_id)
        from lorakit.training.sequences import token_logps

        with torch.no_grad():
            trainer = token_logps(model, batch.rows, config.get("temperature"))[batch.rows.targets != -100]
        torch.testing.assert_close(torch.tensor(after.sampled), trainer, rtol=0, atol=1e-4)
        assert before.ids != after.ids or not torch.allclose(torch.tensor(before.sampled), trainer, atol=1e-3)


def test_a_rollout_from_stale_weights_stops_the_run(tiny_lm_dir, tmp_path):
    model, tokenizer, config, prompt, task = live_task(tiny_lm_dir, tmp_path)
    loss = task.loss_module().train()
    completions = task.generate([prompt], [1, 2, 3, 4], 4)
    randomize_adapters(model, scale=1.0)  # the weights move after sampling, as with a stale generator
    batch = collate_rollouts([(prompt, c) for c in completions], torch.ones(4), tokenizer.pad_token_id)
    with pytest.raises(TrainingError, match=r"rollouts' log-probabilities differ from the trainer's by .* past "
                                            r"max_logprob_diff=0\.1"):
        loss(batch)


def test_killed_and_resumed_runs_are_bit_identical_sampling_included(tiny_lm_dir, tmp_path):
    data = prompts_file(tmp_path)
    full, partial = assert_resumes_bit_identical(
        lambda out: grpo(tiny_lm_dir, out, data, keep_checkpoints=3, temperature=1.2), tmp_path)
    rewards = {}
    for run in (full, partial):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rewards[run] = [(line["step"], line["loss"], line["reward"], line["completions/mean_length"])
                        for line in lines if "reward" in line and line["step"] > 2]
    assert rewards[full] == rewards[partial]  # the same completions were sampled after the restart


def broken(completions, **columns):
    raise KeyError("score")


def short(completions, **columns):
    return [1.0]


def test_a_reward_that_raises_or_miscounts_stops_with_its_name_nothing_lost(tiny_lm_dir, tmp_path, monkeypatch):
    data = prompts_file(tmp_path)
    for name, message in (("broken", r"reward broken raised KeyError: 'score' \(scoring the completions of prompt "
                                     r"\d+, \d+\) \[prompt \d+: .*prompts\.jsonl:\d+, \d+: .*prompts\.jsonl:\d+\]"),
                          ("short", r"reward short returned 1 values for 8 completions")):
        out = tmp_path / name
        with pytest.raises(TrainingError, match=message + r".*the step was not applied"):
            train(grpo(tiny_lm_dir, out, data, reward=(f"test_training_grpo:{name}",), eval_fraction=0))
        assert not (out / "adapter").exists()


def test_a_reward_file_path_is_imported(tmp_path):
    source = tmp_path / "my_rewards.py"
    source.write_text("def exact(completions, answer, **kw):\n    return [float(c == a) for c, a in "
                      "zip(completions, answer)]\n")
    reward = load_reward(f"{source}:exact")
    assert reward.function(completions=["a", "b"], answer=["a", "a"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("nowhere/rewards.py:fn", r"no such file nowhere/rewards\.py"),
    ("lorakit_no_such_module:fn", r"module 'lorakit_no_such_module' does not import"),
    ("json:no_such_function", r"json has no function 'no_such_function'"),
    ("format:[", r"not a regular expression"),
    ("justaname", r"expected path/to/file\.py:function"),
])
def test_a_reward_that_does_not_import_is_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward(spec)


def test_built_in_rewards():
    assert load_reward("match:answer").function(completions=[" 4 ", "5"], answer=["4", "4"]) == [1.0, 0.0]
    assert load_reward("normalized_match:answer").function(
        completions=[[{"role": "assistant", "content": "Paris!"}]], answer=["paris"]) == [1.0]
    assert load_reward(r"format:\d+").function(completions=["42", "42 apples"]) == [1.0, 0.0]
    assert load_reward("length:4").function(completion_ids=[[1, 2], [1] * 6]) == [0.0, -0.5]


runner = CliRunner()


@pytest.mark.parametrize("flags, message", [
    (["--num-generations", "1"], r"num_generations must be >= 2"),
    (["--precompute-ref"], r"--precompute-ref belongs to --method dpo, not grpo"),
    (["--reward", "missing/file.py:fn"], r"--reward 'missing/file\.py:fn': no such file"),
    (["--max-length", "4"], r"prompts\.jsonl:1: the prompt has \d+ tokens, more than max_length=4"),
    (["--max-completion-length", "1023"], r"prompts\.jsonl:1: the prompt has \d+ tokens; with "
                                        r"max_completion_length=1023 that passes the model's context of 1024 tokens"),
])
def test_bad_grpo_input_is_one_line_and_nothing_is_written(tiny_lm_dir, tmp_path, flags, message):
    data = prompts_file(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--method", "grpo", "--model", str(tiny_lm_dir), "--data", str(data), "--out", str(out),
            "--batch-size", "8", "--num-generations", "4", "--reward", "match:answer"]
    result = runner.invoke(app, [*args, *flags])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not out.exists()


def test_a_prompt_without_the_column_a_reward_reads_is_named(tiny_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Säg hej", "answer": "hej"}, {"prompt": "Säg tack"}])
    result = runner.invoke(app, ["train", "--method", "grpo", "--model", str(tiny_lm_dir), "--data", str(data),
                                 "--out", str(tmp_path / "run"), "--batch-size", "8", "--num-generations", "4",
                                 "--reward", "match:answer"])
    assert result.exit_code == 2
    assert re.search(r"prompts\.jsonl:2: no column 'answer'", " ".join(result.output.split())), result.output


def test_cli_grpo_run_reports_rewards(tiny_lm_dir, tmp_path):
    data = prompts_file(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--method", "grpo", "--model", str(tiny_lm_dir), "--data", str(data),
                                 "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--micro-batch-size",
                                 "4", "--num-generations", "4", "--reward", "match:answer", "--reward",
                                 "length:4", "--reward-weights", "1,0.1", "--max-completion-length", "6",
                                 "--eval-fraction", "0.25", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    assert "held-out reward" in result.output
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_prompts_per_step_must_split_over_the_processes(tiny_lm_dir, tmp_path):
    from lorakit.training.distributed import Processes

    model, tokenizer, config, prompt, _ = live_task(tiny_lm_dir, tmp_path)  # 8 completions, 4 each: 2 prompts
    GrpoTask(model, tokenizer, [prompt], [], config, Processes(0, 2, 0))
    with pytest.raises(TrainingError, match=r"2 prompts per step cannot be split over 3 processes"):
        GrpoTask(model, tokenizer, [prompt], [], config, Processes(0, 3, 0))


def test_a_qlora_base_trains_by_dpo_and_grpo(tiny_lm_dir, tmp_path):
    """An NF4 base (bfloat16 compute): the engine samples with the very same quantized
    weights the trainer differentiates, so the rollout check holds there too."""
    pytest.importorskip("torchao")
    data = prompts_file(tmp_path, count=8)
    train(grpo(tiny_lm_dir, tmp_path / "grpo", data, quantize="nf4", max_steps=2, eval_fraction=0, beta=0.1))
    lines = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["rollout/logprob_diff"] < 0.1 for line in lines if "loss" in line)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Säg hej", "chosen": " hej", "rejected": " nej"}] * 4)
    result = train(TrainConfig(model=str(tiny_lm_dir), out=str(tmp_path / "dpo"), method="dpo", data=str(pairs),
                               quantize="nf4", max_steps=2, batch_size=4, micro_batch_size=2, eval_fraction=0))
    assert result.steps == 2 and (result.adapter / "adapter_model.safetensors").exists()

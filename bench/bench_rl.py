"""DPO and GRPO with LoRA: lorakit against TRL + PEFT on the same model, adapter, data and settings.

The model is the embedded SmolLM2-135M-Instruct (float32, real weights), LoRA r=16 on every
linear layer, AdamW; both sides start from the same adapter (B random, so policy and
reference differ). Reported as ratios lorakit / TRL, the two interleaved in one process
(median over rounds), plus peak resident memory measured in a fresh process per side:

- DPO step (forward, reference with the adapter off, backward, AdamW) on 4 preference
  pairs built from chatterbot-corpus (English): TRL's ``DPOTrainer.compute_loss`` vs
  lorakit's ``DpoLoss``.
- GRPO rollouts: 4 prompts x 4 completions, up to 48 new tokens, temperature 1: TRL's own
  generation path without vLLM (``GRPOTrainer._generate``: transformers ``generate``) vs
  lorakit's serving engine on the live model (``GrpoTask.generate``); tokens per second.
- the whole GRPO step (rollouts, rewards, advantages, loss, backward, AdamW): TRL's
  ``training_step`` vs lorakit's step.
- bytes of weights copied between the trainer and the generator per step.

    python bench/bench_rl.py [--rounds 5] [--part dpo|grpo|all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved  # noqa: E402

RANK = 16
PAIRS = 4
PROMPTS, GENERATIONS, NEW_TOKENS = 4, 4, 48


def base_model():
    import lorakit

    return lorakit.load_model("smollm2-135m").train()


def adapter_dir() -> Path:
    """One random adapter both sides start from."""
    import lorakit

    directory = Path(tempfile.gettempdir()) / "lorakit-bench-rl-adapter"
    if not (directory / "adapter_model.safetensors").exists():
        model = base_model()
        lorakit.attach(model, lorakit.LoraConfig(rank=RANK, alpha=2 * RANK))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        lorakit.save_adapter(model, directory)
    return directory


def ours():
    import lorakit

    model = base_model()
    lorakit.load_adapter(model, adapter_dir())
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def theirs():
    import peft

    return peft.PeftModel.from_pretrained(base_model(), adapter_dir(), is_trainable=True)


def pair_records() -> list[dict]:
    from lorakit.training.corpus import preference_pairs

    return preference_pairs("english")[:PAIRS]


def prompt_records() -> list[dict]:
    from lorakit.training.corpus import conversations

    return [{"prompt": [{"role": "user", "content": r["messages"][0]["content"]}], "answer": "yes"}
            for r in conversations("english")[:PROMPTS]]


def length_reward(completions, **columns):
    return [-abs(len(c[0]["content"]) - 40) / 40 for c in completions]


# -- DPO ------------------------------------------------------------------------------
def dpo_steps():
    import datasets
    from trl import DPOConfig, DPOTrainer

    import lorakit
    from lorakit.training.preference import DpoLoss, build_pairs, collate_pairs

    tokenizer = lorakit.load_tokenizer("smollm2-135m")
    records = pair_records()
    model_ours, model_theirs = ours(), theirs()
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(model=model_theirs, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(records),
                             args=DPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, beta=0.1,
                                            per_device_train_batch_size=PAIRS))
    if "ref" in model_theirs.peft_config:  # the reference is the adapter switched off on both sides
        model_theirs.delete_adapter("ref")
    model_theirs.set_adapter("default")
    model_theirs.train()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    batch = collate_pairs(build_pairs([(str(i), r) for i, r in enumerate(records)], tokenizer, 1024, "b").pairs,
                          tokenizer.pad_token_id)
    loss = DpoLoss(model_ours, 0.1, "sigmoid")
    optimizers = {side: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for side, m in (("lorakit", model_ours), ("TRL", model_theirs))}

    def step_ours():
        (loss(batch) / PAIRS).backward()
        optimizers["lorakit"].step()
        optimizers["lorakit"].zero_grad()

    def step_theirs():
        trainer.compute_loss(model_theirs, inputs).backward()
        optimizers["TRL"].step()
        optimizers["TRL"].zero_grad()

    return {"lorakit": step_ours, "TRL": step_theirs}


# -- GRPO -----------------------------------------------------------------------------
def grpo_sides(out: str):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    import lorakit
    from lorakit.training import TrainConfig
    from lorakit.training.grpo import GrpoTask
    from lorakit.training.policy import Prompt
    from lorakit.training.loop import accumulate

    tokenizer = lorakit.load_tokenizer("smollm2-135m")
    records = prompt_records()
    model_ours, model_theirs = ours(), theirs()
    config = TrainConfig(method="grpo", model="smollm2-135m", reward=("bench_rl:length_reward",), out=out,
                         num_generations=GENERATIONS, batch_size=PROMPTS * GENERATIONS,
                         micro_batch_size=PROMPTS * GENERATIONS, max_completion_length=NEW_TOKENS, lr=1e-5)
    prompts = [Prompt(tokenizer.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"], r["prompt"],
                      {"answer": r["answer"]}, f"record {i}") for i, r in enumerate(records)]
    task = GrpoTask(model_ours, tokenizer, prompts * 8, [], config)
    loss = task.loss_module()
    optimizer = torch.optim.AdamW([p for p in model_ours.parameters() if p.requires_grad], lr=1e-5)
    trainer = GRPOTrainer(model=model_theirs, reward_funcs=[length_reward], processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(records * 8),
                          args=GRPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False,
                                          num_generations=GENERATIONS, max_completion_length=NEW_TOKENS,
                                          per_device_train_batch_size=PROMPTS * GENERATIONS, learning_rate=1e-5,
                                          gradient_checkpointing=False, temperature=1.0))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # what its training loop sets before a step
    model_theirs.train()
    rows = [r for r in records for _ in range(GENERATIONS)]
    counters = {"lorakit": [0, 0.0], "TRL": [0, 0.0]}  # tokens, seconds of generation
    step = [0]

    def rollout_ours():
        started = time.perf_counter()
        completions = task.generate(prompts, task.seeds(step[0], list(range(PROMPTS))), GENERATIONS)
        step[0] += 1
        counters["lorakit"][0] += sum(len(c.ids) for c in completions)
        counters["lorakit"][1] += time.perf_counter() - started

    def rollout_theirs():
        started = time.perf_counter()
        with torch.no_grad():
            generated = trainer._generate([r["prompt"] for r in rows])
        counters["TRL"][0] += sum(len(ids) for ids in generated[1])
        counters["TRL"][1] += time.perf_counter() - started

    def step_ours():
        batches, units, _ = task.batches(step[0], task.processes, torch.device("cpu"))
        step[0] += 1
        accumulate(loss, batches, units, 1, torch.autocast("cpu", enabled=False))
        optimizer.step()
        optimizer.zero_grad()

    def step_theirs():
        trainer.training_step(model_theirs, rows, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return {"lorakit": rollout_ours, "TRL": rollout_theirs}, {"lorakit": step_ours, "TRL": step_theirs}, counters, task


# -- memory ---------------------------------------------------------------------------
def peak_of(part: str, side: str) -> int:
    """Peak resident bytes of a fresh process that builds ``side`` and runs 3 of its steps."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_rl; "
            f"bench_rl.measure_peak({part!r}, {side!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def measure_peak(part: str, side: str) -> None:
    """The peak resident memory of the steps alone: VmHWM reset once everything is built."""
    from lorakit.training.loop import peak_memory, reset_peak_memory

    with tempfile.TemporaryDirectory() as out:
        steps = dpo_steps() if part == "dpo" else grpo_sides(out)[1]
        steps[side]()  # first step: lazily built state (optimizer moments, the engine) is part of training
        reset_peak_memory(torch.device("cpu"))
        for _ in range(3):
            steps[side]()
        print(peak_memory(torch.device("cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part", choices=("dpo", "grpo", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    results = {}
    if args.part in ("dpo", "all"):
        medians = interleaved(dpo_steps(), args.rounds, warmup=1)
        peaks = {side: peak_of("dpo", side) for side in ("TRL", "lorakit")}
        results["dpo"] = {"step_s": medians, "step_ratio": medians["lorakit"] / medians["TRL"],
                          "peak_bytes": peaks, "peak_ratio": peaks["lorakit"] / peaks["TRL"]}
    if args.part in ("grpo", "all"):
        with tempfile.TemporaryDirectory() as out:
            rollouts, steps, counters, task = grpo_sides(out)
            interleaved(rollouts, args.rounds, warmup=1)
            rates = {side: tokens / seconds for side, (tokens, seconds) in counters.items()}
            medians = interleaved(steps, args.rounds, warmup=1)
            copied = task.weight_bytes_copied()
        results["grpo"] = {"rollout_tokens_per_s": rates, "rollout_ratio": rates["lorakit"] / rates["TRL"],
                           "step_s": medians, "step_ratio": medians["lorakit"] / medians["TRL"],
                           "weight_bytes_copied_per_step": {"lorakit": copied, "TRL (transformers generate)": 0}}
    print(json.dumps(results, indent=2))
    lines = ["| measure | lorakit | TRL + PEFT | lorakit / TRL |", "|---|---:|---:|---:|"]
    if "dpo" in results:
        d = results["dpo"]
        lines.append(f"| DPO step, s | {d['step_s']['lorakit']:.3f} | {d['step_s']['TRL']:.3f} | {d['step_ratio']:.2f} |")
        lines.append(f"| DPO peak memory, MiB | {d['peak_bytes']['lorakit'] / 2**20:.0f} | "
                     f"{d['peak_bytes']['TRL'] / 2**20:.0f} | {d['peak_ratio']:.2f} |")
    if "grpo" in results:
        g = results["grpo"]
        lines.append(f"| GRPO rollout, tokens/s | {g['rollout_tokens_per_s']['lorakit']:.0f} | "
                     f"{g['rollout_tokens_per_s']['TRL']:.0f} | {g['rollout_ratio']:.2f} |")
        lines.append(f"| GRPO step, s | {g['step_s']['lorakit']:.2f} | {g['step_s']['TRL']:.2f} | "
                     f"{g['step_ratio']:.2f} |")
        lines.append(f"| weight bytes copied to the generator per step | "
                     f"{g['weight_bytes_copied_per_step']['lorakit']} | 0 (no vLLM) | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

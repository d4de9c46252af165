"""Preference and RL training on the embedded SmolLM2-135M-Instruct, on 2 CPU cores.

GRPO: the model answers chatterbot-corpus questions (English) asked for "one short line";
a verifiable reward scores each sampled answer — 1 if it is a single line of at most 80
characters ending in . ! or ?, minus a penalty past 24 tokens — and GRPO trains a LoRA
adapter on it, rollouts sampled by lorakit's engine on the live adapter. Prints the mean
held-out reward (greedy) before and after, and draws the reward curve.

DPO: preference pairs built from the same corpus (a question, its own answer as chosen,
an answer from another topic as rejected); prints how often the model ranks the chosen
answer above the rejected one (per-token log-probability) on held-out pairs, before and
after, and DPO's held-out reward accuracy.

    python examples/demo_rl.py [--out runs/demo-rl] [--part grpo|dpo|all]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import lorakit
from lorakit.training import TrainConfig
from lorakit.training.corpus import conversations

MODEL = "smollm2-135m"
INSTRUCTION = " Answer in one short line."
FORMAT = r"[^\n]{1,80}[.!?]"  # one line, at most 80 characters, a full stop at the end


def prompts_file(path: Path) -> Path:
    """Questions from chatterbot-corpus (English), each asked for one short line; one per
    distinct question."""
    seen, records = set(), []
    for dialog in conversations("english"):
        question = dialog["messages"][0]["content"]
        if question.lower() not in seen:
            seen.add(question.lower())
            records.append({"prompt": [{"role": "user", "content": question + INSTRUCTION}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grpo(out: Path) -> None:
    data = prompts_file(out.parent / "grpo-prompts.jsonl")
    config = TrainConfig(model=MODEL, method="grpo", data=str(data), out=str(out), rank=16, alpha=32,
                         max_steps=24, batch_size=16, micro_batch_size=16, num_generations=4, lr=2e-4,
                         max_completion_length=40, temperature=1.0, beta=0.0, reward=(f"format:{FORMAT}", "length:24"),
                         reward_weights="1,0.5", eval_fraction=0.02, eval_every=8, save_every=12, log_every=1,
                         schedule="constant")
    started = time.perf_counter()
    result = lorakit.train(config)
    print(f"[grpo]    {result.steps} steps in {time.perf_counter() - started:.0f} s, rollouts "
          f"{result.rollout_tokens_per_second:.0f} tokens/s from the live adapter")
    print(f"[grpo]    held-out reward (greedy, {FORMAT!r} + length): {result.eval_reward_before:.3f} -> "
          f"{result.eval_reward_after:.3f}")
    plot_rewards(out / "metrics.jsonl", out / "reward.png")
    print(f"[grpo]    reward curve: {out / 'reward.png'}")


def plot_rewards(metrics: Path, picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [line for line in lines if "reward" in line]
    held_out = [(line["step"], line["eval_reward"]) for line in lines if "eval_reward" in line]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([s["step"] for s in steps], [s["reward"] for s in steps], label="rollout reward (sampled)")
    axes.plot(*zip(*held_out), "o-", label="held-out reward (greedy)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("reward")
    axes.set_title("GRPO on SmolLM2-135M-Instruct, LoRA r=16")
    axes.legend()
    figure.tight_layout()
    figure.savefig(picture, dpi=110)
    plt.close(figure)


def ranked_first(model, pairs) -> float:
    """Share of pairs whose chosen answer has the higher mean per-token log-probability."""
    from lorakit.training.preference import collate_pairs
    from lorakit.training.sequences import token_logps

    wins = 0
    tokenizer_pad = 0
    for start in range(0, len(pairs), 8):
        batch = collate_pairs(pairs[start:start + 8], tokenizer_pad)
        with torch.no_grad():
            mean = token_logps(model, batch.rows).sum(-1) / batch.completion_tokens
        chosen, rejected = mean.chunk(2)
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def dpo(out: Path) -> None:
    from lorakit.training.corpus import preference_pairs
    from lorakit.training.preference import build_pairs, split_pairs

    config = TrainConfig(model=MODEL, method="dpo", language="english", out=str(out), rank=16, alpha=32,
                         max_steps=20, batch_size=8, micro_batch_size=8, lr=2e-4, beta=0.1, eval_fraction=0.03,
                         save_every=10, log_every=5, max_length=128)
    tokenizer = lorakit.load_tokenizer(MODEL)
    where = "chatterbot-corpus/english"
    pairs = build_pairs([(f"{where}[{i}]", r) for i, r in enumerate(preference_pairs("english"))], tokenizer,
                        config.max_length, where)
    _, held_out = split_pairs(pairs, config.eval_fraction, config.seed)  # the pairs the run holds out
    model = lorakit.load_model(MODEL)
    before = ranked_first(model, held_out.pairs)
    started = time.perf_counter()
    result = lorakit.train(config)
    print(f"[dpo]     {result.steps} steps of {config.batch_size} pairs in {time.perf_counter() - started:.0f} s")
    lorakit.load_adapter(model, result.adapter)
    after = ranked_first(model, held_out.pairs)
    print(f"[dpo]     {len(held_out.pairs)} held-out pairs: chosen ranked above rejected {before:.0%} -> {after:.0%}; "
          f"DPO reward accuracy {result.eval_accuracy_before:.0%} -> {result.eval_accuracy_after:.0%} "
          "(0 % at the start: the policy is its reference)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/demo-rl")
    parser.add_argument("--part", choices=("grpo", "dpo", "all"), default="all")
    args = parser.parse_args()
    root = Path(args.out)
    if root.exists():  # the demo's own directory: start over rather than resume a finished run
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if args.part in ("grpo", "all"):
        grpo(root / "grpo")
    if args.part in ("dpo", "all"):
        dpo(root / "dpo")


if __name__ == "__main__":
    main()

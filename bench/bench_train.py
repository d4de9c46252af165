"""Training-step cost of lorakit LoRA vs PEFT LoRA vs full fine-tuning, and their peak memory.

All variants train the same model (SmolLM2-135M's architecture, random weights, float32)
on the same batch: 8 Swedish dialogs from chatterbot-corpus in SmolLM2's chat template,
padded, with only the assistant turns trained. lorakit runs its own training step
(``lorakit.training.loop.accumulate``: padding-free rows, output head only where a
token is trained); PEFT and full fine-tuning run the usual transformers step
(``model(input_ids, attention_mask, labels).loss``). Full fine-tuning also runs on
lorakit's step, to show what LoRA itself saves. Each step is
forward + backward + AdamW. The variants are interleaved in one process, every round
in rotating order, and the table reports the median over rounds. Peak resident memory
is measured in a fresh process per variant (the peak of a process never goes down).

    python bench/bench_train.py [--rounds 5] [--layers 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved, table  # noqa: E402

RANK = 16


def build(layers: int):
    from transformers import AutoModelForCausalLM

    from lorakit.pretrained import load_config

    config = load_config("smollm2-135m")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def make_batch(size: int):
    """The same examples as a lorakit batch and as a transformers batch (padded, labels -100)."""
    import lorakit
    from lorakit.training.batches import collate
    from lorakit.training.corpus import conversations
    from lorakit.training.data import IGNORE, build_dataset

    tokenizer = lorakit.load_tokenizer("smollm2-135m")
    records = conversations("swedish")[:size]
    examples = build_dataset([(str(i), r) for i, r in enumerate(records)], tokenizer, 512).examples
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((size, width), dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    labels = torch.full((size, width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, :len(e.input_ids)] = 1
        labels[row, :len(e.input_ids)] = torch.tensor(e.labels)
    return collate([(e,) for e in examples]), dict(input_ids=ids, attention_mask=mask, labels=labels)


def lorakit_step(base, batch, lora: bool = True, variant: str = "lora"):
    import lorakit
    from lorakit.training.loop import accumulate
    from lorakit.training.loss import LossModule

    if lora:
        lorakit.attach(base, lorakit.LoraConfig(rank=RANK, alpha=2 * RANK, variant=variant))
    runner = LossModule(base)
    optimizer = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-5)

    def call():
        accumulate(runner, [batch], batch.tokens, 1, nullcontext())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return call


def transformers_step(model, inputs):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def call():
        model(**inputs, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return call


def peft_model(base):
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))


def variants(ours, theirs):
    """Name -> function that turns a fresh copy of the base model into a step."""
    return {
        "full fine-tuning": lambda model: transformers_step(model, theirs),
        "peft LoRA": lambda model: transformers_step(peft_model(model), theirs),
        "lorakit LoRA": lambda model: lorakit_step(model, ours),
        "full fine-tuning, lorakit step": lambda model: lorakit_step(model, ours, lora=False),
    }


def peak_rss(variant: str, layers: int, batch: int, steps: int = 3) -> int:
    """Peak resident bytes of a fresh process that builds the model and runs ``steps`` steps."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_train as b; "
            f"b.memory_run({variant!r}, {layers}, {batch}, {steps})")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def memory_run(variant: str, layers: int, batch: int, steps: int) -> None:
    ours, theirs = make_batch(batch)
    step = variants(ours, theirs)[variant](build(layers))
    for _ in range(steps):
        step()
    from lorakit.training.loop import peak_memory

    print(peak_memory(torch.device("cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    ours, theirs = make_batch(args.batch)
    base = build(args.layers)
    steps = {name: make(copy.deepcopy(base)) for name, make in variants(ours, theirs).items()}
    del base
    print(f"SmolLM2-135M architecture ({args.layers} layers, random weights, fp32); LoRA r={RANK} on all linear "
          f"layers; batch of {args.batch} dialogs, {tuple(theirs['input_ids'].shape)} padded, {ours.length} real "
          f"tokens, {ours.tokens} trained; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"median of {args.rounds} interleaved rounds\n")
    medians = interleaved(steps, args.rounds, warmup=1)
    print(table("Training step (forward + backward + AdamW)", medians, "full fine-tuning"))
    print(f"\nlorakit / peft LoRA step: {medians['lorakit LoRA'] / medians['peft LoRA']:.3f}; lorakit LoRA / "
          f"full fine-tuning on the same lorakit step: "
          f"{medians['lorakit LoRA'] / medians['full fine-tuning, lorakit step']:.3f}")
    del steps

    memory = {name: peak_rss(name, args.layers, args.batch) for name in variants(ours, theirs)}
    print("\n### Peak resident memory (fresh process each, model + 3 steps)\n")
    print("| variant | peak RSS MiB | ratio to full fine-tuning |\n|---|---:|---:|")
    for name, size in memory.items():
        print(f"| {name} | {size / 2**20:,.0f} | {size / memory['full fine-tuning']:.3f} |")


if __name__ == "__main__":
    main()

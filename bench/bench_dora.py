"""DoRA's cost: lorakit's DoRA training step against PEFT's, and DoRA inference against LoRA.

The same model (SmolLM2-135M's architecture, ``--layers`` blocks, random float32 weights)
and batch (8 Swedish dialogs) as bench_train.py, r=16 on all linear layers. Training steps
(forward + backward + AdamW) are each tool's usual one: lorakit's own step, PEFT's the
transformers step; their plain-LoRA steps are measured beside them, so the table also shows
what DoRA adds within each tool. Inference: one forward pass of the padded batch without
gradients (eval mode), lorakit DoRA unmerged / lorakit LoRA unmerged. All variants
interleaved in one process, median of ``--rounds``.

    python bench/bench_dora.py [--rounds 5] [--layers 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved, table  # noqa: E402
from bench_train import RANK, build, lorakit_step, make_batch, transformers_step  # noqa: E402


def lorakit_model(base, variant: str):
    import lorakit

    lorakit.attach(base, lorakit.LoraConfig(rank=RANK, alpha=2 * RANK, variant=variant))
    return base


def peft_model(base, dora: bool):
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear",
                                                     use_dora=dora))


def forward(model, inputs):
    model.eval()

    def call():
        with torch.no_grad():
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    return call


def synchronized(call, device: str):
    def run():
        call()
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ours, theirs = make_batch(8)
    base = build(args.layers).to(args.device)
    ours, theirs = ours.to(args.device), {k: v.to(args.device) for k, v in theirs.items()}
    steps = {
        "peft DoRA": transformers_step(peft_model(copy.deepcopy(base), True), theirs),
        "lorakit DoRA": lorakit_step(copy.deepcopy(base), ours, variant="dora"),
        "peft LoRA": transformers_step(peft_model(copy.deepcopy(base), False), theirs),
        "lorakit LoRA": lorakit_step(copy.deepcopy(base), ours),
    }
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"SmolLM2-135M architecture ({args.layers} layers, random weights, fp32); r={RANK} all linear; batch of 8 "
          f"dialogs, {tuple(theirs['input_ids'].shape)} padded; {where}; torch {torch.__version__}; median of "
          f"{args.rounds} interleaved rounds\n")
    medians = interleaved({k: synchronized(v, args.device) for k, v in steps.items()}, args.rounds, warmup=1)
    print(table("Training step (forward + backward + AdamW)", medians, "peft DoRA"))
    print(f"\nlorakit DoRA / PEFT DoRA step: {medians['lorakit DoRA'] / medians['peft DoRA']:.3f} (target <= 0.8); "
          f"DoRA / LoRA step: lorakit {medians['lorakit DoRA'] / medians['lorakit LoRA']:.3f}, "
          f"PEFT {medians['peft DoRA'] / medians['peft LoRA']:.3f}")
    del steps
    models = {"lorakit LoRA": lorakit_model(copy.deepcopy(base), "lora"),
              "lorakit DoRA": lorakit_model(copy.deepcopy(base), "dora")}
    for model in models.values():  # a trained-looking adapter: B nonzero, m away from the norm
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.01)
                elif "magnitude" in name:
                    p.mul_(1.01)
    calls = {name: synchronized(forward(model, theirs), args.device) for name, model in models.items()}
    medians = interleaved(calls, args.rounds)
    print("\n" + table("Inference forward, unmerged", medians, "lorakit LoRA"))
    print(f"\nlorakit DoRA / LoRA unmerged forward: {medians['lorakit DoRA'] / medians['lorakit LoRA']:.3f} "
          f"(target <= 1.15)")


if __name__ == "__main__":
    main()

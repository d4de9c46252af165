"""Forward and training-step cost of lorakit vs the base model, PEFT and full fine-tuning.

All variants run on the same Qwen2-style model (random weights) and the same batch,
interleaved in one process: every round runs each variant once, in rotating order,
and the table reports the median over rounds and its ratio to the reference.

    python bench/bench_core.py [--rounds 7] [--hidden 1024] [--layers 4] [--batch 4] [--seq 128]
                                [--forward-only] [--orders]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from unittest.mock import patch

import torch


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each variant, measured round-robin."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title: str, medians: dict[str, float], reference: str) -> str:
    lines = [f"### {title}", "", "| variant | median ms | ratio to " + reference + " |", "|---|---:|---:|"]
    for name, seconds in medians.items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / medians[reference]:.3f} |")
    return "\n".join(lines)


def forward_variants(base, rank: int, batch: torch.Tensor) -> dict[str, Callable[[], None]]:
    import peft

    import lorakit

    unmerged = copy.deepcopy(base)
    lorakit.attach(unmerged, lorakit.LoraConfig(rank=rank, alpha=2 * rank))
    for p in (p for n, p in unmerged.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.01)  # a trained-looking adapter, so nothing is skipped
    merged = copy.deepcopy(unmerged)
    lorakit.merge(merged)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)).eval()

    def run(model):
        def call():
            with torch.inference_mode():
                model(batch)
        return call

    return {"base": run(base), "lorakit unmerged": run(unmerged), "lorakit merged": run(merged),
            "peft unmerged": run(theirs)}


def order_variants(base, rank: int, batch: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The unmerged forward with one adapter both ways: its update written first and the
    base product accumulated onto it (lorakit's path), and the base output first with the
    update accumulated onto that (the path of several adapters, forced here)."""
    import lorakit
    from lorakit.layers import LoraLayer

    unmerged = copy.deepcopy(base)
    lorakit.attach(unmerged, lorakit.LoraConfig(rank=rank, alpha=2 * rank))
    for p in (p for n, p in unmerged.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.01)

    def run(model, update_first: bool):
        def call():
            general = nullcontext() if update_first else patch.object(LoraLayer, "sole_plain_adapter",
                                                                        lambda layer, x: None)
            with general, torch.inference_mode():
                model(batch)
        return call

    return {"base": run(base, True), "unmerged, update first": run(unmerged, True),
            "unmerged, base first": run(unmerged, False)}


def step_variants(base, rank: int, batch: torch.Tensor) -> dict[str, Callable[[], None]]:
    import peft

    import lorakit

    ours = copy.deepcopy(base).train()
    lorakit.attach(ours, lorakit.LoraConfig(rank=rank, alpha=2 * rank))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear")).train()
    full = copy.deepcopy(base).train()

    def step(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def call():
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return call

    return {"full fine-tuning": step(full), "lorakit LoRA": step(ours), "peft LoRA": step(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--forward-only", action="store_true", help="skip the training-step table")
    parser.add_argument("--orders", action="store_true",
                        help="only the unmerged forward with the update first against the base output first")
    args = parser.parse_args()

    base = build_model(args.hidden, args.layers, args.vocab)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    print(f"Qwen2-style model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"LoRA r={args.rank} on all linear layers; batch {args.batch}x{args.seq}; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; median of {args.rounds} interleaved rounds\n")
    if args.orders:
        print(table("Order of the sums, one adapter", interleaved(order_variants(base, args.rank, batch), args.rounds),
                    "base"))
        return
    print(table("Forward (inference)", interleaved(forward_variants(base, args.rank, batch), args.rounds), "base"))
    if args.forward_only:
        return
    print()
    print(table("Training step (forward + backward + AdamW)",
                interleaved(step_variants(base, args.rank, batch), args.rounds), "peft LoRA"))


if __name__ == "__main__":
    main()

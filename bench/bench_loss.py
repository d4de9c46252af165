"""Chunked against whole-vocabulary loss: peak memory and time of a LoRA training step.

SmolLM2-135M's shapes (49,152-word vocabulary, random weights), a float32 or bfloat16
base (float32 adapters either way), LoRA r=16 on all linear layers, every one of
batch x seq tokens trained.

- memory: one fresh process per variant; the peak resident memory of a training step
  above the memory before it, and of the backbone's forward pass alone (the activations
  every loss adds to: the lowest ratio any loss could reach) (kernel high-water mark, reset after the model is built;
  glibc set to return large freed blocks at once, see bench_plan.py);
- time: both variants in one process, interleaved, median over rounds.

    python bench/bench_loss.py [--batch 8] [--seq 512] [--rounds 5] [--checkpointing] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_plan import fresh_process_bytes, rss


def setup(batch: int, seq: int, checkpointing: bool, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.pretrained import load_config
    from lorakit.training.batches import Batch
    from lorakit.training.text import checkpoint_activations

    torch.manual_seed(0)
    config = load_config("smollm2-135m")
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).train()
    lorakit.attach(model, lorakit.LoraConfig(rank=16, alpha=32))
    if checkpointing:
        checkpoint_activations(model)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, Batch(ids, torch.arange(seq).expand(batch, seq), ids, batch * seq)


def step(model, batch, chunk: int) -> None:
    from lorakit.training.loss import loss_sum

    loss_sum(model, batch, chunk).backward()
    model.zero_grad(set_to_none=True)


def peak(chunk: int, batch: int, seq: int, checkpointing: bool, dtype: str) -> int:
    """The step's peak; for ``chunk`` < 0, the backbone's forward alone (what any loss adds to)."""
    import torch

    from lorakit.training.loop import reset_peak_memory
    from lorakit.training.loss import split_head

    model, batch_ = setup(batch, seq, checkpointing, dtype)
    reset_peak_memory(torch.device("cpu"))
    before = rss("VmRSS")
    if chunk < 0:
        backbone, _ = split_head(model)
        backbone(input_ids=batch_.input_ids, position_ids=batch_.position_ids, use_cache=False)[0]
    else:
        step(model, batch_, chunk)
    return rss("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the base's dtype")
    parser.add_argument("--peak", type=int, help=argparse.SUPPRESS)  # chunk: measure in this process
    args = parser.parse_args()
    if args.peak is not None:
        print(peak(args.peak, args.batch, args.seq, args.checkpointing, args.dtype))
        return

    from lorakit.pretrained import load_config
    from lorakit.training.loss import CHUNK_LOGITS, chunk_tokens

    variants = {"whole": 0, "chunked": CHUNK_LOGITS}
    peaks = {name: fresh_process_bytes(__file__, "--peak", str(chunk), "--batch", str(args.batch), "--seq",
                                       str(args.seq), "--dtype", args.dtype,
                                       *(["--checkpointing"] if args.checkpointing else []))
             for name, chunk in {**variants, "forward": -1}.items()}

    model, batch = setup(args.batch, args.seq, args.checkpointing, args.dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, chunk in variants.items():  # warm-up
        step(model, batch, chunk)
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            start = time.perf_counter()
            step(model, batch, variants[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}

    chunk = chunk_tokens(load_config("smollm2-135m").vocab_size)
    checkpointing = ", gradient checkpointing" if args.checkpointing else ""
    print(f"SmolLM2-135M shapes, {args.dtype} base, LoRA r=16, {args.batch} x {args.seq} tokens all trained, "
          f"chunks of {chunk} tokens{checkpointing}; memory: fresh process per variant; "
          f"time: median of {args.rounds} interleaved\n")
    print("| loss | step peak MiB | step median s |")
    print("|---|---:|---:|")
    for name in variants:
        print(f"| {name} | {peaks[name] / 2**20:,.0f} | {medians[name]:.2f} |")
    print(f"| chunked / whole | {peaks['chunked'] / peaks['whole']:.3f} "
          f"| {medians['chunked'] / medians['whole']:.3f} |")
    print(f"| the forward's activations alone / whole: no loss goes lower "
          f"| {peaks['forward'] / peaks['whole']:.3f} | |")


if __name__ == "__main__":
    main()

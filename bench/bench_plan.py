"""The memory planner against measured peaks: SmolLM2-135M shapes, one fresh process per run.

Each run builds the model (random weights: memory does not depend on their values),
records its resident memory, then resets the kernel's high-water mark
(/proc/self/clear_refs) and takes two training steps (AdamW allocates its state in the
first) with every token trained. The measured peak is the high-water mark above the
memory before the model was built; the planner's estimate is for the same run.

The runs set MALLOC_MMAP_THRESHOLD_ so that glibc returns every large freed block to
the system at once: by default it raises the threshold after the first large free and
keeps later blocks in its heap, and the resident size then reports the allocator's
cache rather than what the tensors need (CUDA's max_memory_allocated has no such cache).

    python bench/bench_plan.py [--batch 4] [--seq 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

RUNS = [("full", False), ("full", True), ("lora", False), ("lora", True), ("qlora", False), ("qlora", True)]
SPEC = "smollm2-135m"


def rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def fresh_process_bytes(script: str, *args: str) -> int:
    """Run ``script`` with ``args`` in a new process, glibc returning large freed blocks at once
    (see above), and read the byte count it prints last."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}).stdout
    return int(out.strip().splitlines()[-1])


def measure(method: str, checkpointing: bool, batch: int, seq: int, rank: int) -> int:
    """Peak bytes of two training steps above the memory before the model existed.

    A one-block model of the same kind first takes the same steps on a few tokens, so
    that the code the libraries load on first use (kernels, JIT-compiled routines) is
    resident before the baseline is read: it is the process's memory, not the model's."""
    import torch

    from lorakit.pretrained import load_config

    torch.manual_seed(0)
    config = load_config(SPEC)
    _measure(type(config)(**dict(config.to_dict(), num_hidden_layers=1)), method, checkpointing, 1, 8, rank)
    return _measure(config, method, checkpointing, batch, seq, rank)


def _measure(config, method: str, checkpointing: bool, batch: int, seq: int, rank: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.quantize import quantize_model
    from lorakit.training.batches import Batch
    from lorakit.training.loop import reset_peak_memory
    from lorakit.training.text import checkpoint_activations
    from lorakit.training.loss import loss_sum

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    batch_ = Batch(ids, torch.arange(seq).expand(batch, seq), ids, batch * seq)
    before = rss("VmRSS")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if method == "qlora" else torch.float32)
    if method == "qlora":
        quantize_model(model, "nf4")
    if method == "full":
        model.requires_grad_(True)
    else:
        lorakit.attach(model, lorakit.LoraConfig(rank=rank, alpha=2 * rank))
    model.train()
    if checkpointing:
        checkpoint_activations(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    reset_peak_memory(torch.device("cpu"))  # the high-water mark restarts here, after the model was built
    for _ in range(2):
        loss_sum(model, batch_).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return rss("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # method,checkpointing: measure in this process
    args = parser.parse_args()
    if args.one:
        method, checkpointing = args.one.split(",")
        print(measure(method, checkpointing == "1", args.batch, args.seq, args.rank))
        return

    import torch

    from lorakit.plan import plan

    rows = []
    print(f"{SPEC}: batch {args.batch} x {args.seq} tokens, all trained; rank {args.rank}; CPU RSS high-water mark\n")
    print("| method | checkpointing | planned MiB | measured MiB | planned / measured |")
    print("|---|---|---:|---:|---:|")
    for method, checkpointing in RUNS:
        measured = fresh_process_bytes(__file__, "--one", f"{method},{int(checkpointing)}", "--batch", str(args.batch),
                                       "--seq", str(args.seq), "--rank", str(args.rank))
        dtype = torch.bfloat16 if method == "qlora" else torch.float32
        planned = plan(SPEC, method, args.rank, args.batch, args.seq, dtype, checkpointing).peak_bytes
        rows.append(dict(method=method, checkpointing=checkpointing, planned_bytes=planned, measured_bytes=measured))
        print(f"| {method} | {'yes' if checkpointing else 'no'} | {planned / 2**20:,.0f} | {measured / 2**20:,.0f} "
              f"| {planned / measured:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()

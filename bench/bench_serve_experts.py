"""A served mixture-of-experts model's forward with many adapters in one batch (serve/slot_experts.py).

A Qwen3-MoE model (random weights, 2 blocks, 32 experts, 4 per token) with 8 expert adapters of
rank 8 loaded in slots; 16 rows, row i on adapter i mod 8, against the same rows on the base
(every row BASE, the slotted model otherwise the same). Two shapes: one decode step (one token
per row) and a prefill of 64 tokens per row. Interleaved rounds, medians.

    python bench/bench_serve_experts.py [--rounds 41]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def served_model(adapters: int, root: Path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import lorakit
    from lorakit.serve.slots import enable_slots
    from lorakit.serve.store import AdapterStore

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=32,
                            num_experts_per_tok=4, max_position_embeddings=256)
    base = Qwen3MoeForCausalLM(config).eval()
    for i in range(adapters):
        model = copy.deepcopy(base)
        lorakit.attach(model, lorakit.LoraConfig(rank=8, alpha=16, targets=["experts"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        lorakit.save_adapter(model, root / f"a{i}")
    enable_slots(base, adapters)
    store = AdapterStore(base, root, adapters)
    return base, [store.acquire(f"a{i}") for i in range(adapters)]


def main() -> None:
    from lorakit.serve.slots import BASE, mixed_forward

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    model, slots = served_model(8, Path(tempfile.mkdtemp()))
    generator = torch.Generator().manual_seed(1)
    cases = {}
    for shape, tokens in (("decode step", 1), ("prefill, 64 tokens", 64)):
        ids = torch.randint(0, 512, (16, tokens), generator=generator)
        rows = [slots[i % len(slots)] for i in range(16)]
        cases[(shape, "base rows")] = (ids, [BASE] * 16)
        cases[(shape, "8 adapters")] = (ids, rows)
    times = {case: [] for case in cases}
    with torch.inference_mode():
        for case, (ids, rows) in cases.items():  # warm-up
            mixed_forward(model, ids, rows)
        for r in range(args.rounds):
            for case in list(cases)[r % len(cases):] + list(cases)[:r % len(cases)]:
                ids, rows = cases[case]
                start = time.perf_counter()
                mixed_forward(model, ids, rows)
                times[case].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds\n")
    print("| batch | rows on the base, ms | rows on 8 adapters, ms | ratio |\n|---|---:|---:|---:|")
    for shape in dict.fromkeys(s for s, _ in cases):
        base, mixed = (statistics.median(times[(shape, which)]) * 1e3 for which in ("base rows", "8 adapters"))
        print(f"| {shape} | {base:.2f} | {mixed:.2f} | {mixed / base:.2f} |")


if __name__ == "__main__":
    main()

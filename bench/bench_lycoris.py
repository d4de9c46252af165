"""LoHa and LoKr training steps: lorakit against PEFT on the same model and batch.

A step is forward, backward and AdamW on a Qwen2-style model with random weights (bench_core's
``build_model``), LoHa / LoKr at rank r on every linear layer; lorakit and PEFT start from the
same random factors (PEFT's ``init_weights=False`` draw, loaded into lorakit), and the
variants run interleaved in one process (bench_core's ``interleaved``, median of the rounds).

    python bench/bench_lycoris.py [--rounds 7] [--hidden 512] [--layers 4] [--batch 4] [--seq 128] [--rank 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import build_model, interleaved, table  # noqa: E402


def step(model, batch: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def call() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import peft

    import lorakit

    base = build_model(args.hidden, args.layers, vocab=4096)
    batch = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    configs = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}
    variants: dict[str, Callable[[], None]] = {}
    for name, config in configs.items():
        torch.manual_seed(1)
        theirs = peft.get_peft_model(copy.deepcopy(base), config(r=args.rank, alpha=2 * args.rank,
                                                                 target_modules="all-linear", init_weights=False))
        with tempfile.TemporaryDirectory() as directory:
            theirs.save_pretrained(directory)
            ours = copy.deepcopy(base)
            lorakit.load_adapter(ours, directory)  # base frozen, the factors trainable, as in PEFT
        variants[f"lorakit {name}"] = step(ours, batch)
        variants[f"PEFT {name}"] = step(theirs, batch)
    medians = interleaved(variants, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq}, rank {args.rank}, all linear layers; median of {args.rounds} "
          "interleaved rounds\n")
    for name in configs:
        pair = {k: v for k, v in medians.items() if k.endswith(name)}
        print(table(f"{name} training step", pair, f"PEFT {name}") + "\n")


if __name__ == "__main__":
    main()

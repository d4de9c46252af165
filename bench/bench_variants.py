"""LoRA variants trained the same way: held-out loss on the embedded default model.

Each variant is one ``lorakit train`` run (a fresh process) on the real SmolLM2-135M-Instruct
weights, the same Swedish chatterbot-corpus dialogs, the same seed and steps,
r=16 on all linear layers; only ``--variant`` / ``--init`` (and, in the last three rows, the
learning rate) differ. Reported: held-out loss
before and after, tokens/s and the number of trainable parameters.

    python bench/bench_variants.py [--steps 40] [--out runs/bench-variants]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_quantize import train_run  # noqa: E402

VARIANTS = {
    "LoRA, default init": ["--variant", "lora", "--init", "default"],
    "LoRA, gaussian init": ["--variant", "lora", "--init", "gaussian"],
    "DoRA, default init": ["--variant", "dora", "--init", "default"],
    "LoRA, PiSSA init": ["--variant", "lora", "--init", "pissa"],
    "LoRA, OLoRA init": ["--variant", "lora", "--init", "olora"],
    # PiSSA and OLoRA start with large A and B, so the same step moves W far more: the
    # papers train them with smaller learning rates. The same three at a tenth of it:
    "LoRA, default init, lr 5e-5": ["--variant", "lora", "--init", "default", "--lr", "5e-5"],
    "LoRA, PiSSA init, lr 5e-5": ["--variant", "lora", "--init", "pissa", "--lr", "5e-5"],
    "LoRA, OLoRA init, lr 5e-5": ["--variant", "lora", "--init", "olora", "--lr", "5e-5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench-variants")
    parser.add_argument("--only", help="run only the variants whose name contains this")
    args = parser.parse_args()
    rows = {}
    for name, flags in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        out = Path(args.out) / re.sub(r"\W+", "-", name.lower())
        summary, output = train_run(out, args.steps, flags)
        trainable = re.search(r"([\d,]+) trainable parameters", output)
        rows[name] = {**summary, "trainable": trainable.group(1) if trainable else "?"}
    print(f"SmolLM2-135M-Instruct, r=16 alpha 32 on all linear layers, {args.steps} steps of 8 Swedish dialogs, "
          "lr 5e-4 unless the row says otherwise, seed 0\n")
    print("| variant | trainable parameters | held-out loss before | after | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['trainable']} | {row['eval_loss_before']:.3f} | {row['eval_loss_after']:.3f} | "
              f"{row['tokens_per_second']:.0f} |")


if __name__ == "__main__":
    main()

"""LoRA variants trained the same way: held-out loss on the embedded default model.

Each variant is one ``lorakit train`` run (a fresh process) on the real SmolLM2-135M-Instruct
weights, the same Swedish chatterbot-corpus dialogs, the same seed, steps and learning rate,
r=16 on all linear layers; only ``--variant`` / ``--init`` differ. Reported: held-out loss
before and after, tokens/s and the number of trainable parameters.

    python bench/bench_variants.py [--steps 40] [--out runs/bench-variants]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "LoRA, default init": ["--variant", "lora", "--init", "default"],
    "LoRA, gaussian init": ["--variant", "lora", "--init", "gaussian"],
    "DoRA, default init": ["--variant", "dora", "--init", "default"],
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
        done = subprocess.run(
            [sys.executable, "-m", "lorakit", "train", "--max-steps", str(args.steps), "--batch-size", "8",
             "--micro-batch-size", "8", "--rank", "16", "--alpha", "32", "--lr", "5e-4", "--max-length", "256",
             "--eval-every", "0", "--save-every", str(args.steps), "--out", str(out), *flags],
            check=True, capture_output=True, text=True)
        trainable = re.search(r"([\d,]+) trainable parameters", done.stdout + done.stderr)
        rows[name] = {**json.loads((out / "summary.json").read_text()),
                      "trainable": trainable.group(1) if trainable else "?"}
    print(f"SmolLM2-135M-Instruct, r=16 alpha 32 on all linear layers, {args.steps} steps of 8 Swedish dialogs, "
          "lr 5e-4, seed 0\n")
    print("| variant | trainable parameters | held-out loss before | after | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['trainable']} | {row['eval_loss_before']:.3f} | {row['eval_loss_after']:.3f} | "
              f"{row['tokens_per_second']:.0f} |")


if __name__ == "__main__":
    main()

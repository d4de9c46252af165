"""fp32, bf16, nf4 and int8 bases, trained the same way: held-out loss, speed and memory.

Each variant is one ``lorakit train`` run (a fresh process) on the real SmolLM2-135M-Instruct
weights, the same Swedish chatterbot-corpus dialogs, the same seed and steps; only the
base's storage differs (``--dtype`` / ``--quantize``). Peak memory is the process's
resident high-water mark (on CUDA, max allocated), weight loading included. Also
reported: the bytes of the quantized linear weights (with their scales) against the
same weights in bf16, counted on the real tensors.

    python bench/bench_quantize.py [--steps 40] [--out runs/bench-quantize] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {"fp32": ["--dtype", "float32"], "fp32 + bf16 autocast": ["--dtype", "float32", "--bf16"],
            "bf16": ["--dtype", "bfloat16"], "nf4": ["--quantize", "nf4"], "int8": ["--quantize", "int8"]}


def weight_ratio(method: str) -> tuple[float, float]:
    """(quantized linear bytes / bf16 bytes of the same weights, whole model / whole bf16 model)."""
    from lorakit import frozen, load_model
    from lorakit.quantize import quantized_bytes

    model = load_model("smollm2-135m", quantize=method)
    stored, dense = quantized_bytes(model)
    whole = sum(frozen.nbytes(p) for p in model.parameters())
    whole_bf16 = sum(2 * p.numel() for p in model.parameters())
    return stored / dense, whole / whole_bf16


def train_run(out: Path, steps: int, flags: list[str], device: str = "cpu") -> tuple[dict, str]:
    """One ``lorakit train`` run of these benchmarks' shape (the real SmolLM2, r=16, alpha 32,
    8 Swedish dialogs per step, lr 5e-4, seed 0) with ``flags``: its summary and its output."""
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--max-steps", str(steps), "--batch-size", "8",
                           "--micro-batch-size", "8", "--rank", "16", "--alpha", "32", "--lr", "5e-4", "--max-length",
                           "256", "--eval-every", "0", "--save-every", str(steps), "--device", device,
                           "--out", str(out), *flags], check=True, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text()), done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench-quantize")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = {}
    for name, flags in VARIANTS.items():
        out = Path(args.out) / name.replace(" + bf16 autocast", "-autocast")
        rows[name] = train_run(out, args.steps, flags, args.device)[0]
    print(f"SmolLM2-135M-Instruct, LoRA r=16 all linear, {args.steps} steps of 8 Swedish dialogs, seed 0, "
          f"{args.device}\n")
    print("| base | held-out loss before | after | tokens/s | peak memory MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['eval_loss_before']:.3f} | {row['eval_loss_after']:.3f} | "
              f"{row['tokens_per_second']:.0f} | {row['peak_memory_bytes'] / 2**20:,.0f} |")
    print("\n| quantization | linear weights / bf16 | whole model / bf16 |")
    print("|---|---:|---:|")
    for method in ("nf4", "int8"):
        linear, whole = weight_ratio(method)
        print(f"| {method} | {linear:.3f} | {whole:.3f} |")


if __name__ == "__main__":
    main()

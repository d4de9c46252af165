"""LoRA and QLoRA training on one CUDA GPU: lorakit against PEFT (+ bitsandbytes) and the planner.

For each architecture (SmolLM2-135M, Qwen2-0.5B, Llama-3.2-1B; random bfloat16 weights written
once from the published config, SmolLM2's tokenizer) and each base (bf16, NF4), one
``lorakit train`` run and one PEFT run of the same shape: LoRA r=16, alpha 32 on all linear
layers, batches of 8 rows of 512 tokens, every token trained, AdamW, the same number of steps,
no checkpointing. PEFT's NF4 base is transformers' ``BitsAndBytesConfig`` (double-quantized
NF4, bfloat16 compute); lorakit's is torchao's NF4 (``--quantize nf4``). Each run is a fresh
process; tokens/s counts every step including the first; peak is
``torch.cuda.max_memory_allocated`` from after the adapter is attached. The planner's estimate
(``lorakit plan``) for the same shape is printed beside the measured peak.

    python bench/bench_gpu_train.py --tokenizer DIR --data FILE.jsonl --work DIR [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RANK, BATCH, SEQ = 16, 8, 512
DEVICE = "cuda"  # --device cpu: a quick smoke run of this script on a machine without one
MODELS = ("smollm2-135m", "qwen2-0.5b", "llama-3.2-1b")


def model_dir(preset: str, tokenizer: Path, work: Path) -> Path:
    """A model directory with ``preset``'s shapes, random bf16 weights (seed 0) and ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    from lorakit.pretrained import load_config

    out = work / preset
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(load_config(preset), dtype=torch.bfloat16)
    model.save_pretrained(out)
    for path in tokenizer.iterdir():
        if path.is_file() and path.name not in ("config.json", "generation_config.json"):
            shutil.copy(path, out / path.name)
    return out


def lorakit_run(directory: Path, base: str, data: str, steps: int, out: Path) -> dict:
    flags = ["--dtype", "bfloat16"] if base == "bf16" else ["--quantize", "nf4"]
    shutil.rmtree(out, ignore_errors=True)  # a finished run directory would resume, not measure
    subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", str(directory), "--data", data,
                    "--eval-fraction", "0", "--max-steps", str(steps), "--batch-size", str(BATCH),
                    "--micro-batch-size", str(BATCH), "--max-length", str(SEQ), "--rank", str(RANK), "--alpha",
                    str(2 * RANK), "--lr", "5e-4", "--save-every", str(steps), "--device", DEVICE, "--out", str(out),
                    *flags], check=True, capture_output=True, text=True, timeout=150)
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_second": summary["tokens_per_second"], "peak_bytes": summary["peak_memory_bytes"],
            "loss": summary["train_loss"]}


def peft_run(directory: Path, base: str, data: str, steps: int) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_gpu_train as b; "
            f"b.DEVICE = {DEVICE!r}; b.peft_train({str(directory)!r}, {base!r}, {data!r}, {steps})")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=150)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peft_train(directory: str, base: str, data: str, steps: int) -> None:
    """The usual PEFT (QLoRA) step: transformers' forward with labels, backward, AdamW."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(directory)
    texts = [json.loads(line)["text"] for line in Path(data).read_text().splitlines()]
    ids = tokenizer(texts[:BATCH * steps], truncation=True, max_length=SEQ, return_tensors="pt",
                    padding="max_length")["input_ids"].to(DEVICE)
    extra = {}
    if base == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map={"": DEVICE}, **extra)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    synchronize()
    start = time.perf_counter()
    for step in range(steps):
        batch = ids[step * BATCH:(step + 1) * BATCH]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_second": steps * BATCH * SEQ / seconds,
                      "peak_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0, "loss": loss.item()}))


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def planned(preset: str, base: str) -> int:
    from lorakit.plan import plan

    return plan(preset, "lora" if base == "bf16" else "qlora", RANK, BATCH, SEQ, torch.bfloat16).peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--results", help="append each result as a JSON line here")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    work = Path(args.work)
    rows = []
    for preset in args.models.split(","):
        directory = model_dir(preset, Path(args.tokenizer), work)
        for base in ("bf16", "nf4"):
            row = {"model": preset, "base": base, "planned_bytes": planned(preset, base)}
            for name, run in (("lorakit", lambda: lorakit_run(directory, base, args.data, args.steps,
                                                               work / f"run-{preset}-{base}")),
                              ("peft", lambda: peft_run(directory, base, args.data, args.steps))):
                try:
                    row[name] = run()
                except subprocess.CalledProcessError as err:
                    row[name] = {"error": (err.stderr or "")[-1500:]}
                except subprocess.TimeoutExpired:
                    row[name] = {"error": "timed out"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"\n{name}; torch {torch.__version__}; LoRA r={RANK} all linear; {BATCH} x {SEQ} "
          f"tokens per step; {args.steps} steps\n")
    print("| model | base | lorakit tok/s | PEFT tok/s | lorakit / PEFT | lorakit peak GiB | PEFT peak GiB | "
          "planned GiB | planned / lorakit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ours, theirs = row["lorakit"], row["peft"]
        if "error" in ours or "error" in theirs:
            print(f"| {row['model']} | {row['base']} | failed: {ours.get('error', 'ok')[-300:]!r} | "
                  f"{theirs.get('error', 'ok')[-300:]!r} |")
            continue
        print(f"| {row['model']} | {row['base']} | {ours['tokens_per_second']:,.0f} | "
              f"{theirs['tokens_per_second']:,.0f} | {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f} | "
              f"{ours['peak_bytes'] / 2**30:.2f} | {theirs['peak_bytes'] / 2**30:.2f} | "
              f"{row['planned_bytes'] / 2**30:.2f} | {row['planned_bytes'] / max(ours['peak_bytes'], 1):.2f} |")


if __name__ == "__main__":
    main()

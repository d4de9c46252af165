"""lorakit end to end on the embedded SmolLM2-135M-Instruct: a real LoRA fine-tuning run
that teaches the model Swedish small talk from the chatterbot-corpus dialogs, then
reloads the adapter, merges it into a plain transformers model, and compares answers.

    python examples/demo.py [--out runs/demo] [--epochs 4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.pretrained import save_merged
from lorakit.quiet import no_progress_bars

MODEL = "smollm2-135m"
QUESTION = "Kan du prata svenska?"  # "Can you speak Swedish?"; not a line of the corpus


def answer(model, tokenizer, question: str) -> str:
    batch = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=float, default=4)
    args = parser.parse_args()
    if Path(args.out).exists():  # the demo's own directory: start over rather than resume a finished run
        shutil.rmtree(args.out)
    config = lorakit.TrainConfig(model=MODEL, language="swedish", out=args.out, rank=16, alpha=32,
                                 epochs=args.epochs, batch_size=4, micro_batch_size=4, lr=5e-4, warmup_steps=3,
                                 eval_fraction=0.1, eval_every=10, save_every=10, log_every=5)
    start = time.perf_counter()
    tokenizer = lorakit.load_tokenizer(MODEL)
    base = lorakit.load_model(MODEL)
    print(f"[load]    {MODEL} in {time.perf_counter() - start:.1f} s")
    before = answer(base, tokenizer, QUESTION)

    result = lorakit.train(config)  # loads its own copy of the base; a re-run resumes or reuses the run
    trained = lorakit.load_model(MODEL)
    lorakit.load_adapter(trained, result.adapter)
    counts = lorakit.trainable_parameters(trained)
    print(f"[adapter] {counts.adapter:,} trainable parameters ({100 * counts.adapter / counts.base:.2f} % of "
          f"{counts.base:,}), {result.adapter_bytes / 2**20:.1f} MiB")
    print(f"[train]   {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s), "
          f"peak memory {result.peak_memory_bytes / 2**30:.1f} GiB")
    print(f"[eval]    held-out loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = save_merged(MODEL, result.adapter, Path(tmp) / "merged")
        from transformers import AutoModelForCausalLM

        with no_progress_bars():  # transformers' own loader, to show the merged model needs no lorakit
            merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True)
        ids = tokenizer(QUESTION, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            difference = (merged(ids).logits - trained(ids).logits).abs().max().item()
    print(f"[merge]   lorakit merge -> transformers model; max |logits - adapter| = {difference:.1e}")
    print(f"[answer]  Q: {QUESTION}")
    print(f"          before: {before!r}")
    print(f"          after:  {answer(trained, tokenizer, QUESTION)!r}")
    print(f"[files]   {result.out}/: adapter/ (PEFT format), checkpoints/, metrics.jsonl, loss.png, "
          "summary.json, config.yaml")


if __name__ == "__main__":
    main()

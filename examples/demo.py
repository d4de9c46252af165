"""lorakit end to end on the embedded SmolLM2-135M-Instruct: inspect, attach, a few
training steps, save, reload, merge, detach, and check that every form gives the
same logits."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.report import inspect_model

MODEL = "smollm2-135m"
QUESTION = "What is the capital of Sweden?"
ANSWER = "Huvudstaden i Sverige är Stockholm."  # taught in Swedish, to see the adapter at work


def answer(model, tokenizer, question: str) -> str:
    batch = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    torch.manual_seed(0)
    config = lorakit.LoraConfig(rank=8, alpha=16, targets="all-linear")
    report = inspect_model(MODEL, config)
    print(f"[inspect] {MODEL}: {report.trainable_params:,} trainable of {report.base_params:,} "
          f"({report.trainable_percent:.2f} %), adapter {report.adapter_bytes_fp32 / 2**20:.1f} MiB fp32")

    start = time.perf_counter()
    model, tokenizer = lorakit.load_model(MODEL), lorakit.load_tokenizer(MODEL)
    print(f"[load] {type(model).__name__} in {time.perf_counter() - start:.1f} s")
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    batch = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = model(**batch).logits
    before = answer(model, tokenizer, QUESTION)

    paths = lorakit.attach(model, config)
    with torch.no_grad():
        fresh = model(**batch).logits
    print(f"[attach] {len(paths)} modules; fresh adapter == base exactly: {torch.equal(fresh, base_logits)}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(12):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, 11):
            print(f"[train] step {step + 1:2d} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits

    with tempfile.TemporaryDirectory() as tmp:
        directory = lorakit.save_adapter(model, Path(tmp) / "swedish")
        size = (directory / "adapter_model.safetensors").stat().st_size
        print(f"[save] {directory.name}/: {', '.join(sorted(p.name for p in directory.iterdir()))} ({size / 2**20:.1f} MiB)")
        fresh_model = lorakit.load_model(MODEL)
        lorakit.load_adapter(fresh_model, directory)
    with torch.no_grad():
        reloaded = fresh_model(**batch).logits
        lorakit.merge(fresh_model)
        merged = fresh_model(**batch).logits
        plain = lorakit.detach(fresh_model)
        detached = plain(**batch).logits
    print(f"[reload] max |logits - trained| = {(reloaded - trained).abs().max().item():.2e}")
    print(f"[merge]  max |merged - unmerged| = {(merged - trained).abs().max().item():.2e}")
    print(f"[detach] {type(plain.model.layers[0].self_attn.q_proj).__name__} modules, "
          f"max |detached - trained| = {(detached - trained).abs().max().item():.2e}")
    print(f"[answer] before: {before!r}")
    print(f"[answer] after:  {answer(plain, tokenizer, QUESTION)!r}")


if __name__ == "__main__":
    main()

"""Per-process memory of LoRA training on 2 processes: FSDP2 (--shard fsdp) against DDP.

Both runs train the same adapter (r=16, all linear layers) on the embedded
SmolLM2-135M-Instruct (float32, 135 M parameters, 538 MB of weights) for 3 steps of 4
Swedish dialogs under ``torchrun --nproc-per-node 2`` on gloo (CPU). Each process
reports the bytes of frozen base weights it holds (counted on its tensors), and, above
its resident size once the libraries are imported, its peak once the model is loaded
(DDP: the whole model, read in full; FSDP: built on the meta device, each process
reading only its own shards) and its peak while training. Fresh processes for each
run; the median over runs of the larger of the two processes' figures.

    python bench/bench_fsdp.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def frozen_bytes(model) -> int:
    """Bytes of frozen (base) parameters this process holds: its shards under FSDP."""
    seen, total = set(), 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += local.numel() * local.element_size()
    return total


def worker(mode: str, out: str) -> None:
    """One process of the torchrun job: train, and write this process's figures as JSON."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline, as every run imports it)

    import lorakit.training.loop as loop
    import lorakit.training.text as text
    from lorakit.training import TrainConfig

    baseline = resident("VmRSS")
    figures: dict[str, int] = {}
    reset, setup = loop.reset_peak_memory, loop.setup

    def record_then_reset(device):  # the loop resets the peak once the model is loaded
        figures["loading"] = resident("VmHWM") - baseline
        reset(device)

    def setup_then_touch(*args, **kwargs):
        run, start = setup(*args, **kwargs)
        # DDP's weights are memory-mapped from the file: they become resident when first
        # used, so the loaded model is counted once every frozen weight has been read.
        with torch.no_grad():
            sum(float(p.to_local().sum() if hasattr(p, "to_local") else p.sum())
                for p in run.model.parameters() if not p.requires_grad)
        figures["loading"] = max(figures["loading"], resident("VmHWM") - baseline)
        figures["frozen"] = frozen_bytes(run.model)
        return run, start

    loop.reset_peak_memory, loop.setup = record_then_reset, setup_then_touch
    config = TrainConfig(model="smollm2-135m", rank=16, alpha=32, max_steps=3, batch_size=4, micro_batch_size=2,
                         max_length=128, eval_fraction=0, save_every=100, log_every=100, shard=mode, out=out)
    text.train(config)
    figures["training"] = resident("VmHWM") - baseline
    (Path(out) / f"result-{os.environ['RANK']}.json").write_text(json.dumps(figures))


def job(mode: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   __file__, "--worker", mode, "--out", out]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        results = [json.loads(path.read_text()) for path in Path(out).glob("result-*.json")]
    return {key: max(r[key] for r in results) for key in ("frozen", "loading", "training")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--worker", choices=("ddp", "fsdp"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    figures: dict[str, list[dict[str, int]]] = {"ddp": [], "fsdp": []}
    for _ in range(args.runs):
        for mode in figures:  # interleaved
            figures[mode].append(job(mode))
    print(f"SmolLM2-135M-Instruct, float32, LoRA r=16 all linear, 2 processes (gloo, CPU), {args.runs} run(s) each\n")
    print("| per process, above the imported libraries | DDP MiB | FSDP MiB | FSDP / DDP |\n|---|---:|---:|---:|")
    for key, label in (("frozen", "frozen base weights held"), ("loading", "peak once the model is loaded"),
                       ("training", "peak while training")):
        ddp = [f[key] for f in figures["ddp"]]
        fsdp = [f[key] for f in figures["fsdp"]]
        ratios = [b / a for a, b in zip(ddp, fsdp)]
        print(f"| {label} | {statistics.median(ddp) / 2**20:,.0f} | {statistics.median(fsdp) / 2**20:,.0f} | "
              f"{min(ratios):.3f}–{max(ratios):.3f} |")


if __name__ == "__main__":
    main()

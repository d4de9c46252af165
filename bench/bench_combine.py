"""SVD combination of two adapters: lorakit's factored SVD vs PEFT's add_weighted_adapter.

Two random rank-24 adapters on every linear layer of Qwen2-0.5B's architecture (24 blocks,
168 modules, random weights, float32), combined as 0.7·ΔW_1 + 0.3·ΔW_2 and truncated to rank
24. PEFT (``add_weighted_adapter(..., combination_type="svd")``) forms each out x in ΔW and runs a
dense SVD on it; lorakit (``lorakit.combine(..., method="svd")``) takes a QR of the stacked
factors and an SVD of a 48 x 48 core. Both compute the same best rank-24 approximation, which the
run checks module by module. Times: the two interleaved in one process, median of ``--rounds``.
Peak memory: the extra bytes the combination itself needs above what the process held before it
(each variant in a fresh process on the CPU; max allocated on CUDA).

    python bench/bench_combine.py [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RANK, WEIGHTS = 24, (0.7, 0.3)


def peft_model(device: str):
    """Qwen2-0.5B's architecture with two random LoRA adapters, "first" and "second", in PEFT."""
    import peft
    from transformers import AutoModelForCausalLM

    from lorakit.pretrained import load_config

    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(load_config("qwen2-0.5b"))
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(base, config, adapter_name="first")
    model.add_adapter("second", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.02)  # both factors random: a trained-looking update
    return model


def lorakit_adapters(model, device: str):
    """The two PEFT adapters as lorakit values, through PEFT's own files."""
    from lorakit.adapter import Adapter, LayerWeights
    from lorakit.files import read_adapter

    adapters = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["first", "second"])
        for where in (os.path.join(tmp, "first"), os.path.join(tmp, "second")):  # non-default names: subfolders
            adapter = read_adapter(where)
            layers = {p: LayerWeights(l.A.to(device), l.B.to(device), l.scaling, l.layout)
                      for p, l in adapter.layers.items()}
            adapters.append(Adapter(adapter.config, layers))
    return adapters


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_peft(model) -> None:
    model.add_weighted_adapter(["first", "second"], list(WEIGHTS), "combined", combination_type="svd", svd_rank=RANK)


def run_lorakit(adapters):
    import lorakit

    return lorakit.combine(adapters, list(WEIGHTS), method="svd", rank=RANK)


def compare(model, result) -> float:
    """Largest relative Frobenius difference between PEFT's and lorakit's combined ΔW."""
    worst = 0.0
    for path, layer in result.adapter.layers.items():
        module = model.get_submodule("base_model.model." + path)
        theirs = module.get_delta_weight("combined").float()
        ours = layer.delta().to(theirs.device)
        worst = max(worst, float((ours - theirs).norm() / theirs.norm()))
    return worst


def current_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def memory_run(variant: str, device: str) -> None:
    """Print the extra peak bytes of one combination (run in a fresh process)."""
    model = peft_model(device)
    adapters = lorakit_adapters(model, device)
    if variant == "lorakit":
        del model  # lorakit combines adapter values: no model is needed
    synchronize(device)
    reset_peak(device)
    before = current_bytes(device)
    run_lorakit(adapters) if variant == "lorakit" else run_peft(model)
    synchronize(device)
    print(peak_bytes(device) - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-run", choices=("lorakit", "peft"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        memory_run(args.memory_run, args.device)
        return
    model = peft_model(args.device)
    adapters = lorakit_adapters(model, args.device)
    times: dict[str, list[float]] = {"peft": [], "lorakit": []}
    result = None
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in (("peft", "lorakit") if r % 2 else ("lorakit", "peft")):
            if "combined" in model.peft_config and name == "peft":
                model.delete_adapter("combined")
            synchronize(args.device)
            start = time.perf_counter()
            out = run_lorakit(adapters) if name == "lorakit" else run_peft(model)
            synchronize(args.device)
            if r:
                times[name].append(time.perf_counter() - start)
            result = out if name == "lorakit" else result
    difference = compare(model, result)
    del model, adapters
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # freed blocks go back to the system
    memory = {v: int(subprocess.run([sys.executable, __file__, "--device", args.device, "--memory-run", v], env=env,
                                    check=True, capture_output=True, text=True).stdout.split()[-1])
              for v in ("peft", "lorakit")}
    seconds = {name: statistics.median(t) for name, t in times.items()}
    kept = statistics.mean(result.kept.values())
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Qwen2-0.5B shapes, 168 modules, two rank-{RANK} adapters -> rank {RANK} (weights {WEIGHTS}); {name}; "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds\n")
    print("| variant | median s | peak extra MiB |")
    print("|---|---:|---:|")
    for variant in ("peft", "lorakit"):
        label = "PEFT add_weighted_adapter(svd)" if variant == "peft" else "lorakit combine --method svd"
        print(f"| {label} | {seconds[variant]:.3f} | {memory[variant] / 2**20:,.1f} |")
    print(f"\nlorakit / PEFT: time {seconds['lorakit'] / seconds['peft']:.4f} (target <= 0.05), peak memory "
          f"{memory['lorakit'] / max(memory['peft'], 1):.4f} (target <= 0.25); largest relative difference of the "
          f"combined ΔW: {difference:.1e}; mean energy kept {kept:.4f}")


if __name__ == "__main__":
    main()

"""Serving many adapters on one base: the cost of mixed-adapter batches, adapter loading,
and server throughput, each as a ratio measured side by side in one run.

1. forward of a batch whose rows use 8 distinct adapters / the same batch on one adapter
   (lorakit; decode, small decode and prefill sizes; the stacked path and segments only),
   lorakit's mixed batch / PEFT's ``adapter_names`` mixed batch, and the base model alone
   (the floor for both); then a decode step with 32 distinct adapters (the server's shape);
2. loading a 13,197,312-parameter adapter (Qwen2-0.5B shapes, r=24, all linear layers)
   into a ready model: lorakit's store / PEFT's ``load_adapter`` (each load is undone
   before the next);
3. a bounded load test of ``lorakit serve`` on 127.0.0.1 (SmolLM2-135M-Instruct, the real
   embedded model): tokens/s with 32 adapters in rotation / with 1 adapter, interleaved
   rounds; then 500 requests, 32 concurrent, across 16 adapters: errors, lost responses,
   throughput, p50/p99 latency.

    python bench/bench_serve.py [--rounds 7] [--skip-mixed] [--skip-load] [--skip-server]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved, table  # noqa: E402

from lorakit.serve.slots import STACK_TOKENS  # noqa: E402


def random_adapters(model, root: Path, ranks: list[int], prefix: str = "a") -> list[str]:
    """Adapters with random A and B (as if trained), saved under ``root``."""
    import lorakit

    names = []
    for i, rank in enumerate(ranks):
        lorakit.attach(model, lorakit.LoraConfig(rank=rank, alpha=2 * rank), name="tmp")
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if ".adapters.tmp." in n):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        lorakit.save_adapter(model, root / f"{prefix}{i}", name="tmp")
        lorakit.delete_adapter(model, "tmp")
        names.append(f"{prefix}{i}")
    return names


def smollm2_shaped(layers: int):
    from transformers import AutoModelForCausalLM

    from lorakit.pretrained import load_config

    config = load_config("smollm2-135m")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def served(base, root: Path, names: list[str]):
    """A copy of ``base`` with slots filled by ``names``; returns (model, name -> slot)."""
    from lorakit.serve.slots import enable_slots
    from lorakit.serve.store import AdapterStore

    model = copy.deepcopy(base)
    enable_slots(model, len(names))
    store = AdapterStore(model, root, len(names))
    return model, {n: store.acquire(n) for n in names}


def mixed_batch(rounds: int, layers: int) -> None:
    import peft

    from lorakit.serve.slots import mixed_forward

    base = smollm2_shaped(layers)
    mixed_ranks = [8, 16, 8, 32, 16, 8, 64, 16]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uniform = random_adapters(copy.deepcopy(base), root, [16] * 8, prefix="u")
        mixed = random_adapters(copy.deepcopy(base), root, mixed_ranks, prefix="m")
        many = random_adapters(copy.deepcopy(base), root, [8] * 32, prefix="r")
        ours, slots = served(base, root, uniform)
        ours_mixed, mixed_slots = served(base, root, mixed)
        ours_many, many_slots = served(base, root, many)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / uniform[0]), adapter_name=uniform[0])
        for name in uniform[1:]:
            theirs.load_adapter(str(root / name), adapter_name=name)
        theirs.eval()
    print(f"### Mixed-adapter forward: SmolLM2-135M shapes ({layers} layers, random weights, fp32), "
          f"8 adapters of rank 16 (or of ranks {mixed_ranks}) on all linear layers; rows take adapters "
          "in turn (row i: adapter i mod 8); lorakit groups the rows by adapter once per forward "
          "(``mixed_forward``) and picks segments or stacked batched matmuls per batch; "
          "\"segments only\" forces segments\n")

    def ours_with(model, ids, row_slots, gather: bool = True):
        router = model.lorakit_router

        def call():
            router.stack_tokens = STACK_TOKENS if gather else 0
            with torch.inference_mode():
                mixed_forward(model, ids, row_slots)
        return call

    def run(model, ids, **kwargs):
        def call():
            with torch.inference_mode():
                model(input_ids=ids, **kwargs)
        return call

    for rows, seq, label in [(32, 1, "decode-sized: 32 rows x 1 token"), (8, 1, "small decode: 8 rows x 1 token"),
                             (16, 64, "prefill-sized: 16 rows x 64 tokens")]:
        ids = torch.randint(0, 49152, (rows, seq), generator=torch.Generator().manual_seed(1))
        turns = [uniform[i % 8] for i in range(rows)]
        medians = interleaved({
            "lorakit, 1 adapter": ours_with(ours, ids, [slots[uniform[0]]] * rows),
            "lorakit, 8 adapters": ours_with(ours, ids, [slots[n] for n in turns]),
            "lorakit, 8 adapters, segments only": ours_with(ours, ids, [slots[n] for n in turns], gather=False),
            "lorakit, 8 adapters of mixed ranks": ours_with(ours_mixed, ids,
                                                            [mixed_slots[mixed[i % 8]] for i in range(rows)]),
            "peft, 8 adapters (adapter_names)": run(theirs, ids, adapter_names=turns),
            "peft, 1 adapter (adapter_names)": run(theirs, ids, adapter_names=[uniform[0]] * rows),
            "base model, no adapter": run(base, ids),
        }, rounds)
        print(table(label, medians, "lorakit, 1 adapter"))
        ours8, peft8, bare = (medians[k] for k in ("lorakit, 8 adapters", "peft, 8 adapters (adapter_names)",
                                                    "base model, no adapter"))
        print(f"\n8 adapters / 1 adapter: {ours8 / medians['lorakit, 1 adapter']:.3f} (target <= 1.15); "
              f"lorakit / peft, 8 adapters: {ours8 / peft8:.3f} (target <= 0.33); the base model alone / peft: "
              f"{bare / peft8:.3f} (no adapter method can go below it); time added to the base, lorakit / peft: "
              f"{(ours8 - bare) / (peft8 - bare):.3f}\n")

    ids = torch.randint(0, 49152, (32, 1), generator=torch.Generator().manual_seed(2))
    medians = interleaved({
        "lorakit, 1 adapter": ours_with(ours_many, ids, [many_slots[many[0]]] * 32),
        "lorakit, 32 adapters": ours_with(ours_many, ids, [many_slots[n] for n in many]),
        "lorakit, 32 adapters, segments only": ours_with(ours_many, ids, [many_slots[n] for n in many], gather=False),
        "base model, no adapter": run(base, ids),
    }, rounds)
    print(table("decode-sized, one adapter per row: 32 rows x 1 token, 32 adapters of rank 8 (the server's "
                "shape)", medians, "lorakit, 1 adapter"))
    print(f"\n1 adapter / 32 adapters: {medians['lorakit, 1 adapter'] / medians['lorakit, 32 adapters']:.3f}\n")


def loading(rounds: int) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.pretrained import load_config
    from lorakit.serve.slots import enable_slots
    from lorakit.serve.store import AdapterStore

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(load_config("qwen2-0.5b")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer = copy.deepcopy(base)
        lorakit.attach(writer, lorakit.LoraConfig(rank=24, alpha=48))
        count = lorakit.trainable_parameters(writer).adapter
        lorakit.save_adapter(writer, root / "big")
        del writer
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / "big"), adapter_name="resident")
        ours = base
        enable_slots(ours, 2)
        store = AdapterStore(ours, root, 2)

        def lorakit_load():
            store.acquire("big")
            store.release("big")
            store.unregister("big")  # empties the slot: the next call loads from disk again

        def peft_load():
            theirs.load_adapter(str(root / "big"), adapter_name="big")
            theirs.delete_adapter("big")

        medians = interleaved({"peft load_adapter": peft_load, "lorakit store": lorakit_load}, rounds)
    print(f"### Loading an adapter of {count:,} parameters (Qwen2-0.5B shapes, r=24, all linear layers)\n")
    print(table("load", medians, "peft load_adapter"))
    print(f"\nlorakit / peft: {medians['lorakit store'] / medians['peft load_adapter']:.3f} (target <= 0.2)\n")


async def _load_test(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int):
    import httpx

    latencies, tokens, errors = [], 0, []
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int):
            nonlocal tokens
            async with semaphore:
                body = {"model": models[i % len(models)], "prompt": f"Question {i}: what is LoRA?",
                        "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                try:
                    reply = await client.post(url + "/v1/completions", json=body)
                    if reply.status_code != 200:
                        errors.append(reply.status_code)
                        return None
                    tokens += reply.json()["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - start)
                    return True
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                    return None

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        seconds = time.perf_counter() - start
    return {"ok": sum(r is True for r in results), "errors": errors, "tokens": tokens, "seconds": seconds,
            "latencies": sorted(latencies)}


def server(rounds: int) -> None:
    import httpx

    import lorakit
    from serving_helpers import free_port

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = random_adapters(lorakit.load_model("smollm2-135m"), root, [8] * 32)
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "smollm2-135m", "--adapters", str(root),
                                    "--port", str(port), "--max-adapters", "32", "--max-batch", "32"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            # warm-up: every adapter loaded once, so the rounds measure decoding, not loading
            asyncio.run(_load_test(url, names, 64, 32, 2))
            runs: dict[str, list[float]] = {"1 adapter": [], "32 adapters in rotation": []}
            for r in range(rounds):
                order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for label in order:
                    models = names[:1] if label == "1 adapter" else names
                    result = asyncio.run(_load_test(url, models, 64, 32, 16))
                    assert not result["errors"], result["errors"]
                    runs[label].append(result["tokens"] / result["seconds"])
            medians = {k: statistics.median(v) for k, v in runs.items()}
            print("### Server throughput (SmolLM2-135M-Instruct, 64 requests x 16 tokens per round, 32 concurrent, "
                  f"median of {rounds} interleaved rounds)\n")
            print("| adapters | tokens/s |\n|---|---:|")
            for label, value in medians.items():
                print(f"| {label} | {value:.1f} |")
            print(f"\n32 adapters / 1 adapter: {medians['32 adapters in rotation'] / medians['1 adapter']:.3f} "
                  "(target >= 0.85)\n")

            result = asyncio.run(_load_test(url, names[:16], 500, 32, 16))
            lat = result["latencies"]
            print("### Load test: 500 requests, 32 concurrent, 16 adapters, 16 tokens each\n")
            print(f"- responses: {result['ok']} ok, {len(result['errors'])} errors, "
                  f"{500 - result['ok'] - len(result['errors'])} lost")
            print(f"- throughput: {result['tokens'] / result['seconds']:.1f} tokens/s, "
                  f"{result['ok'] / result['seconds']:.2f} requests/s over {result['seconds']:.1f} s")
            if lat:
                print(f"- latency: p50 {lat[len(lat) // 2]:.2f} s, p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.2f} s")
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; torch {torch.__version__}\n")
    if not args.skip_mixed:
        mixed_batch(args.rounds, args.layers)
    if not args.skip_load:
        loading(args.rounds)
    if not args.skip_server:
        server(args.rounds)


if __name__ == "__main__":
    main()

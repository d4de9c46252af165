"""Serving many adapters on one base: the cost of mixed-adapter batches, adapter loading,
and server throughput, each as a ratio measured side by side in one run.

1. forward of a batch whose rows use 8 distinct adapters / the same batch on one adapter
   (lorakit; decode, small decode and prefill sizes; the stacked path and segments only),
   lorakit's mixed batch / PEFT's ``adapter_names`` mixed batch, and the base model alone
   (the floor for both); then a decode step with 32 distinct adapters (the server's shape);
2. loading a 13,197,312-parameter adapter (Qwen2-0.5B shapes, r=24, all linear layers)
   into a ready model: lorakit's store / PEFT's ``load_adapter`` (each load is undone
   before the next);
3. ``lorakit serve`` on 127.0.0.1 (SmolLM2-135M-Instruct, the real embedded model, or
   ``--model``): server tokens/s with 32 concurrent rows / the model's own limit (32 rows
   / one decode forward of a 32-row batch on the same adapters, timed in this process
   while the servers idle, just before and after each load test, whose ratio to it is
   taken per round), with 1 adapter and with 32 in rotation; 32 / 1; a single
   request's time to first token and tokens/s; with ``--bf16`` a bf16 server beside the
   fp32 one (speed, and whether greedy texts stay the same); then 500 requests, 32
   concurrent, across 16 adapters: errors, lost responses, throughput, p50/p99 latency.
   The load test's answers are ``--max-tokens`` long (``ignore_eos``, as vLLM's own
   serving benchmark does), so every row of a 32-row batch decodes until its wave ends;
   with ``--eos`` they end where the model ends them, and rows leave early.

    python bench/bench_serve.py [--rounds 7] [--skip-mixed] [--skip-load] [--skip-server]
                                [--model SPEC] [--device cuda] [--bf16] [--max-tokens 32] [--eos]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import interleaved, table  # noqa: E402

from lorakit.serve.slots import STACK_TOKENS, router_of  # noqa: E402


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

    from lorakit.serve.pool import Pool
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

    def ours_with(model, ids, row_slots, gather: bool = True, copy_blocks: bool = False):
        """``gather``: False forces segments; ``copy_blocks``: the stacked path copies the
        batch's blocks even when they lie side by side (as it did before reading them in place)."""
        router = router_of(model)

        def call():
            router.stack_tokens = STACK_TOKENS if gather else 0
            copied = patch.object(Pool, "consecutive", lambda pool, slots: None) if copy_blocks else nullcontext()
            with copied, torch.inference_mode():
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
            "lorakit, 8 adapters, blocks copied": ours_with(ours, ids, [slots[n] for n in turns], copy_blocks=True),
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
        "lorakit, 32 adapters, blocks copied": ours_with(ours_many, ids, [many_slots[n] for n in many],
                                                         copy_blocks=True),
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


PROMPT = "Question {i}: what is LoRA?"
LIMIT_STEPS = 5  # timed decode forwards per round: one forward varies by 10-20 % on a shared 2-core host


async def _load_test(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int,
                     ignore_eos: bool = False):
    import httpx

    latencies, tokens, errors = [], 0, []
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int):
            nonlocal tokens
            async with semaphore:
                body = {"model": models[i % len(models)], "prompt": PROMPT.format(i=i), "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": ignore_eos}
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


def _single(url: str, model: str, max_tokens: int) -> tuple[float, float]:
    """One request alone, streamed: (seconds to the first token, tokens/s after it)."""
    import httpx

    body = {"model": model, "prompt": PROMPT.format(i=0), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, usage = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            usage = event.get("usage") or usage
    end = time.perf_counter()
    first = first or end
    return first - start, (usage["completion_tokens"] - 1) / max(end - first, 1e-9)


def _greedy_texts(url: str, model: str, count: int, max_tokens: int) -> list[str]:
    import httpx

    return [httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT.format(i=i),
                                                       "max_tokens": max_tokens, "temperature": 0},
                       timeout=300).json()["choices"][0]["text"] for i in range(count)]


def model_limit(spec: str, root: Path, names: list[str], device: str, dtype: torch.dtype, max_tokens: int):
    """The served model's own decode speed: rows / one decode forward of a 32-row batch on
    its adapters (one adapter, or 32 in rotation), at the mean context of the load test."""
    from lorakit.serve.engine import build_engine
    from lorakit.serve.request import Request

    engine = build_engine(spec, str(root), max_adapters=32, max_batch=32, dtype=dtype, device=device)
    tokenizer = engine.tokenizer
    context = max_tokens // 2

    def forward_for(models: list[str]):
        rows = [Request(tokenizer(PROMPT.format(i=i))["input_ids"] + [7] * context, m,
                        lease=engine.store.lease(m)) for i, m in enumerate(models)]
        logits, cache, mask = engine._prefill_forward(rows)
        last = torch.full((len(rows), 1), 7, device=engine.device)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = mask[:, :-1].sum(-1, keepdim=True)
        slots = [r.slot for r in rows]

        @torch.inference_mode()
        def step():  # writes the next column in place, each time the same one
            engine._forward(last, mask, positions, slots, cache)
            if device == "cuda":
                torch.cuda.synchronize()
        return step

    return {"1 adapter": forward_for([names[0]] * 32), "32 adapters in rotation": forward_for(names[:32])}


def factor_read_bound(root: Path, names: list[str], one_adapter_rate: float) -> tuple[float, int, float]:
    """The most 32 adapters / 1 adapter can be if the only difference were reading every
    adapter's factors from memory once per decode step: (bound, factor bytes, bytes/s).

    One adapter's factors stay in cache from step to step; 32 adapters' do not, and the
    step then reads them all at the memory's read bandwidth (measured here, a 512 MiB sum)."""
    from lorakit.files import read_tensors

    size = sum(t.numel() * 4 for name in names[:32] for t in read_tensors(root / name).values())  # float32 in the pool
    big = torch.ones(2**27)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    bandwidth = big.numel() * 4 / statistics.median(times)
    step = 32 / one_adapter_rate
    return step / (step + size / bandwidth), size, bandwidth


def decode_rates(step) -> list[float]:
    """Rows per second of ``LIMIT_STEPS`` timed decode forwards (after one untimed)."""
    step()
    rates = []
    for _ in range(LIMIT_STEPS):
        start = time.perf_counter()
        step()
        rates.append(32 / (time.perf_counter() - start))
    return rates


def _wait_for(url: str, process: subprocess.Popen, log: Path | None) -> None:
    import httpx

    for _ in range(900):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}"
                               + (f"; its output:\n{log.read_text()[-4000:]}" if log else ""))
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start in 3 minutes")


def engine_breakdown(spec: str, root: Path, names: list[str], device: str, max_tokens: int,
                     limit) -> dict[str, float]:
    """Where the engine's time goes on the load test's work, without HTTP: 64 requests of
    ``max_tokens`` tokens, 32 rows at a time, 32 adapters in rotation, EOS ignored; and its
    tokens/s against ``limit`` (the 32-adapter decode step) timed just before and after."""
    from lorakit.serve.engine import build_engine
    from lorakit.serve.request import Request, SamplingParams

    engine = build_engine(spec, str(root), max_adapters=32, max_batch=32, device=device)
    engine.eos = set()
    spent = {"prefill forward": 0.0, "decode forward": 0.0}
    forward = engine._forward

    def timed(ids, *args, **kwargs):
        start = time.perf_counter()
        result = forward(ids, *args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        spent["decode forward" if ids.shape[1] == 1 else "prefill forward"] += time.perf_counter() - start
        return result

    engine._forward = timed

    def run(count: int) -> list:
        requests = [Request(engine.tokenizer(PROMPT.format(i=i))["input_ids"], names[i % 32],
                            SamplingParams(max_tokens=max_tokens), lease=engine.store.lease(names[i % 32]))
                    for i in range(count)]
        return engine.generate(requests)

    run(32)  # warm-up
    rates = decode_rates(limit)
    spent.update({k: 0.0 for k in spent})
    start = time.perf_counter()
    tokens = sum(len(r.generated) for r in run(64))
    total = time.perf_counter() - start
    rates += decode_rates(limit)
    return {"tokens/s": tokens / total, "engine / model limit": tokens / total / statistics.median(rates),
            **{f"{k} share": v / total for k, v in spent.items()},
            "everything else share": 1 - sum(spent.values()) / total}


def server(rounds: int, spec: str, device: str, bf16: bool, max_tokens: int = 32, logs: Path | None = None,
           load_test: bool = True, eos: bool = False, compare_loop: bool = False) -> None:
    import httpx

    import lorakit
    from serving_helpers import free_port

    # label -> (dtype, event loop)
    variants = {"fp32": ("fp32", "asyncio"), **({"bf16": ("bf16", "asyncio")} if bf16 else {}),
                **({"fp32 uvloop": ("fp32", "uvloop")} if compare_loop else {})}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = random_adapters(lorakit.load_model(spec), root, [8] * 32)
        processes, urls = [], {}
        for label, (dtype, loop) in variants.items():
            port = free_port()
            log = logs / f"server-{label}.log" if logs else None
            output = open(log, "w") if log else subprocess.DEVNULL
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "lorakit", "serve", spec, "--adapters", str(root), "--port", str(port),
                 "--max-adapters", "32", "--max-batch", "32", "--dtype", dtype, "--device", device, "--loop", loop],
                stdout=output, stderr=subprocess.STDOUT))
            urls[label] = f"http://127.0.0.1:{port}"
        try:
            for (label, url), process in zip(urls.items(), processes):
                _wait_for(url, process, logs / f"server-{label}.log" if logs else None)
                # warm-up: every adapter loaded once, so the rounds measure decoding, not loading
                asyncio.run(_load_test(url, names, 64, 32, 2))
            limits = model_limit(spec, root, names, device, torch.float32, max_tokens)
            runs: dict[str, list[float]] = {}
            ratios: dict[str, list[float]] = {}  # each load test against the limit timed just before and after it
            for r in range(rounds):
                for variant, url in urls.items():
                    for label in (["1 adapter", "32 adapters in rotation"][:: 1 if r % 2 == 0 else -1]):
                        models = names[:1] if label == "1 adapter" else names
                        limit = decode_rates(limits[label])  # the servers are idle meanwhile
                        result = asyncio.run(_load_test(url, models, 64, 32, max_tokens, ignore_eos=not eos))
                        limit += decode_rates(limits[label])
                        assert not result["errors"], result["errors"]
                        speed = result["tokens"] / result["seconds"]
                        runs.setdefault(f"model limit, {label}", []).extend(limit)
                        runs.setdefault(f"server {variant}, {label}", []).append(speed)
                        ratios.setdefault(f"{variant}, {label}", []).append(speed / statistics.median(limit))
                    first, speed = _single(url, names[0], max_tokens)
                    runs.setdefault(f"single request {variant}: time to first token (ms)", []).append(first * 1000)
                    runs.setdefault(f"single request {variant}: tokens/s", []).append(speed)
            medians = {k: statistics.median(v) for k, v in runs.items()}
            print(f"### Server on {device} (model {spec}, 32 rank-8 adapters, 64 requests x "
                  f"{'up to ' if eos else ''}{max_tokens} tokens a round ({'ending at EOS' if eos else 'ignore_eos'}), "
                  f"32 concurrent; median of {rounds} interleaved rounds)\n")
            print("| measure | value |\n|---|---:|")
            for label, value in medians.items():
                print(f"| {label} | {value:.1f} |")
            for variant in urls:
                for label in ("1 adapter", "32 adapters in rotation"):
                    each = ratios[f"{variant}, {label}"]
                    print(f"\nserver {variant} / model limit (fp32), {label}: {statistics.median(each):.3f} "
                          f"(target >= 0.9; each round against the limit timed around it: "
                          f"{', '.join(f'{v:.3f}' for v in each)})")
                ratio = medians[f"server {variant}, 32 adapters in rotation"] / medians[f"server {variant}, 1 adapter"]
                print(f"server {variant}, 32 adapters / 1 adapter: {ratio:.3f} (target >= 0.95)")
            bound, size, bandwidth = factor_read_bound(root, names, medians["model limit, 1 adapter"])
            forward = medians["model limit, 32 adapters in rotation"] / medians["model limit, 1 adapter"]
            print(f"the model's own decode forward, 32 adapters / 1 adapter: {forward:.3f}; the bound from reading "
                  f"32 adapters' factors ({size / 1e6:.0f} MB) each step at {bandwidth / 1e9:.1f} GB/s: {bound:.3f}")
            breakdown = engine_breakdown(spec, root, names, device, max_tokens, limits["32 adapters in rotation"])
            print("\nThe engine alone on the same work (no HTTP; 64 requests, 32 adapters in rotation): "
                  + ", ".join(f"{k} {v:.1f}" if k == "tokens/s" else f"{k} {v:.3f}" for k, v in breakdown.items()))
            if "bf16" in urls:
                ratio = medians["server bf16, 32 adapters in rotation"] / medians["server fp32, 32 adapters in rotation"]
                same = sum(a == b for a, b in zip(_greedy_texts(urls["fp32"], names[0], 8, max_tokens),
                                                  _greedy_texts(urls["bf16"], names[0], 8, max_tokens)))
                print(f"\nbf16 / fp32 server tokens/s: {ratio:.3f}; greedy texts identical: {same} of 8\n")

            if not load_test:
                return
            url = urls["fp32"]
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
            for process in processes:
                process.terminate()
                process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--model", default="smollm2-135m", help="the served model (a spec lorakit serve takes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also serve bf16 weights and compare")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-log", type=Path, help="write each server's output to this directory")
    parser.add_argument("--skip-load-test", action="store_true")
    parser.add_argument("--compare-loop", action="store_true",
                        help="also serve fp32 on uvloop + httptools (pip install uvloop httptools), beside asyncio + h11")
    parser.add_argument("--eos", action="store_true",
                        help="answers end at the model's EOS (default: ignore_eos, every answer max-tokens long)")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; torch {torch.__version__}\n")
    if not args.skip_mixed:
        mixed_batch(args.rounds, args.layers)
    if not args.skip_load:
        loading(args.rounds)
    if not args.skip_server:
        server(args.rounds, args.model, args.device, args.bf16, args.max_tokens, args.server_log,
               not args.skip_load_test, args.eos, args.compare_loop)


if __name__ == "__main__":
    main()

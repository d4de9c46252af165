"""Where one decode step of the serving engine spends its time, at batch 1 and at batch 32.

The engine serves the embedded SmolLM2-135M-Instruct (float32) with adapter slots, as
``lorakit serve`` does, and decodes 32 greedy tokens per request, end-of-sequence ignored,
every row on one random rank-16 adapter. The decode steps run under ``torch.profiler``; each
operator's own CPU time goes to one bucket:

    matmuls             the base weights' and the adapters' products (mm, addmm, bmm, linear)
    attention           scaled_dot_product_attention
    norms/rope/elementwise  RMSNorm, rotary embedding, SiLU, adds, casts, copies
    KV cache            cat / index_select / narrow / copy_ (serve/kvcache.py; copies elsewhere too)
    sampling            the engine's choose_tokens (argmax, sampling, log-probs)
    other operators     everything else PyTorch ran
    Python and dispatch the rest of the step's wall time: module calls, transformers' generic
                        forward, the engine's own bookkeeping

The adapter's share is measured apart: the same steps with no adapter on the rows (slot
BASE) and the difference taken. The profiler records every operator, which slows the step;
the buckets are its view, and the last row is the same steps timed without it.

The server's own loop is measured apart too: one request of 128 tokens streamed through
``lorakit serve`` (HTTP, the engine's thread, server-sent events) against the same request
run by the engine in this process, in milliseconds per token.

    python bench/profile_decode.py [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import random_adapters  # noqa: E402

BUCKETS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
                "aten::addmm_", "aten::baddbmm_"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_attention_math"),
    "KV cache": ("aten::cat", "aten::index_select", "aten::narrow", "aten::slice_scatter", "aten::copy_"),
    "norms/rope/elementwise": ("aten::mul", "aten::add", "aten::add_", "aten::rsqrt", "aten::pow", "aten::mean",
                               "aten::silu", "aten::neg", "aten::to", "aten::_to_copy", "aten::sin", "aten::cos",
                               "aten::sub", "aten::div", "aten::mul_", "aten::embedding", "aten::where"),
}


def bucket_of(name: str) -> str:
    return next((bucket for bucket, names in BUCKETS.items() if name in names), "other operators")


def profile(engine, requests_for, rows: int, tokens: int) -> dict[str, float]:
    """Seconds per decode step by bucket, over ``tokens`` steps of ``rows`` rows."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lorakit.serve import engine as engine_module

    sampling = [0.0]
    choose = engine_module.choose_tokens

    def timed_choose(*args, **kwargs):
        start = time.perf_counter()
        try:
            return choose(*args, **kwargs)
        finally:
            sampling[0] += time.perf_counter() - start

    plain = decode_seconds(engine, requests_for, rows, tokens)  # the same steps without the profiler's own cost
    for request in requests_for(rows):  # admit and prefill outside the measurement
        engine.submit(request)
    engine.step()
    engine_module.choose_tokens = timed_choose
    try:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(tokens - 2):
                engine.step()
            wall = time.perf_counter() - start
    finally:
        engine_module.choose_tokens = choose
    while engine.busy:
        engine.step()
    spent: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.cpu_parent is None and event.name.startswith("aten::"):  # top-level operators only
            spent[bucket_of(event.name)] += event.cpu_time_total / 1e6
    steps = tokens - 2
    result = {bucket: seconds / steps for bucket, seconds in spent.items()}
    result["sampling"] = sampling[0] / steps
    measured = sum(result.values())
    result["Python and dispatch"] = max(0.0, wall / steps - measured)
    result["step"] = wall / steps
    result["step without the profiler"] = plain
    return result


def decode_seconds(engine, requests_for, rows: int, tokens: int) -> float:
    """Seconds per decode step of ``rows`` rows, prefill excluded, nothing recorded."""
    for request in requests_for(rows):
        engine.submit(request)
    engine.step()
    start = time.perf_counter()
    for _ in range(tokens - 2):
        engine.step()
    seconds = (time.perf_counter() - start) / (tokens - 2)
    while engine.busy:
        engine.step()
    return seconds


def server_loop(engine, root: Path, adapter: str, prompt: list[int], text: str, tokens: int = 128) -> tuple[float, float]:
    """Milliseconds per token after the first of one greedy request on ``adapter``: run by
    ``engine`` here, and streamed by ``lorakit serve`` (2 threads) in a subprocess."""
    import subprocess

    from bench_llamacpp import _wait, single
    from serving_helpers import free_port

    from lorakit.serve.request import Request, SamplingParams

    def here() -> float:
        times: list[float] = []
        request = Request(list(prompt), adapter, SamplingParams(max_tokens=tokens, ignore_eos=True),
                          lease=engine.store.lease(adapter), on_text=lambda _: times.append(time.perf_counter()))
        engine.generate([request])
        return (times[-1] - times[0]) / (len(times) - 1) * 1e3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "smollm2-135m", "--adapters", str(root),
                               "--port", str(port), "--threads", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, server)
        request = {"model": adapter, "prompt": text, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        single(url, {**request, "max_tokens": 4})  # warm-up
        served = [1e3 / single(url, request) for _ in range(3)]
    finally:
        server.kill()
    return min(here() for _ in range(3)), min(served)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    import lorakit
    from lorakit.serve.engine import build_engine
    from lorakit.serve.request import Request, SamplingParams

    with tempfile.TemporaryDirectory() as root:
        names = random_adapters(lorakit.load_model("smollm2-135m"), Path(root), [16])
        engine = build_engine("smollm2-135m", root, max_adapters=2, max_batch=32)
        text = "Tell me about the sea."
        prompt = engine.tokenizer(text)["input_ids"]
        params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

        def with_adapter(rows):
            return [Request(list(prompt), names[0], params, lease=engine.store.lease(names[0])) for _ in range(rows)]

        def base(rows):
            return [Request(list(prompt), None, params) for _ in range(rows)]

        profile(engine, with_adapter, 1, 8)  # warm-up
        table = {}
        for rows in (1, 32):
            table[f"batch {rows}, adapter"] = profile(engine, with_adapter, rows, args.tokens)
            table[f"batch {rows}, base"] = profile(engine, base, rows, args.tokens)
        here, served = server_loop(engine, Path(root), names[0], prompt, text)
    columns = list(table)
    buckets = ["matmuls", "attention", "norms/rope/elementwise", "KV cache", "sampling", "other operators",
               "Python and dispatch", "step", "step without the profiler"]
    print("| ms per decode step | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for bucket in buckets:
        print(f"| {bucket} | " + " | ".join(f"{table[c].get(bucket, 0.0) * 1e3:.1f}" for c in columns) + " |")
    for rows in (1, 32):
        key = "step without the profiler"
        extra = table[f"batch {rows}, adapter"][key] - table[f"batch {rows}, base"][key]
        print(f"batch {rows}: the adapter adds {extra * 1e3:.1f} ms a step "
              f"({extra / table[f'batch {rows}, base'][key]:.0%} of the base step), without the profiler")
    print(f"one request, one adapter, 128 tokens: {here:.1f} ms a token in this process, {served:.1f} ms streamed "
          f"by lorakit serve: the server's own loop adds {served - here:.1f} ms a token")


if __name__ == "__main__":
    main()

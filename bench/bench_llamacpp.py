"""lorakit serve against llama.cpp's server on the same model and the same adapters.

SmolLM2-135M-Instruct, float32 weights on both sides (llama.cpp reads the float32 GGUF and the
adapter GGUFs lorakit writes), 32 random LoRA adapters (rank 8, all linear layers), 128 new
tokens per request, greedy, 2 threads each; llama.cpp's server runs from the prebuilt
``xllamacpp`` wheel (its HTTP server, 32 slots, adapters loaded at start and chosen per request
with ``"lora": [{"id": i, "scale": 1}]``; the base cases go to a second llama.cpp server with no
adapter loaded, since one with 32 adapters loaded runs a request that names none far slower than
one that names one: 10.5 against 30 tokens/s here). Each round runs every case on both servers, in
alternating order; the table gives lorakit / llama.cpp tokens/s per round.

Cases: one request at a time on one adapter and on the base (tokens/s after the first token,
and the time to the first token); 32 concurrent requests on one adapter, on the base, and on
32 different adapters (aggregate tokens/s).

The time to the first token is the latency of a one-token completion of a prompt neither server
has seen (the streams' first text is not comparable: with ``ignore_eos`` llama.cpp bans the
end-of-sequence token where lorakit, as vLLM, samples it and goes on, and this prompt's first
greedy token is that token, which has no text), with llama.cpp's ``cache_prompt`` off (it
otherwise starts from a slot's cached prompt sharing a prefix with the new one; lorakit keeps no
prompt cache). Also: the time of ``lorakit convert --to gguf`` for
an r=16 all-linear adapter of the model, and of ``lorakit merge --to gguf``.

    python bench/bench_llamacpp.py [--rounds 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_helpers import free_port  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "Question {i}: which three things should a new gardener know about tomatoes? Answer:"
LLAMA_SERVER = """
import sys, time, xllamacpp as x
p = x.CommonParams()
p.model.path = sys.argv[1]; p.port = int(sys.argv[2]); p.n_parallel = 32; p.n_ctx = 32 * 320
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
p.lora_init_without_apply = True  # every adapter at scale 0 unless a request names it
p.lora_adapters = [x.CommonAdapterLoraInfo(a, 1.0) for a in sys.argv[3:]]
server = x.Server(p)
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def adapters(root: Path, count: int, rank: int) -> list[str]:
    """Adapters with random A and B (as if trained), as PEFT directories and as GGUFs."""
    import lorakit
    from lorakit.llamacpp import export_adapter_gguf

    model = lorakit.load_model(MODEL)
    names = []
    for i in range(count):
        lorakit.attach(model, lorakit.LoraConfig(rank=rank, alpha=2 * rank), name="tmp")
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in (p for n, p in model.named_parameters() if ".adapters.tmp." in n):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        lorakit.save_adapter(model, root / "peft" / f"a{i}", name="tmp")
        lorakit.delete_adapter(model, "tmp")
        export_adapter_gguf(root / "peft" / f"a{i}", MODEL, root / f"a{i}.gguf")
        names.append(f"a{i}")
    return names


def file_times(root: Path) -> dict[str, float]:
    """Seconds of lorakit convert --to gguf (r=16, all linear) and of merge --to gguf, in-process."""
    from lorakit.llamacpp import export_adapter_gguf, merge_to_gguf

    adapters(root / "r16", 1, 16)
    start = time.perf_counter()
    export_adapter_gguf(root / "r16" / "peft" / "a0", MODEL, root / "r16.gguf")
    convert = time.perf_counter() - start
    start = time.perf_counter()
    merge_to_gguf(MODEL, root / "r16" / "peft" / "a0", root / "merged.gguf")
    return {"convert --to gguf (r=16, all linear)": convert, "merge --to gguf (f32)": time.perf_counter() - start}


def _wait(url: str, process: subprocess.Popen) -> None:
    import httpx

    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({process.returncode})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: no answer")


def body(server: str, adapter: int | None, i: int, max_tokens: int) -> dict:
    request = {"prompt": PROMPT.format(i=i), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if server == "lorakit":
        request["model"] = f"a{adapter}" if adapter is not None else MODEL
    elif adapter is not None:
        request["lora"] = [{"id": adapter, "scale": 1.0}]
    return request


def first_token(url: str, request: dict) -> float:
    """Seconds to complete ``request`` with one token (prefill and the first token), not streamed."""
    import httpx

    start = time.perf_counter()
    reply = httpx.post(url + "/v1/completions", json={**request, "max_tokens": 1}, timeout=600)
    reply.raise_for_status()
    return time.perf_counter() - start


def single(url: str, request: dict) -> float:
    """One request alone, streamed: tokens/s after its first text."""
    import httpx

    start, first, count = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json={**request, "stream": True}, timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                count += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return (count - 1) / max(end - first, 1e-9)


async def concurrent(url: str, requests: list[dict]) -> float:
    """Aggregate completion tokens/s of ``requests`` sent at once."""
    import httpx

    async with httpx.AsyncClient(timeout=900) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(client.post(url + "/v1/completions", json=r) for r in requests))
        seconds = time.perf_counter() - start
    for reply in replies:
        reply.raise_for_status()
    return sum(r.json()["usage"]["completion_tokens"] for r in replies) / seconds


def cases() -> dict:
    return {
        "one request at a time, one adapter": ("single", lambda i: 0),
        "one request at a time, base": ("single", lambda i: None),
        "32 concurrent, one adapter": ("concurrent", lambda i: 0),
        "32 concurrent, base": ("concurrent", lambda i: None),
        "32 concurrent, 32 adapters": ("concurrent", lambda i: i),
    }


def measure(urls: dict[str, str], server: str, shape: str, adapter_of, max_tokens: int,
            fresh: int) -> tuple[float, float | None]:
    """tokens/s, and for single requests the median time to the first token; ``fresh``: the
    number of the first prompt no server has seen."""
    base = adapter_of(0) is None
    url = urls["llama.cpp base" if server == "llama.cpp" and base else server]
    if shape == "single":
        rates = [single(url, body(server, adapter_of(i), i, max_tokens)) for i in range(2)]
        unseen = [body(server, adapter_of(0), fresh + i, 1) for i in range(3)]
        if server == "llama.cpp":
            unseen = [{**request, "cache_prompt": False} for request in unseen]
        return statistics.median(rates), statistics.median(first_token(url, request) for request in unseen)
    requests = [body(server, adapter_of(i), i, max_tokens) for i in range(32)]
    return asyncio.run(concurrent(url, requests)), None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    from lorakit.llamacpp import write_base_gguf

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        times = file_times(root)
        names = adapters(root, 32, 8)
        base = write_base_gguf(MODEL, root / "smollm2-f32.gguf")
        ports = {"lorakit": free_port(), "llama.cpp": free_port(), "llama.cpp base": free_port()}
        processes = {
            "lorakit": subprocess.Popen([sys.executable, "-m", "lorakit", "serve", MODEL, "--adapters",
                                         str(root / "peft"), "--port", str(ports["lorakit"]), "--max-adapters", "32",
                                         "--max-batch", "32", "--threads", "2"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            "llama.cpp": subprocess.Popen([sys.executable, "-c", LLAMA_SERVER, str(base), str(ports["llama.cpp"]),
                                           *(str(root / f"{n}.gguf") for n in names)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            "llama.cpp base": subprocess.Popen([sys.executable, "-c", LLAMA_SERVER, str(base),
                                                str(ports["llama.cpp base"])],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        }
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        try:
            for name, process in processes.items():
                _wait(urls[name], process)
                server = "llama.cpp" if name.startswith("llama.cpp") else name
                adapter_of = (lambda i: None) if name.endswith("base") else (lambda i: i)
                asyncio.run(concurrent(urls[name], [body(server, adapter_of(i), i, 2) for i in range(32)]))  # warm-up
            results: dict[str, list[tuple[float, float, float | None, float | None]]] = {c: [] for c in cases()}
            prompts_unseen = itertools.count(1000, 10)  # warm-up and the streams use prompts 0..31
            for r in range(args.rounds):
                for case, (shape, adapter_of) in cases().items():
                    order = ["lorakit", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "lorakit"]
                    fresh = next(prompts_unseen)
                    measured = {s: measure(urls, s, shape, adapter_of, args.max_tokens, fresh) for s in order}
                    results[case].append((*measured["lorakit"], *measured["llama.cpp"]))
                    print(f"round {r + 1}: {case}: lorakit {measured['lorakit'][0]:.1f} tok/s, llama.cpp "
                          f"{measured['llama.cpp'][0]:.1f} tok/s", flush=True)
        finally:
            for process in processes.values():
                process.kill()
    print(f"\ntorch {torch.__version__}, 2 threads each, {args.max_tokens} new tokens per request, greedy\n")
    print("| case | lorakit tok/s | llama.cpp tok/s | lorakit / llama.cpp (per round) | time to first token, "
          "lorakit / llama.cpp |\n|---|---:|---:|---|---|")
    for case, rows in results.items():
        ratios = ", ".join(f"{row[0] / row[2]:.2f}" for row in rows)
        first = ", ".join(f"{row[1] * 1e3:.0f} / {row[3] * 1e3:.0f} ms" for row in rows if row[1] is not None)
        print(f"| {case} | {statistics.median(r[0] for r in rows):.1f} | {statistics.median(r[2] for r in rows):.1f}"
              f" | {ratios} | {first or '-'} |")
    for what, seconds in times.items():
        print(f"{what}: {seconds:.1f} s")


if __name__ == "__main__":
    main()

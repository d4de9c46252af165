"""lorakit generate and lorakit serve: one base model, many adapters."""

from __future__ import annotations

from typing import Annotated

import typer

from .base import ADAPTER_HELP, DTYPES, QUANTIZE_HELP, app, console, named_adapters, user_errors


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Base model: HF model dir, Hub id (org/name[@revision]), .gguf file, or smollm2-135m.")],
    prompt: Annotated[list[str], typer.Option(help="A prompt; repeat for a batch.")],
    adapter: Annotated[list[str] | None, typer.Option(help=ADAPTER_HELP)] = None,
    use: Annotated[list[str] | None, typer.Option(
        help="Adapter name for each prompt, in order ('base' for none); one name applies to all.")] = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeatable.")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Render prompts with the chat template.")] = True,
    quantize: Annotated[str | None, typer.Option(help=QUANTIZE_HELP)] = None,
) -> None:
    """Generate for a batch of prompts, each with its own adapter, in one batch.

    Example: lorakit generate smollm2-135m --adapter sv=runs/demo/adapter --prompt "Hej!" --prompt "Hello!" --use sv --use base
    """
    from ..serve.engine import SamplingParams, build_engine, complete

    with user_errors():
        named = named_adapters(adapter)
        uses = list(use or ([next(iter(named))] if named else ["base"]))
        if len(uses) == 1:
            uses *= len(prompt)
        if len(uses) != len(prompt):
            raise ValueError(f"--use given {len(uses)} times for {len(prompt)} prompts")
        unknown = sorted(set(uses) - set(named) - {"base"})
        if unknown:
            raise ValueError(f"--use names {unknown}, but the adapters are {sorted(named) or 'none'}")
        engine = build_engine(model, max_adapters=max(1, len(named)), max_batch=len(prompt), quantize=quantize)
        for name, path in named.items():
            engine.store.add_directory(name, path)
        params = SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop or ()))
        requests = complete(engine, prompt, [None if u == "base" else u for u in uses], params, chat)
    for text, name, request in zip(prompt, uses, requests):
        console.print(f"[bold]{name}[/bold] > {text}", highlight=False)
        console.print(f"  {request.text!r} ({request.finish_reason})", highlight=False)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Base model: HF model dir, Hub id (org/name[@revision]), .gguf file, or smollm2-135m.")],
    adapters: Annotated[str | None, typer.Option(help="Root directory of PEFT adapters, one per directory.")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help=ADAPTER_HELP)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    name: Annotated[str | None, typer.Option(help="Model name of the base (default: the spec's name).")] = None,
    max_adapters: Annotated[int, typer.Option(help="Adapters kept loaded at once (LRU).")] = 8,
    max_adapter_mib: Annotated[float | None, typer.Option(help="Bytes of loaded adapters, in MiB (LRU).")] = None,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together.")] = 32,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted.")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens accepted.")] = 512,
    max_queue: Annotated[int, typer.Option(help="Requests waiting or decoding before 429.")] = 256,
    dtype: Annotated[str, typer.Option(help="Base weight dtype: fp32, bf16 (faster on CPUs with AVX512-BF16 "
                                            "or AMX, and on GPUs), fp16. Adapters stay float32.")] = "fp32",
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu or cuda.")] = "auto",
    quantize: Annotated[str | None, typer.Option(help=QUANTIZE_HELP + " Overrides --dtype (bf16 compute).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for the model (default: the cores this process may use; on a shared host, "
             "give each server its share).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        help="On SIGTERM/Ctrl-C: seconds in-flight requests may finish before they are cancelled.")] = 30.0,
    allow_runtime_lora: Annotated[bool, typer.Option(
        "--allow-runtime-lora", help="Enable /v1/load_lora_adapter and /v1/unload_lora_adapter.")] = False,
    loop: Annotated[str, typer.Option(help="Event loop and HTTP parser: asyncio (the standard library's, with h11) "
                                           "or uvloop (with httptools; pip install uvloop httptools).")] = "asyncio",
) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API.

    Example: lorakit serve smollm2-135m --adapters runs/adapters --port 8000
    """
    from pathlib import Path

    import torch
    import uvicorn

    from ..hub import parse as hub_id
    from ..serve.engine import build_engine
    from ..serve.server import Limits, create_app, serve_here

    with user_errors():
        _check_serving_flags(threads, loop, dtype)
        max_bytes = int(max_adapter_mib * 2**20) if max_adapter_mib is not None else None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = build_engine(model, adapters, max_adapters, max_bytes, max_batch, getattr(torch, DTYPES[dtype]),
                              device, quantize)
        named = named_adapters(adapter)
        for adapter_name, source in named.items():
            engine.store.add_directory(adapter_name, source)
    # a Hub id is the model's name, as vLLM serves it; a directory is named after itself
    base_id = hub_id(model)
    base_name = name or (base_id.repo if base_id else Path(model.rstrip("/")).name)
    app_ = create_app(engine, base_name, Limits(max_prompt_tokens, max_tokens, max_queue), allow_runtime_lora,
                      engine_thread=False)
    sources = ", ".join([*([adapters] if adapters else []), *named]) or "(none)"
    console.print(f"serving {base_name} and adapters from {sources} on http://{host}:{port} "
                  f"({device}, {quantize or dtype}, {torch.get_num_threads()} threads)")
    # asyncio by default: on a CPU, uvloop + httptools measured no faster (bench_serve --compare-loop).
    config = uvicorn.Config(app_, host=host, port=port, log_level="warning", loop=loop,
                            http="httptools" if loop == "uvloop" else "h11",
                            timeout_graceful_shutdown=max(int(round(shutdown_timeout)), 1))
    if not serve_here(app_, config):
        raise typer.Exit(1)


def _check_serving_flags(threads: int | None, loop: str, dtype: str) -> None:
    """Refuse bad --threads / --loop / --dtype, then give torch its threads."""
    import importlib.util
    import os

    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if loop not in ("asyncio", "uvloop"):
        raise ValueError(f"--loop must be asyncio or uvloop, got {loop!r}")
    if loop == "uvloop" and not all(importlib.util.find_spec(m) for m in ("uvloop", "httptools")):
        raise ValueError("--loop uvloop needs the packages uvloop and httptools: pip install uvloop httptools")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or cores)

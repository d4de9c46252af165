"""lorakit inspect and lorakit plan: what a model is and what training it will need."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..config import ALL_LINEAR, LoraConfig
from .base import DTYPES, _size, app, console, parse_targets, user_errors


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Preset (qwen2-0.5b, llama-3.2-1b, llama-2-7b, smollm2-135m), "
                                              "model dir, Hub id, config.json, .gguf file, or linear:OUTxIN.")],
    rank: Annotated[int, typer.Option(help="LoRA rank r.")],
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 * rank).")] = None,
    targets: Annotated[str, typer.Option(help="'all-linear', comma-separated names, or re:<regex>.")] = ALL_LINEAR,
    dtype: Annotated[str, typer.Option(help="Base weight dtype for the memory estimate: bf16, fp16, fp32.")] = "bf16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Count LoRA parameters, adapter size and training memory, without loading weights.

    Example: lorakit inspect qwen2-0.5b --rank 24 --targets all-linear
    """
    import torch

    from ..report import inspect_model

    if dtype not in DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(DTYPES)}", param_hint="--dtype")
    with user_errors():
        config = LoraConfig(rank=rank, alpha=alpha if alpha is not None else 2 * rank, targets=parse_targets(targets))
        report = inspect_model(model, config, getattr(torch, DTYPES[dtype]))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    table = Table(title=f"LoRA r={rank}, alpha={config.alpha:g} on {model}")
    table.add_column("module")
    table.add_column("count", justify="right")
    table.add_column("trainable params", justify="right")
    for name, (count, params) in report.by_type.items():
        table.add_row(name, f"{count:,}", f"{params:,}")
    console.print(table)
    console.print(f"base parameters       {report.base_params:,}")
    console.print(f"trainable parameters  {report.trainable_params:,} "
                  f"({report.trainable_percent:.2f} % of {report.base_params + report.trainable_params:,})")
    if report.expert_tensors:
        console.print(f"expert tensors        {report.expert_tensors} adapted, {report.experts} experts each "
                      "(one low-rank update per expert)")
    console.print(f"adapter file          {_size(report.adapter_bytes_fp32)} fp32, {_size(report.adapter_bytes_bf16)} bf16")
    console.print(f"training memory       LoRA {_size(report.memory_lora_bytes)} vs full fine-tuning "
                  f"{_size(report.memory_full_bytes)} ({report.weight_dtype} weights; weights + gradients + "
                  "AdamW states; activations and framework overhead excluded)")


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Preset (qwen2-0.5b, llama-3.2-1b, llama-2-7b, smollm2-135m), "
                                              "model dir, Hub id or config.json.")],
    method: Annotated[list[str] | None, typer.Option(help="full, lora, qlora, dpo or grpo (LoRA trained by DPO / "
                                                          "GRPO); repeatable (default: full, lora, qlora).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    batch: Annotated[int, typer.Option(help="Sequences per forward pass (micro-batch); DPO: pairs.")] = 1,
    seq: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    gpu: Annotated[str | None, typer.Option(help="Memory to fit in, e.g. 24GiB: adds a fits column "
                                                 "(the peak plus 1 GiB for the CUDA context).")] = None,
    dtype: Annotated[str, typer.Option(help="Weight and activation dtype of full and LoRA training: bf16, fp16, "
                                            "fp32 (QLoRA computes in bf16).")] = "bf16",
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Plan with activations recomputed in backward.")] = False,
    targets: Annotated[str, typer.Option(help="'all-linear', comma-separated names, or re:<regex>.")] = ALL_LINEAR,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per method.")] = False,
    rollouts: Annotated[int | None, typer.Option(help="GRPO: rows decoded at once (default: --batch).")] = None,
) -> None:
    """Estimate peak training memory (weights, adapter, gradients, optimizer, activations, logits).

    Example: lorakit plan llama-2-7b --seq 2048 --gpu 24GiB --gradient-checkpointing
    """
    import torch

    from ..plan import DEFAULT_METHODS, METHODS, parse_size
    from ..plan import plan as make_plan

    if dtype not in DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(DTYPES)}", param_hint="--dtype")
    with user_errors():
        unknown = sorted(set(method or ()) - set(METHODS))
        if unknown:
            raise ValueError(f"--method {unknown[0]!r}: choose among {', '.join(METHODS)}")
        gpu_bytes = parse_size(gpu) if gpu else None
        plans = [make_plan(model, m, rank, batch, seq, getattr(torch, DTYPES[dtype]), gradient_checkpointing,
                           gpu_bytes, parse_targets(targets), rollouts) for m in (method or DEFAULT_METHODS)]
    if as_json:
        print(json.dumps([p.to_json() for p in plans], indent=2))
        return
    from rich import box

    console.print(f"Peak training memory in GiB: {model}, {batch} x {seq} tokens"
                  + (", gradient checkpointing" if gradient_checkpointing else "") + (f"; fits: in {gpu}" if gpu else ""))
    table = Table(box=box.SIMPLE_HEAD)
    columns = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "peak")
    headers = ("weights", "adapter", "grads", "AdamW", "activ.", "logits", "peak")
    table.add_column("method", no_wrap=True)
    rollout_column = any(p.kv_cache_bytes for p in plans)
    if rollout_column:
        headers = (*headers[:-1], "KV", headers[-1])
    for header in (*headers, *(("fits",) if gpu else ())):
        table.add_column(header, justify="right", min_width=len(header))
    for p in plans:
        sizes = [f"{getattr(p, f'{c}_bytes') / 2**30:.2f}" for c in columns]
        label = p.method + ("" if p.method == "full" else f" r={p.rank}")
        if rollout_column:  # GRPO: the rollouts' KV cache, held while decoding instead of activations
            sizes.insert(len(columns) - 1, f"{p.kv_cache_bytes / 2**30:.2f}" if p.kv_cache_bytes else "-")
        table.add_row(label, *sizes, *((("yes" if p.fits else "no"),) if gpu else ()))
    console.print(table)
    console.print(f"dtype {DTYPES[dtype]}"
                  + ("; QLoRA: NF4 linear weights, bfloat16 compute" if "qlora" in [p.method for p in plans] else ""))
    console.print("AdamW; every token trained; not counted: allocator caching, the CUDA context, kernel workspaces.")

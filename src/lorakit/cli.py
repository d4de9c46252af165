"""The ``lorakit`` command line: one function per subcommand, each calling the library."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .config import ALL_LINEAR, LoraConfig

app = typer.Typer(help="LoRA adapters for PyTorch models.", no_args_is_help=True, add_completion=False)
console = Console()



@app.callback()
def _root() -> None:
    """LoRA adapters for PyTorch models: inspect, train, merge, generate, serve."""


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_targets(value: str) -> str | tuple[str, ...]:
    """'all-linear', 're:<regex>' or comma-separated module names."""
    if value == ALL_LINEAR:
        return ALL_LINEAR
    if value.startswith("re:"):
        return value[3:]
    return tuple(name.strip() for name in value.split(",") if name.strip())


@contextmanager
def user_errors() -> Iterator[None]:
    """Show lorakit's own errors (bad spec, config, file) as one line and exit 2, without a traceback."""
    try:
        yield
    except ValueError as err:  # every lorakit error class is a ValueError
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Preset (qwen2-0.5b, llama-3.2-1b, llama-2-7b, smollm2-135m), "
                                              "model dir, config.json, .gguf file, or linear:OUTxIN.")],
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

    from .report import inspect_model

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
    console.print(f"adapter file          {_size(report.adapter_bytes_fp32)} fp32, {_size(report.adapter_bytes_bf16)} bf16")
    console.print(f"training memory       LoRA {_size(report.memory_lora_bytes)} vs full fine-tuning "
                  f"{_size(report.memory_full_bytes)} ({report.weight_dtype} weights; weights + gradients + "
                  "AdamW states; activations and framework overhead excluded)")


def main() -> None:
    app()

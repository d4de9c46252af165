"""The command line's shared parts: the app, its consoles, and the parsing of common flags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from ..config import ALL_LINEAR, TARGET_SETS
from ..quiet import be_verbose


app = typer.Typer(help="LoRA adapters for PyTorch models.", no_args_is_help=True, add_completion=False)
# soft_wrap: lines are never broken at 80 columns when the output is a file or a pipe,
# so paths in messages stay whole.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", help="Show third-party warnings and progress "
                                                                   "bars too.")] = False) -> None:
    """LoRA adapters for PyTorch models: inspect, plan, train, merge, generate, serve."""
    if verbose:
        be_verbose()


ADAPTER_HELP = "NAME=SOURCE (or SOURCE): a PEFT adapter directory or Hub id (org/name[@revision]); repeatable."


def named_adapters(items: list[str] | None) -> dict[str, str]:
    """``NAME=SOURCE`` items by name; a bare SOURCE is named after its directory or repository."""
    from ..hub import short_name

    named = {}
    for item in items or []:
        name, _, source = item.rpartition("=")
        named[name or short_name(source)] = source
    return named


QUANTIZE_HELP = "Quantize the frozen base's linear weights: nf4 (QLoRA) or int8; adapters stay float32."


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_targets(value: str) -> str | tuple[str, ...]:
    """'all-linear', a target set ('attention', 'attention-conv'), 're:<regex>' or
    comma-separated module names."""
    if value == ALL_LINEAR or value in TARGET_SETS:
        return value
    if value.startswith("re:"):
        return value[3:]
    return tuple(name.strip() for name in value.split(",") if name.strip())


@contextmanager
def user_errors() -> Iterator[None]:
    """Show lorakit's own errors (bad spec, config, file) as one line and exit 2, without a traceback."""
    try:
        yield
    except ValueError as err:  # every lorakit error class is a ValueError
        errors.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError

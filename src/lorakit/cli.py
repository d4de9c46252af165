"""The ``lorakit`` command line: one function per subcommand, each calling the library."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from inspect import Parameter, Signature
from typing import Annotated, get_type_hints

import typer
from rich.console import Console
from rich.table import Table

from .config import ALL_LINEAR, TARGET_SETS, LoraConfig
from .quantize import QUANTIZATIONS
from .quiet import be_verbose

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
    from .hub import short_name

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


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Preset (qwen2-0.5b, llama-3.2-1b, llama-2-7b, smollm2-135m), "
                                              "model dir, Hub id or config.json.")],
    method: Annotated[list[str] | None, typer.Option(help="full, lora or qlora; repeatable (default: all three).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    batch: Annotated[int, typer.Option(help="Sequences per forward pass (micro-batch).")] = 1,
    seq: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    gpu: Annotated[str | None, typer.Option(help="Memory to fit in, e.g. 24GiB: adds a fits column "
                                                 "(the peak plus 1 GiB for the CUDA context).")] = None,
    dtype: Annotated[str, typer.Option(help="Weight and activation dtype of full and LoRA training: bf16, fp16, "
                                            "fp32 (QLoRA computes in bf16).")] = "bf16",
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Plan with activations recomputed in backward.")] = False,
    targets: Annotated[str, typer.Option(help="'all-linear', comma-separated names, or re:<regex>.")] = ALL_LINEAR,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per method.")] = False,
) -> None:
    """Estimate peak training memory (weights, adapter, gradients, optimizer, activations, logits).

    Example: lorakit plan llama-2-7b --seq 2048 --gpu 24GiB --gradient-checkpointing
    """
    import torch

    from .plan import METHODS, parse_size
    from .plan import plan as make_plan

    if dtype not in DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(DTYPES)}", param_hint="--dtype")
    with user_errors():
        unknown = sorted(set(method or ()) - set(METHODS))
        if unknown:
            raise ValueError(f"--method {unknown[0]!r}: choose among {', '.join(METHODS)}")
        gpu_bytes = parse_size(gpu) if gpu else None
        plans = [make_plan(model, m, rank, batch, seq, getattr(torch, DTYPES[dtype]), gradient_checkpointing,
                           gpu_bytes, parse_targets(targets)) for m in (method or METHODS)]
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
    for header in (*headers, *(("fits",) if gpu else ())):
        table.add_column(header, justify="right", min_width=len(header))
    for p in plans:
        sizes = [f"{getattr(p, f'{c}_bytes') / 2**30:.2f}" for c in columns]
        label = p.method + ("" if p.method == "full" else f" r={p.rank}")
        table.add_row(label, *sizes, *((("yes" if p.fits else "no"),) if gpu else ()))
    console.print(table)
    console.print(f"dtype {DTYPES[dtype]}"
                  + ("; QLoRA: NF4 linear weights, bfloat16 compute" if "qlora" in [p.method for p in plans] else ""))
    console.print("AdamW; every token trained; not counted: allocator caching, the CUDA context, kernel workspaces.")


def train(context: typer.Context, config: str | None, resume: bool, **flags: object) -> None:
    """Fine-tune a causal LM with LoRA; resumable, and under torchrun, distributed.

    Every setting is a flag and a YAML key (--config); flags override the file.

    Example: lorakit train --model smollm2-135m --data chat.jsonl --out runs/chat --rank 16 --epochs 2
    """
    from .training.config import TrainConfig, load_yaml

    given = _given(context, flags)
    with user_errors():
        settings = load_yaml(config) if config else {}
        resolved = TrainConfig.from_dict({**settings, **given}, config or "flags")
        from .training.text import train as run_training

        result = run_training(resolved, resume=resume)  # checks the data before the model loads
    if not _main_process():
        return
    if result.finished_before:
        console.print(f"{result.out} holds a finished run ({result.steps} steps); nothing was changed. "
                      "Use another --out to train again.")
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        console.print(f"held-out loss  {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}")
    console.print(f"trained        {result.steps} steps in {result.seconds:.1f} s, "
                  f"{result.tokens_per_second:,.0f} tokens/s, peak memory {_size(result.peak_memory_bytes)}")
    console.print(f"adapter        {result.adapter} ({_size(result.adapter_bytes)})")
    console.print(f"run files      {result.out}/: config.yaml, metrics.jsonl, loss.png, summary.json, checkpoints/")


def _main_process() -> bool:
    """Under torchrun only the first process reports."""
    return os.environ.get("RANK", "0") == "0"


NONE = "none"  # an optional setting given as --flag none: no value (e.g. --max-grad-norm none)


def _optional(kind: type) -> Callable[[str], object]:
    def parse(text: object) -> object:
        if not isinstance(text, str):  # the default itself
            return text
        if text.lower() in ("none", "null"):
            return NONE
        try:
            return kind(text)
        except ValueError:
            raise typer.BadParameter(f"expected a {kind.__name__} or 'none', got {text!r}") from None
    return parse


def _train_signature(settings: type) -> Signature:
    """A training command's parameters: --config, --resume and one flag per field of its
    settings class, with that field's help and default, so the two can never disagree."""
    hints = get_type_hints(settings)
    parameters = [
        Parameter("context", Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        Parameter("config", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            str | None, typer.Option("--config", help="YAML file of settings; flags override it.")]),
        Parameter("resume", Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--resume", help="Require a checkpoint in --out to continue from.")]),
    ]
    for field in dataclasses.fields(settings):
        flag, kind, default = "--" + field.name.replace("_", "-"), hints[field.name], field.default
        option = dict(help=field.metadata["help"], show_default="none" if default is None else True)
        if kind is bool:
            annotation = Annotated[bool, typer.Option(f"{flag}/--no-{flag[2:]}", **option)]
        elif kind in (int | None, float | None):
            base = int if kind == int | None else float
            annotation = Annotated[str | None, typer.Option(flag, parser=_optional(base),
                                                            metavar=base.__name__.upper(), **option)]
        elif kind in (int, float):
            annotation = Annotated[kind, typer.Option(flag, **option)]
        elif kind == tuple[str, ...]:  # repeatable: --report-to tensorboard --report-to mlflow
            annotation = Annotated[list[str] | None, typer.Option(flag, help=option["help"], show_default="none")]
            default = None
        else:  # str, str | None, and targets (parsed like inspect's --targets)
            annotation = Annotated[str | None, typer.Option(flag, **option)]
            default = default if isinstance(default, str) or default is None else ",".join(default)
        parameters.append(Parameter(field.name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return Signature(parameters)


def _given(context: typer.Context, flags: dict[str, object]) -> dict[str, object]:
    """Only flags typed on the command line override the YAML file; the others show the
    defaults in --help and leave the file's values alone. (By name: typer carries its own
    copy of click's ParameterSource.)"""
    given = {name: None if value is NONE else value for name, value in flags.items()
             if getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"}
    if isinstance(given.get("targets"), str):
        given["targets"] = parse_targets(given["targets"])
    if isinstance(given.get("report_to"), list):
        given["report_to"] = tuple(given["report_to"])
    return given


def train_image(context: typer.Context, config: str | None, resume: bool, **flags: object) -> None:
    """Teach a diffusers UNet a style or a subject with LoRA: images + captions, the
    noise-prediction loss; resumable, and under torchrun, distributed.

    Example: lorakit train-image --model my-pipeline --data photos/ --caption "a photo of sks dog" --out runs/dog
    """
    from .training.config import load_yaml
    from .training.diffusion import ImageTrainConfig, train_image as run_training

    given = _given(context, flags)
    with user_errors():
        settings = load_yaml(config) if config else {}
        result = run_training(ImageTrainConfig.from_dict({**settings, **given}, config or "flags"), resume=resume)
    if not _main_process():
        return
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        console.print(f"held-out denoising loss  {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}")
    console.print(f"trained        {result.steps} steps in {result.seconds:.1f} s, "
                  f"{result.images_per_second:,.1f} images/s, peak memory {_size(result.peak_memory_bytes)}; "
                  f"{result.trainable_parameters:,} trainable parameters "
                  f"({100 * result.trainable_parameters / result.unet_parameters:.2f} % of the UNet)")
    console.print(f"adapter        {result.adapter} (PEFT), {result.out}/diffusers/ (pipe.load_lora_weights), "
                  f"{result.out}/kohya.safetensors")
    console.print(f"run files      {result.out}/: samples.png (before/after), loss.png, metrics.jsonl, "
                  "summary.json, checkpoints/")


def _register_training_commands() -> None:
    """``train`` and ``train-image`` with one flag per field of their settings classes."""
    from .training.config import TrainConfig
    from .training.diffusion import ImageTrainConfig

    train.__signature__ = _train_signature(TrainConfig)
    app.command()(train)
    train_image.__signature__ = _train_signature(ImageTrainConfig)
    app.command("train-image")(train_image)


_register_training_commands()


@app.command()
def combine(
    adapters: Annotated[list[str], typer.Argument(help="PEFT-format adapter directories or Hub ids.")],
    out: Annotated[str, typer.Option(help="Directory for the combined adapter.")],
    weights: Annotated[str | None, typer.Option(help="Comma-separated weight per adapter (default: all 1).")] = None,
    method: Annotated[str, typer.Option(help="cat (exact; alias linear), svd (best rank-R of the exact sum), "
                                             "magnitude_prune, ties, dare_linear, dare_ties.")] = "cat",
    rank: Annotated[int | None, typer.Option(help="Rank of the result (all but cat).")] = None,
    density: Annotated[float, typer.Option(help="Fraction of each task vector kept (pruning methods).")] = 1.0,
    majority_sign: Annotated[str, typer.Option(help="TIES sign election: total or frequency.")] = "total",
    seed: Annotated[int, typer.Option(help="Seed of DARE's random drop.")] = 0,
) -> None:
    """Combine adapters: ΔW = Σ wᵢ·ΔWᵢ per module, written as a PEFT-format adapter.

    Example: lorakit combine runs/style/adapter runs/domain/adapter --weights 0.7,0.3 --method svd --rank 16 --out runs/mix
    """
    from .combine import combine as combine_adapters
    from .files import read_adapter, write_adapter

    with user_errors():
        try:
            values = [float(w) for w in weights.split(",")] if weights else None
        except ValueError:
            raise ValueError(f"--weights: expected comma-separated numbers, got {weights!r}") from None
        result = combine_adapters([read_adapter(path) for path in adapters], values, method, rank, density,
                                  majority_sign, seed)
        path = write_adapter(result.adapter, out)
    _report_kept(result, f"combined {len(adapters)} adapters ({method}) into {path}")


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A PEFT adapter directory, or a diffusers / kohya LoRA file.")],
    out: Annotated[str, typer.Argument(help="Where to write: a directory (peft, diffusers) or a file (kohya).")],
    to: Annotated[str, typer.Option(help="peft, diffusers or kohya.")],
    pipeline: Annotated[str, typer.Option(help="The diffusers pipeline folder the adapter belongs to (only its "
                                               "config.json files are read).")],
    component: Annotated[str, typer.Option(help="The model a PEFT directory belongs to.")] = "unet",
) -> None:
    """Convert an image-model adapter between PEFT's, diffusers' and kohya's files.

    Example: lorakit convert civitai_style.safetensors runs/style --to diffusers --pipeline sd15/
    """
    from .pipelines import convert as convert_adapter

    with user_errors():
        path = convert_adapter(source, out, to, pipeline, component)
    console.print(f"wrote {path}")


@app.command()
def compress(
    adapter: Annotated[str, typer.Argument(help="PEFT-format adapter directory or Hub id.")],
    out: Annotated[str, typer.Option(help="Directory for the compressed adapter.")],
    rank: Annotated[int | None, typer.Option(help="Rank of every module.")] = None,
    energy: Annotated[float | None, typer.Option(help="Per module, the smallest rank keeping this fraction of "
                                                      "‖ΔW‖² (e.g. 0.99).")] = None,
) -> None:
    """Re-factor an adapter to a lower rank by the SVD of its factors (no out×in matrix).

    Example: lorakit compress runs/sv/adapter --energy 0.99 --out runs/sv-small
    """
    from pathlib import Path

    from .combine import compress as compress_adapter
    from .files import WEIGHTS_NAME, locate, read_adapter, write_adapter

    with user_errors():
        result = compress_adapter(read_adapter(adapter), rank, energy)
        path = write_adapter(result.adapter, out)
        before, after = (Path(d) / WEIGHTS_NAME for d in (locate(adapter), path))
    _report_kept(result, f"compressed {adapter} into {path}: {_size(before.stat().st_size)} -> "
                         f"{_size(after.stat().st_size)}")


@app.command()
def analyze(
    adapter: Annotated[str, typer.Argument(help="PEFT-format adapter directory or Hub id.")],
    other: Annotated[str | None, typer.Argument(help="A second adapter: adds the subspace similarity.")] = None,
    out: Annotated[str, typer.Option(help="Directory for analysis.json and the PNG pictures.")] = "analysis",
    base: Annotated[str | None, typer.Option(help="Base model (with weights): adds ‖ΔW‖/‖W‖.")] = None,
) -> None:
    """Singular values, effective and stable rank of each module's ΔW (from the factors), the
    rank that keeps 90 % / 99 % of it, and with OTHER the subspace similarity of the two.

    Example: lorakit analyze runs/demo/adapter --base smollm2-135m --out runs/demo/analysis
    """
    from .analyze import analyze as analyze_adapter
    from .analyze import write_report
    from .files import read_adapter
    from .pretrained import load_model

    with user_errors():
        first = read_adapter(adapter)
        second = read_adapter(other) if other else None
        model = None
        if base:
            model = load_model(base)
            if any(p.is_meta for p in model.parameters()):
                raise ValueError(f"--base {base!r} has no weights (a preset is built on the meta device): "
                                 "give a model directory, a .gguf file or smollm2-135m")
        report = analyze_adapter(first, second, model)
        path = write_report(report, [adapter, *([other] if other else []), *([f"base: {base}"] if base else [])], out)
    modules = report["modules"].values()
    console.print(f"{len(modules)} modules; rank for 99 % of ‖ΔW‖²: median {report['summary'].get('median_rank_99', 0)}"
                  + (f"; ‖ΔW‖/‖W‖: median {sorted(m['relative_norm'] for m in modules)[len(modules) // 2]:.4f}"
                     if base else "")
                  + (f"; subspace similarity φ(1, 1): mean "
                     f"{sum(g[0][0] for g in report['similarity'].values()) / len(report['similarity']):.3f}"
                     if other else ""), highlight=False)
    console.print(report["summary"]["verdict"], highlight=False)
    console.print(f"[files] {path}: " + ", ".join(sorted(p.name for p in path.iterdir())), highlight=False,
                  markup=False)


def _report_kept(result, headline: str) -> None:
    ranks = sorted({layer.rank for layer in result.adapter.layers.values()})
    total = len(result.kept)
    exact = sum(kept >= 1 - 1e-9 for kept in result.kept.values())
    console.print(headline, highlight=False)
    console.print(f"{total} modules, rank {ranks[0]}" + (f"–{ranks[-1]}" if len(ranks) > 1 else "")
                  + f"; kept energy (‖ΔW‖² fraction): lowest {min(result.kept.values()):.4f}, "
                  f"mean {sum(result.kept.values()) / total:.4f}; {exact} of {total} exact", highlight=False)


@app.command()
def merge(
    model: Annotated[str, typer.Argument(help="Base model: HF model dir, Hub id (org/name[@revision]), .gguf file, or smollm2-135m.")],
    adapter: Annotated[str, typer.Argument(help="PEFT-format adapter directory or Hub id.")],
    out: Annotated[str, typer.Option(help="Directory for the merged model.")],
    dtype: Annotated[str, typer.Option(help="Weight dtype of the merged model: fp32, bf16, fp16.")] = "fp32",
    quantize: Annotated[str | None, typer.Option(
        help="The base was quantized (nf4, int8) when the adapter was trained: merge into those "
             "dequantized weights, the function the adapter learned. The result is written dense "
             "in --dtype, never re-quantized.")] = None,
) -> None:
    """Merge an adapter into its base model and save a plain transformers model.

    Example: lorakit merge smollm2-135m runs/chat/adapter --out merged/
    """
    import torch

    from .pretrained import save_merged

    if dtype not in DTYPES:
        why = (" (a merged model is written dense; re-quantizing W + delta would round the adapter's small "
               "update away: quantize when loading it, e.g. lorakit serve --quantize)") if dtype in QUANTIZATIONS else ""
        raise typer.BadParameter(f"expected one of {sorted(DTYPES)}{why}", param_hint="--dtype")
    with user_errors():
        path = save_merged(model, adapter, out, getattr(torch, DTYPES[dtype]), quantize)
    console.print(f"merged model written to {path} (loads with transformers' from_pretrained)")


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
    from .serve.engine import SamplingParams, build_engine, complete

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
    import importlib.util
    import os
    from pathlib import Path

    import torch
    import uvicorn

    from .serve.engine import build_engine
    from .serve.server import Limits, create_app

    with user_errors():
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        if loop not in ("asyncio", "uvloop"):
            raise ValueError(f"--loop must be asyncio or uvloop, got {loop!r}")
        if loop == "uvloop" and not all(importlib.util.find_spec(m) for m in ("uvloop", "httptools")):
            raise ValueError("--loop uvloop needs the packages uvloop and httptools: pip install uvloop httptools")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(threads or cores)
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        max_bytes = int(max_adapter_mib * 2**20) if max_adapter_mib is not None else None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = build_engine(model, adapters, max_adapters, max_bytes, max_batch, getattr(torch, DTYPES[dtype]),
                              device, quantize)
        named = named_adapters(adapter)
        for adapter_name, source in named.items():
            engine.store.add_directory(adapter_name, source)
    from .hub import parse as hub_id

    # a Hub id is the model's name, as vLLM serves it; a directory is named after itself
    base_id = hub_id(model)
    base_name = name or (base_id.repo if base_id else Path(model.rstrip("/")).name)
    app_ = create_app(engine, base_name, Limits(max_prompt_tokens, max_tokens, max_queue), allow_runtime_lora)
    sources = ", ".join([*([adapters] if adapters else []), *named]) or "(none)"
    console.print(f"serving {base_name} and adapters from {sources} on http://{host}:{port} "
                  f"({device}, {quantize or dtype}, {torch.get_num_threads()} threads)")
    # asyncio by default: on a CPU, uvloop + httptools measured no faster (bench_serve --compare-loop).
    uvicorn.run(app_, host=host, port=port, log_level="warning", loop=loop,
                http="httptools" if loop == "uvloop" else "h11",
                timeout_graceful_shutdown=max(int(round(shutdown_timeout)), 1))


def main() -> None:
    app()

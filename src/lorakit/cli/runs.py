"""lorakit train and lorakit train-image: one flag per field of their settings classes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from inspect import Parameter, Signature
from typing import Annotated, get_type_hints

import typer

from .base import _size, app, console, parse_targets, user_errors


def train(context: typer.Context, config: str | None, resume: bool, **flags: object) -> None:
    """Fine-tune a causal LM with LoRA: SFT, DPO or GRPO (--method); resumable, and under
    torchrun, distributed.

    Every setting is a flag and a YAML key (--config); flags override the file.

    Example: lorakit train --model smollm2-135m --data chat.jsonl --out runs/chat --rank 16 --epochs 2

    Example: lorakit train --method dpo --data pairs.jsonl --out runs/dpo --beta 0.1

    Example: lorakit train --method grpo --data prompts.jsonl --reward match:answer --num-generations 8 --out runs/rl
    """
    from ..training.config import TrainConfig, load_yaml

    given = _given(context, flags)
    with user_errors():
        settings = load_yaml(config) if config else {}
        resolved = TrainConfig.from_dict({**settings, **given}, config or "flags")
        from ..training.text import train as run_training

        result = run_training(resolved, resume=resume)  # checks the data before the model loads
    if not _main_process():
        return
    if result.finished_before:
        console.print(f"{result.out} holds a finished run ({result.steps} steps); nothing was changed. "
                      "Use another --out to train again.")
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        console.print(f"held-out loss  {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}")
    for label, key in (("held-out reward accuracy", "eval_accuracy"), ("held-out reward", "eval_reward")):
        before, after = getattr(result, f"{key}_before", None), getattr(result, f"{key}_after", None)
        if before is not None and after is not None:
            console.print(f"{label}  {before:.4f} -> {after:.4f}")
    rate = (f"{result.pairs_per_second:,.1f} pairs/s" if resolved.method == "dpo"
            else f"{result.tokens_per_second:,.0f} tokens/s")
    console.print(f"trained        {result.steps} steps in {result.seconds:.1f} s, {rate}, "
                  f"peak memory {_size(result.peak_memory_bytes)}")
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
    from ..training.config import load_yaml
    from ..training.diffusion import ImageTrainConfig, train_image as run_training

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
    from ..training.config import TrainConfig
    from ..training.diffusion import ImageTrainConfig

    train.__signature__ = _train_signature(TrainConfig)
    app.command()(train)
    train_image.__signature__ = _train_signature(ImageTrainConfig)
    app.command("train-image")(train_image)


_register_training_commands()

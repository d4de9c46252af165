"""Fine-tuning a causal language model: the text task of the training loop (loop.py).

    loss = Σ cross-entropy of every trained token / trained tokens of the step

The data is read and checked before anything slow loads, tokenized once, and cut into
rows (packed or padded, batches.py); every step's examples are a function of the seed
and the step, so a resumed run, or one split over processes, sees the same ones. A run
leaves ``adapter/`` (PEFT's format), ``checkpoints/``, ``metrics.jsonl``, ``loss.png``
and, last, ``summary.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batch, Sample, collate, micro_batches, samples, split_eval, step_indices
from .checkpoint import latest_checkpoint, run_lock
from .config import TrainConfig
from .data import Dataset, build_dataset, check_records
from .distributed import Processes
from .loop import Run, check_output_dir, fit as fit_task, held_out, peak_memory
from .loss import LossModule
from .sources import Source, parse_columns
from .strategy import strategy_for

# Settings that change what a run computes; the others (logging, checkpoint
# frequency, device) may differ when a run is resumed.
NOT_RESUMABLE_IF_CHANGED = ("model", "dtype", "quantize", "rank", "alpha", "dropout", "targets", "data", "data_split",
                            "data_config", "columns", "eval_split", "language",
                            "eval_data", "eval_fraction", "max_length", "packing", "mask_prompt", "epochs",
                            "max_steps", "batch_size", "method", "beta", "loss_type", "precompute_ref",
                            "num_generations", "temperature", "top_p", "max_completion_length", "reward",
                            "reward_weights", "epsilon", "scale_rewards",
                            "micro_batch_size", "lr", "loraplus_ratio", "weight_decay",
                            "warmup_steps", "schedule", "min_lr_ratio", "max_grad_norm", "bf16", "seed")


@dataclass
class TrainResult:
    out: Path
    adapter: Path
    steps: int
    resumed_from: int | None
    train_loss: float | None  # mean loss of the last logged step
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens_per_second: float
    seconds: float
    peak_memory_bytes: int
    adapter_bytes: int
    truncated: int  # examples cut to max_length
    finished_before: bool = False  # the run had already finished; nothing was trained or written

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items() if k != "finished_before"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**{**data, "out": Path(data["out"]), "adapter": Path(data["adapter"])})


RESULT = TrainResult  # what this method's run returns (see method_module)


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` with a LoRA adapter by ``config.method`` (sft, dpo, grpo);
    files go to ``config.out``.

    A run that finds checkpoints of the same config in ``config.out`` continues from
    the newest; ``resume=True`` additionally requires one to exist.
    """
    from ..pretrained import load_model, load_tokenizer
    from .sharded import build_meta_model

    method = method_module(config.method)
    processes = Processes.from_env(config.shard)
    try:
        check_output_dir(config, resume, NOT_RESUMABLE_IF_CHANGED, strategy_for(config, processes))
        sources = read_data(config, method.check_records)
        done = finished_run(config.out_dir, method.RESULT)
        if done is not None:
            return done
        for warning in config.warnings():
            warnings.warn(warning, stacklevel=2)
        tokenizer = load_tokenizer(config.model)
        data = method.prepare_data(config, tokenizer, sources)
        with run_lock(config.out_dir) if processes.main else nullcontext():
            if config.shard == "fsdp":  # never whole on one process: built empty, filled shard by shard
                model = build_meta_model(config.model, getattr(torch, config.dtype))
            else:
                model = load_model(config.model, dtype=getattr(torch, config.dtype), quantize=config.quantize)
            task = method.make_task(model, tokenizer, data, config, processes)
            return fit_task(task, strategy_for(config, processes), config, processes)
    finally:
        processes.close()


def method_module(method: str):
    """The module that reads the data of ``method`` and builds its task: check_records,
    prepare_data, make_task and RESULT."""
    import importlib

    return importlib.import_module({"sft": ".text", "dpo": ".preference", "grpo": ".grpo"}[method], __package__)


def make_task(model: nn.Module, tokenizer, data: tuple[Dataset, Dataset | None], config: TrainConfig,
              processes: Processes) -> TextTask:
    return TextTask(model, *data, config)


def fit(model: nn.Module, train_set: Dataset, eval_set: Dataset | None, config: TrainConfig,
        processes: Processes = Processes()) -> TrainResult:
    """Attach a fresh adapter to ``model`` (or restore the newest checkpoint) and train it."""
    return fit_task(TextTask(model, train_set, eval_set, config), strategy_for(config, processes), config, processes)


class TextTask:
    """A causal LM and its tokenized rows: next-token cross-entropy on the trained tokens."""

    counter = "tokens"
    loss_label = "cross-entropy per trained token"

    def __init__(self, model: nn.Module, train_set: Dataset, eval_set: Dataset | None, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.train_set, self.eval_set = train_set, eval_set
        self.rows: list[Sample] = samples(train_set.examples, config.max_length, config.packing)
        self.held_out_rows = samples(eval_set.examples, config.max_length, config.packing) if eval_set else []
        self.held_out = bool(self.held_out_rows)
        self.total_steps = config.max_steps or math.ceil(config.epochs * len(self.rows) / config.batch_size)
        self.truncated = train_set.truncated + (eval_set.truncated if eval_set else 0)

    def adapted(self, model: nn.Module) -> None:
        if self.config.gradient_checkpointing:
            checkpoint_activations(model)

    def loss_module(self) -> nn.Module:
        return LossModule(self.model)

    def note(self, trainable: int) -> str:
        config, train_set, eval_set = self.config, self.train_set, self.eval_set
        formats = ", ".join(f"{count:,} {kind}" for kind, count in sorted(train_set.formats.items()))
        return (f"data: {len(train_set.examples)} training examples in {len(self.rows)} rows, "
                f"{len(eval_set.examples) if eval_set else 0} held out (records: {formats}), {self.truncated} "
                f"truncated to {config.max_length} tokens; {self.total_steps} steps of {config.batch_size}; "
                f"{trainable:,} trainable parameters")

    def batches(self, step: int, processes: Processes, device: torch.device) -> tuple[list[Batch], Tensor, Tensor]:
        config = self.config
        indices = step_indices(len(self.rows), config.batch_size, step, config.seed)
        batches = [collate([self.rows[i] for i in chunk])
                   for chunk in micro_batches(indices, processes.rank, processes.world_size, config.micro_batch_size)]
        tokens = processes.sum(sum(b.tokens for b in batches), device)  # counted on the host, before the copy
        length = processes.sum(sum(b.length for b in batches), device)
        return [b.to(device) for b in batches], tokens, length

    @torch.no_grad()
    def evaluate(self, loss: nn.Module, processes: Processes, device: torch.device,
                 autocast) -> dict[str, float] | None:
        """Mean loss per trained token over the held-out rows (``loss``: a LossModule, or the
        sharded root), computed in shards over the processes."""
        if not self.held_out:
            return None
        was_training = loss.training
        loss.eval()
        total, tokens = 0.0, 0
        rows = self.held_out_rows
        for chunk in micro_batches(list(range(len(rows))), processes.rank, processes.world_size,
                                   self.config.micro_batch_size):
            batch: Batch = collate([rows[i] for i in chunk]).to(device)
            with autocast:
                total += loss(batch).item()
            tokens += batch.tokens
        loss.train(was_training)
        return {"eval_loss": processes.sum(total, device) / processes.sum(tokens, device)}

    def metrics(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": state["tokens"], "tokens_per_second": state["tokens"] / state["seconds"]}

    def result(self, run: Run, resumed_from: int | None, eval_after: dict[str, float] | None) -> TrainResult:
        out, state = run.config.out_dir, run.state
        return TrainResult(
            out=out, adapter=out / "adapter", steps=self.total_steps, resumed_from=resumed_from,
            train_loss=state["train_loss"], eval_loss_before=held_out(state["eval_before"]),
            eval_loss_after=held_out(eval_after),
            tokens_per_second=state["tokens"] / max(state["seconds"], 1e-9), seconds=state["seconds"],
            peak_memory_bytes=peak_memory(run.device), adapter_bytes=directory_bytes(out / "adapter"),
            truncated=self.truncated)


def read_data(config: TrainConfig, check=check_records) -> dict[str, Source]:
    """The data sources (training, held out), every record's shape checked (by ``check``)
    before anything slow loads (tokenizer, model); nothing is kept but where to read them again."""
    columns = tuple(parse_columns(config.columns).items())
    sources = {}
    for spec, split in ((config.data, config.data_split), (config.eval_data, config.eval_split)):
        if spec is not None:
            sources[spec] = Source(spec, split, config.data_config, columns)
            check(sources[spec].records(), spec)
    return sources


def prepare_data(config: TrainConfig, tokenizer, sources: dict[str, Source] | None = None,
                 ) -> tuple[Dataset, Dataset | None]:
    """Tokenized training and held-out sets, every problem reported before training starts.
    ``sources``: ``read_data``'s result, when the data was checked already."""
    sources = read_data(config) if sources is None else sources

    def tokenized(spec: str) -> Dataset:
        return build_dataset(sources[spec].records(), tokenizer, config.max_length, config.mask_prompt, source=spec)

    if config.data is None:
        from .corpus import conversations

        corpus = [(f"chatterbot-corpus/{config.language}[{i}]", r)
                  for i, r in enumerate(conversations(config.language))]
        dataset = build_dataset(corpus, tokenizer, config.max_length, config.mask_prompt,
                                source=f"chatterbot-corpus/{config.language}")
    else:
        dataset = tokenized(config.data)
    if config.eval_data is not None:
        return dataset, tokenized(config.eval_data)
    if config.eval_fraction == 0:
        return dataset, None
    kept, held_out = split_eval(dataset.examples, config.eval_fraction, config.seed)
    evaluation = Dataset(held_out, f"{dataset.source} (held out)")
    dataset.examples = kept
    return dataset, evaluation


def finished_run(out: Path, result_class: type[TrainResult] | None = None) -> TrainResult | None:
    """The result of a run in ``out`` that already finished, or None.

    ``summary.json`` is the last file a run writes, after its final checkpoint and
    adapter; a run of the same settings (checked before) that left one has nothing
    left to do, and running it again must change nothing.
    """
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    checkpoint = latest_checkpoint(out)
    if checkpoint is None or int(checkpoint.name.removeprefix("step-")) != summary.get("steps"):
        return None
    try:
        result = (result_class or TrainResult).from_json(summary)
    except TypeError:  # a summary from another version of lorakit: train again
        return None
    result.finished_before = True
    return result


def checkpoint_activations(model: nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant (the frozen embeddings' output
    needs no gradient, which the reentrant form would require)."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def directory_bytes(adapter: Path) -> int:
    return sum(p.stat().st_size for p in adapter.iterdir()) if adapter.is_dir() else 0

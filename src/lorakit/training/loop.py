"""The training loop: AdamW on the adapter parameters, read top to bottom.

    for each optimizer step s:
        lr    = schedule(s)                      warmup, then cosine / linear / constant
        batch = the step's examples              a function of (seed, s), split over processes
        loss  = sum of token losses / tokens     over every micro-batch of every process
        backward per micro-batch, clip, AdamW step
        every save_every steps: atomic checkpoint

Gradient accumulation divides each micro-batch's summed loss by the number of
trained tokens of the whole step, so N accumulated micro-batches give the gradient of
one batch N times larger (Hu et al. LoRA, arXiv:2106.09685; LoRA+ learning rate for
B, Hayou et al., arXiv:2402.12354). Several processes run DDP, or with ``--shard fsdp``
FSDP2 over a sharded base (sharded.py); the loop is the same.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attach import attach, lora_layers
from ..files import save_adapter, write_adapter
from . import sharded
from .batches import Batch, Sample, collate, micro_batches, samples, split_eval, step_indices
from .checkpoint import latest_checkpoint, load_checkpoint, run_lock, save_checkpoint, write_text
from .config import Settings, TrainConfig, dump_yaml, load_yaml
from .data import Dataset, build_dataset, check_records
from .distributed import Processes
from .guard import Diverged, Guard, adamw
from .loss import LossModule
from .monitor import Monitor, plot_loss
from .sources import Source, parse_columns

# Settings that change what a run computes; the others (logging, checkpoint
# frequency, device) may differ when a run is resumed.
NOT_RESUMABLE_IF_CHANGED = ("model", "dtype", "quantize", "rank", "alpha", "dropout", "targets", "data", "data_split",
                            "data_config", "columns", "eval_split", "language",
                            "eval_data", "eval_fraction", "max_length", "packing", "mask_prompt", "epochs",
                            "max_steps", "batch_size", "micro_batch_size", "lr", "loraplus_ratio", "weight_decay",
                            "warmup_steps", "schedule", "min_lr_ratio", "max_grad_norm", "bf16", "seed")


class TrainingError(ValueError):
    """The run cannot start or cannot go on (diverged, incompatible output directory, ...).

    A ValueError like every lorakit error, so the command line shows it as one line."""


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


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` with a LoRA adapter; files go to ``config.out``.

    A run that finds checkpoints of the same config in ``config.out`` continues from
    the newest; ``resume=True`` additionally requires one to exist.
    """
    from ..pretrained import load_model, load_tokenizer

    processes = Processes.from_env(config.shard)
    try:
        check_output_dir(config, resume)
        sources = read_data(config)
        done = finished_run(config.out_dir)
        if done is not None:
            return done
        tokenizer = load_tokenizer(config.model)
        train_set, eval_set = prepare_data(config, tokenizer, sources)
        with run_lock(config.out_dir) if processes.main else nullcontext():
            if config.shard == "fsdp":  # never whole on one process: built empty, filled shard by shard
                model = sharded.build_meta_model(config.model, getattr(torch, config.dtype))
            else:
                model = load_model(config.model, dtype=getattr(torch, config.dtype), quantize=config.quantize)
            return fit(model, train_set, eval_set, config, processes)
    finally:
        processes.close()


def read_data(config: TrainConfig) -> dict[str, Source]:
    """The data sources (training, held out), every record's shape checked before anything
    slow loads (tokenizer, model); nothing is kept but where to read them again."""
    columns = tuple(parse_columns(config.columns).items())
    sources = {}
    for spec, split in ((config.data, config.data_split), (config.eval_data, config.eval_split)):
        if spec is not None:
            sources[spec] = Source(spec, split, config.data_config, columns)
            check_records(sources[spec].records(), spec)
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


def check_output_dir(config: Settings, resume: bool,
                     fields: tuple[str, ...] = NOT_RESUMABLE_IF_CHANGED) -> None:
    """An output directory holds one run: refuse to mix a different config (any of
    ``fields`` changed) into it."""
    saved = config.out_dir / "config.yaml"
    if not saved.exists():
        if resume:
            raise TrainingError(f"--resume: {config.out_dir} has no run to resume")
        return
    before = type(config).from_dict(load_yaml(saved), str(saved))
    changed = [k for k in fields if getattr(before, k) != getattr(config, k)]
    if changed:
        details = ", ".join(f"{k}: {getattr(before, k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise TrainingError(f"{config.out_dir} holds a run with other settings ({details}); "
                            "use another --out, or the same settings to resume it")
    latest = latest_checkpoint(config.out_dir)
    if resume and latest is None:
        raise TrainingError(f"--resume: {config.out_dir} has no checkpoint yet")
    sharding = getattr(config, "shard", None) == "fsdp"
    if latest is not None and sharded.is_sharded_checkpoint(latest) != sharding:
        raise TrainingError(f"{latest}: a {'plain' if sharding else 'sharded (FSDP)'} checkpoint cannot be resumed "
                            f"with --shard {config.shard}; use --shard {'fsdp' if not sharding else 'ddp'}")


def finished_run(out: Path) -> TrainResult | None:
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
        result = TrainResult.from_json(summary)
    except TypeError:  # a summary from another version of lorakit: train again
        return None
    result.finished_before = True
    return result


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warmup, then decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.schedule == "constant":
        factor = 1.0
    elif config.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * factor)


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """A, modules_to_save: lr. B: lr * loraplus_ratio with LoRA+. ``lr_scale`` is kept per group."""
    b_ids = {id(adapter.lora_B) for _, layer in lora_layers(model) for adapter in layer.adapters.values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.loraplus_ratio is None:
        return [{"params": trainable, "lr_scale": 1.0}]
    return [{"params": [p for p in trainable if id(p) not in b_ids], "lr_scale": 1.0},
            {"params": [p for p in trainable if id(p) in b_ids], "lr_scale": config.loraplus_ratio}]


@dataclass
class Run:
    """What every step of one training run shares."""

    config: TrainConfig
    model: nn.Module
    runner: nn.Module  # the loss module, under DDP with several processes
    optimizer: torch.optim.Optimizer
    guard: Guard
    parameters: list[nn.Parameter]
    rows: list[Sample]
    held_out: list[Sample]
    total_steps: int
    processes: Processes
    device: torch.device
    autocast: Any
    monitor: Monitor
    # what the checkpoints carry besides weights, so that a resumed run reports what an
    # uninterrupted one does: tokens, seconds, eval_loss_before, train_loss
    state: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.config.shard == "fsdp"

    def evaluate(self) -> float:
        # Under FSDP the loss runs through the sharded root, whose hooks gather the weights.
        loss = self.runner if self.sharded else LossModule(self.model)
        return _evaluate(loss, self.held_out, self.config.micro_batch_size, self.processes, self.device,
                         self.autocast)


def fit(model: nn.Module, train_set: Dataset, eval_set: Dataset | None, config: TrainConfig,
        processes: Processes = Processes()) -> TrainResult:
    """Attach a fresh adapter to ``model`` (or restore the newest checkpoint) and train it."""
    run, start_step = setup(model, train_set, eval_set, config, processes)
    if run.held_out and start_step == 0:
        run.state["eval_loss_before"] = run.evaluate()
        run.monitor.evaluation(0, run.state["eval_loss_before"])
    started = time.perf_counter() - run.state["seconds"]
    try:
        model.train()
        for step in range(start_step, run.total_steps):
            train_step(run, step, started)
        eval_after = run.evaluate() if run.held_out else None
        if eval_after is not None:
            run.monitor.evaluation(run.total_steps, eval_after)
    finally:
        run.monitor.close()
    truncated = train_set.truncated + (eval_set.truncated if eval_set else 0)
    return finish(run, start_step if start_step else None, eval_after, truncated)


def setup(model: nn.Module, train_set: Dataset, eval_set: Dataset | None, config: TrainConfig,
          processes: Processes) -> tuple[Run, int]:
    """The run ready for its first step (or the step after its newest checkpoint), and that step."""
    out = config.out_dir
    check_batch(config, processes)
    rows = samples(train_set.examples, config.max_length, config.packing)
    held_out = samples(eval_set.examples, config.max_length, config.packing) if eval_set else []
    total_steps = config.max_steps or math.ceil(config.epochs * len(rows) / config.batch_size)
    device = processes.device(config.device)

    runner = adapted(model, config, device)
    reset_peak_memory(device)
    groups = parameter_groups(model, config)
    optimizer = adamw(groups, config.lr, config.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    state: dict[str, Any] = {"tokens": 0, "seconds": 0.0, "eval_loss_before": None, "train_loss": None}
    start_step = restore(config, runner, model, optimizer, state)
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", dump_yaml(config))
    monitor = Monitor(out, total_steps, start_step, processes.main, config.log_every, config.report_to,
                      config.to_dict())
    truncated = train_set.truncated + (eval_set.truncated if eval_set else 0)
    formats = ", ".join(f"{count:,} {kind}" for kind, count in sorted(train_set.formats.items()))
    monitor.note(f"data: {len(train_set.examples)} training examples in {len(rows)} rows, "
                 f"{len(eval_set.examples) if eval_set else 0} held out (records: {formats}), {truncated} truncated to "
                 f"{config.max_length} tokens; {total_steps} steps of {config.batch_size}; "
                 f"{sum(p.numel() for p in parameters):,} trainable parameters"
                 + (f"; resuming after step {start_step}" if start_step else ""))
    if config.shard != "fsdp":
        runner = processes.wrap(runner, device)  # DDP when there are several processes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    run = Run(config, model, runner, optimizer, Guard(optimizer, device), parameters, rows, held_out, total_steps,
              processes, device, autocast, monitor, state)
    return run, start_step


def check_batch(config: Settings, processes: Processes) -> None:
    """Every process gets the same number of whole micro-batches of each step."""
    if config.batch_size % (config.micro_batch_size * processes.world_size):
        raise TrainingError(f"batch_size {config.batch_size} must be a multiple of micro_batch_size "
                            f"{config.micro_batch_size} x {processes.world_size} process(es)")


def adapted(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """A fresh adapter on ``model`` and the loss module around it, on ``device``; with
    ``--shard fsdp`` sharded first and then filled, shard by shard (sharded.py)."""
    sharding = config.shard == "fsdp"
    if config.fsdp_offload and device.type != "cuda":
        raise TrainingError("--fsdp-offload moves the shards from GPU to CPU memory; on a CPU they are there already")
    torch.manual_seed(config.seed)  # the adapter's initial A, then dropout
    if not sharding:
        model.to(device)
    attach(model, config.lora())
    if config.gradient_checkpointing:
        checkpoint_activations(model)
    runner = LossModule(model)
    if sharding:
        sharded.shard(runner, model, config.bf16, config.fsdp_offload)
        sharded.materialize(runner, model, config.model, getattr(torch, config.dtype), config.lora(), "default",
                            config.seed, device)
    return runner


def restore(config: TrainConfig, runner: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
            state: dict[str, Any]) -> int:
    """Load the newest checkpoint in ``config.out`` if there is one (its counters into
    ``state``); return the step to start from."""
    checkpoint = latest_checkpoint(config.out_dir)
    if checkpoint is None:
        return 0
    sharding = config.shard == "fsdp"
    if sharded.is_sharded_checkpoint(checkpoint) != sharding:
        raise TrainingError(f"{checkpoint}: a {'sharded' if not sharding else 'plain'} checkpoint cannot be "
                            f"resumed with --shard {config.shard}")
    if sharding:
        state.update(sharded.load_sharded_checkpoint(checkpoint, runner, optimizer))
    else:
        state.update(load_checkpoint(checkpoint, model, optimizer))
    return state.pop("step")


def train_step(run: Run, step: int, started: float) -> None:
    """Optimizer step ``step`` (0-based): its micro-batches, backward, clipping, AdamW; then
    the log line, an evaluation and a checkpoint when they are due.

    Nothing in the step itself waits for the device: the loss and the gradient norm stay
    device tensors, and are read (with the NaN/Inf guard's flag) only when a log line, an
    evaluation or a checkpoint is due."""
    config, processes, device, state = run.config, run.processes, run.device, run.state
    lr = learning_rate(config, step, run.total_steps)
    set_learning_rate(run.optimizer, lr)
    indices = step_indices(len(run.rows), config.batch_size, step, config.seed)
    batches = [collate([run.rows[i] for i in chunk])
               for chunk in micro_batches(indices, processes.rank, processes.world_size, config.micro_batch_size)]
    tokens = processes.sum(sum(b.tokens for b in batches), device)  # counted on the host, before the copy
    batches = [b.to(device) for b in batches]
    loss = processes.sum(accumulate(run.runner, batches, tokens, processes.world_size, run.autocast), device) / tokens
    grad_norm = guarded(run.guard.step, config.out_dir, run.parameters, config.max_grad_norm, loss, step)

    done = step + 1
    state["tokens"] += processes.sum(sum(b.length for b in batches), device)
    state["seconds"] = time.perf_counter() - started
    logged = done % config.log_every == 0 or done == run.total_steps
    evaluated = bool(config.eval_every and done % config.eval_every == 0 and done != run.total_steps and run.held_out)
    saved = done % config.save_every == 0 or done == run.total_steps
    if not (logged or evaluated or saved):
        return
    guarded(run.guard.check, config.out_dir)  # nothing is logged or saved past a bad step
    state["train_loss"] = loss.item()
    if logged:
        run.monitor.step({"step": done, "loss": state["train_loss"], "lr": lr, "grad_norm": grad_norm.item(),
                          "tokens": state["tokens"], "tokens_per_second": state["tokens"] / state["seconds"],
                          "time": time.time()})
    if evaluated:
        run.monitor.evaluation(done, run.evaluate())
    if saved:
        if run.sharded:  # every process writes its shards
            sharded.save_sharded_checkpoint(config.out_dir, done, run.runner, run.optimizer, state,
                                            config.keep_checkpoints)
        elif processes.main:
            save_checkpoint(config.out_dir, done, run.model, run.optimizer, state, config.keep_checkpoints)
        processes.barrier()


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def guarded(call: Callable[..., Any], out: Path, *args: Any) -> Any:
    """``call(*args)``, with a non-finite step (guard.py) reported as the run's end."""
    try:
        return call(*args)
    except Diverged as bad:
        raise TrainingError(_diverged(bad.step, bad.loss, bad.grad_norm, out)) from None


def finish(run: Run, resumed_from: int | None, eval_after: float | None, truncated: int) -> TrainResult:
    """The final adapter, loss.png and summary.json (written last: its presence marks a finished run)."""
    out, state, processes = run.config.out_dir, run.state, run.processes
    adapter = out / "adapter"
    if run.sharded:  # gathered from every process's shards, written by the main one
        value = sharded.full_adapter(run.runner, run.model, run.config.lora(), "default")
        if processes.main:
            write_adapter(value, adapter)
    elif processes.main:
        save_adapter(run.model, adapter)
    if processes.main:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    result = TrainResult(
        out=out, adapter=adapter, steps=run.total_steps, resumed_from=resumed_from, train_loss=state["train_loss"],
        eval_loss_before=state["eval_loss_before"], eval_loss_after=eval_after,
        tokens_per_second=state["tokens"] / max(state["seconds"], 1e-9), seconds=state["seconds"],
        peak_memory_bytes=peak_memory(run.device), adapter_bytes=_adapter_bytes(adapter), truncated=truncated)
    if processes.main:
        write_text(out / "summary.json", json.dumps(result.to_json(), indent=2) + "\n")
    processes.barrier()
    return result


def accumulate(runner: nn.Module, batches: list[Batch], tokens: float, world_size: int, autocast) -> Tensor:
    """Backward every micro-batch with weight 1 / (trained tokens of the whole step), so the
    gradients add up to those of the mean loss over one large batch; return the loss sum
    (a device tensor: reading it would make the host wait)."""
    total = None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # Under DDP / FSDP only the last micro-batch synchronizes gradients.
        sync = last or world_size == 1
        if hasattr(runner, "set_requires_gradient_sync"):  # FSDP
            runner.set_requires_gradient_sync(sync)
            context = nullcontext()
        else:
            context = nullcontext() if sync else runner.no_sync()
        with context, autocast:
            loss = runner(batch)
        # DDP averages gradients over processes; scaling by world_size makes that a sum.
        (loss * (world_size / tokens)).backward()
        total = loss.detach().double() if total is None else total + loss.detach()
    return total


@torch.no_grad()
def _evaluate(loss: nn.Module, rows: list[Sample], micro_batch_size: int, processes: Processes,
              device: torch.device, autocast) -> float:
    """Mean loss per trained token over ``rows`` (``loss``: a LossModule, or the sharded
    root), computed in shards over the processes."""
    was_training = loss.training
    loss.eval()
    total, tokens = 0.0, 0
    for chunk in micro_batches(list(range(len(rows))), processes.rank, processes.world_size, micro_batch_size):
        batch: Batch = collate([rows[i] for i in chunk]).to(device)
        with autocast:
            total += loss(batch).item()
        tokens += batch.tokens
    loss.train(was_training)
    return processes.sum(total, device) / processes.sum(tokens, device)


def _diverged(step: int, loss: float, grad_norm: float, out: Path) -> str:
    checkpoint = latest_checkpoint(out)
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return (f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the step was not "
            f"applied and the run stopped; {kept}. Lower lr (or set max_grad_norm) and run again.")


def checkpoint_activations(model: nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant (the frozen embeddings' output
    needs no gradient, which the reentrant form would require)."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def reset_peak_memory(device: torch.device) -> None:
    """Start ``peak_memory`` afresh: training memory, not the transients of loading the model
    (a float32 file read into bfloat16, or quantized, briefly holds both)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current size
    except OSError:
        pass  # elsewhere the peak stays the process's own


def peak_memory(device: torch.device) -> int:
    """Peak resident memory of this process in bytes since ``reset_peak_memory`` (peak
    allocated GPU memory on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # Linux: VmHWM is this process image's own peak; ru_maxrss can carry a parent's across fork + exec.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _adapter_bytes(adapter: Path) -> int:
    return sum(p.stat().st_size for p in adapter.iterdir()) if adapter.is_dir() else 0

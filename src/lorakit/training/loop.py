"""The training loop, one for every task: AdamW on the adapter parameters, read top to bottom.

    for each optimizer step s:
        lr    = schedule(s)                      warmup, then cosine / linear / constant
        batch = the step's examples              a function of (seed, s), split over processes
        loss  = sum of per-unit losses / units   over every micro-batch of every process
        backward per micro-batch, clip, AdamW step
        every save_every steps: atomic checkpoint

Gradient accumulation divides each micro-batch's summed loss by the units (trained
tokens, images) of the whole step, so N accumulated micro-batches give the gradient of
one batch N times larger (Hu et al. LoRA, arXiv:2106.09685; LoRA+ learning rate for B,
Hayou et al., arXiv:2402.12354).

What is trained and how its loss is computed is a ``Task`` (text.py: a causal LM;
diffusion.py: a UNet); where the model lives is a strategy (strategy.py: one process,
DDP, or FSDP2). The loop asks neither which one it has.
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
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..attach import lora_layers
from ..files import write_adapter
from .checkpoint import latest_checkpoint, write_text
from .config import Settings, dump_yaml, load_yaml
from .distributed import Processes
from .guard import Diverged, Guard, adamw
from .monitor import Monitor, plot_loss

if TYPE_CHECKING:
    from .strategy import Plain


class TrainingError(ValueError):
    """The run cannot start or cannot go on (diverged, incompatible output directory, ...).

    A ValueError like every lorakit error, so the command line shows it as one line."""


class Task(Protocol):
    """What one kind of training brings to the loop."""

    model: nn.Module  # what the adapter is attached to
    total_steps: int
    counter: str  # what throughput counts: "tokens", "images"
    loss_label: str  # the y axis of loss.png
    held_out: bool  # whether there is held-out data to evaluate

    def adapted(self, model: nn.Module) -> None:
        """Called once the adapter is attached (gradient checkpointing, ...)."""

    def loss_module(self) -> nn.Module:
        """The module whose forward takes a micro-batch and returns its summed loss."""

    def note(self, trainable: int) -> str:
        """The line that opens the run: the data and the steps."""

    def batches(self, step: int, processes: Processes, device: torch.device) -> tuple[list[Any], Tensor, Tensor]:
        """Step ``step``'s micro-batches of this process (on ``device``), the units the step's loss
        is divided by and the units it counts for throughput (both over every process)."""

    def evaluate(self, loss: nn.Module, processes: Processes, device: torch.device,
                 autocast) -> dict[str, float] | None:
        """The held-out metrics, ``eval_loss`` first (None without held-out data)."""

    def metrics(self, state: dict[str, Any]) -> dict[str, Any]:
        """The throughput entries of a log line."""

    def result(self, run: Run, resumed_from: int | None, eval_after: dict[str, float] | None) -> Any:
        """The run's result, after any files of its own (main process: samples, other formats)."""


def check_output_dir(config: Settings, resume: bool, fields: tuple[str, ...], strategy: Plain) -> None:
    """An output directory holds one run: refuse to mix a different config (any of
    ``fields`` changed), or a checkpoint of another strategy, into it."""
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
    if latest is not None and not strategy.reads(latest):
        raise TrainingError(_other_kind(latest, strategy, config))


def _other_kind(checkpoint: Path, strategy: Plain, config: Settings) -> str:
    shard = getattr(config, "shard", "ddp")
    other = "fsdp" if shard != "fsdp" else "ddp"
    return (f"{checkpoint}: a {'plain' if strategy.kind != 'plain' else 'sharded (FSDP)'} checkpoint cannot be "
            f"resumed with --shard {shard}; use --shard {other}")


def learning_rate(config: Settings, step: int, total_steps: int) -> float:
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


def parameter_groups(model: nn.Module, config: Settings) -> list[dict[str, Any]]:
    """A, modules_to_save: lr. B: lr * loraplus_ratio with LoRA+ (LoHa / LoKr, which have no B,
    train at lr). ``lr_scale`` is kept per group."""
    b_ids = {id(param) for _, layer in lora_layers(model) for adapter in layer.adapters.values()
             for name, param in adapter.named_parameters() if name == "lora_B"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.loraplus_ratio is None:
        return [{"params": trainable, "lr_scale": 1.0}]
    return [{"params": [p for p in trainable if id(p) not in b_ids], "lr_scale": 1.0},
            {"params": [p for p in trainable if id(p) in b_ids], "lr_scale": config.loraplus_ratio}]


@dataclass
class Run:
    """What every step of one training run shares."""

    config: Settings
    task: Task
    strategy: Plain
    runner: nn.Module  # the loss module as the step runs it (DDP, or the sharded root)
    optimizer: torch.optim.Optimizer
    guard: Guard
    parameters: list[nn.Parameter]
    processes: Processes
    device: torch.device
    autocast: Any
    monitor: Monitor
    # what the checkpoints carry besides weights, so that a resumed run reports what an
    # uninterrupted one does: the counter, seconds, eval_before (the held-out metrics), train_loss
    state: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def total_steps(self) -> int:
        return self.task.total_steps

    def evaluate(self) -> dict[str, float] | None:
        return self.task.evaluate(self.strategy.evaluator(self.runner), self.processes, self.device, self.autocast)


def fit(task: Task, strategy: Plain, config: Settings, processes: Processes) -> Any:
    """Attach a fresh adapter to ``task.model`` (or restore the newest checkpoint) and train it."""
    run, start_step = setup(task, strategy, config, processes)
    if start_step == 0:
        run.state["eval_before"] = run.evaluate()
        if run.state["eval_before"] is not None:
            run.monitor.evaluation(0, run.state["eval_before"])
    started = time.perf_counter() - run.state["seconds"]
    try:
        run.model.train()
        for step in range(start_step, run.total_steps):
            train_step(run, step, started)
        eval_after = run.evaluate()
        if eval_after is not None:
            run.monitor.evaluation(run.total_steps, eval_after)
    finally:
        run.monitor.close()
    return finish(run, start_step or None, eval_after)


def setup(task: Task, strategy: Plain, config: Settings, processes: Processes) -> tuple[Run, int]:
    """The run ready for its first step (or the step after its newest checkpoint), and that step."""
    check_batch(config, processes)
    device = processes.device(config.device)
    runner = strategy.prepare(task, config, device)
    reset_peak_memory(device)
    groups = parameter_groups(task.model, config)
    optimizer = adamw(groups, config.lr, config.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    state: dict[str, Any] = {task.counter: 0, "seconds": 0.0, "eval_before": None, "train_loss": None}
    start_step = restore(config, strategy, runner, task.model, optimizer, state)
    out = config.out_dir
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", dump_yaml(config))
    monitor = Monitor(out, task.total_steps, start_step, processes.main, config.log_every, config.report_to,
                      config.to_dict())
    experts = [layer.weight.shape[0] for _, layer in lora_layers(task.model) if layer.layout.batch_dims]
    monitor.note(task.note(sum(p.numel() for p in parameters))
                 + (f"; {len(experts)} MoE expert tensors adapted ({max(experts)} experts each)" if experts else "")
                 + (f"; resuming after step {start_step}" if start_step else ""))
    runner = strategy.wrap(runner, device)  # DDP when there are several processes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=getattr(config, "bf16", False))
    return Run(config, task, strategy, runner, optimizer, Guard(optimizer, device), parameters, processes, device,
               autocast, monitor, state), start_step


def check_batch(config: Settings, processes: Processes) -> None:
    """Every process gets the same number of whole micro-batches of each step."""
    if config.batch_size % (config.micro_batch_size * processes.world_size):
        raise TrainingError(f"batch_size {config.batch_size} must be a multiple of micro_batch_size "
                            f"{config.micro_batch_size} x {processes.world_size} process(es)")


def restore(config: Settings, strategy: Plain, runner: nn.Module, model: nn.Module,
            optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> int:
    """Load the newest checkpoint in ``config.out`` if there is one (its counters into
    ``state``); return the step to start from."""
    checkpoint = latest_checkpoint(config.out_dir)
    if checkpoint is None:
        return 0
    if not strategy.reads(checkpoint):
        raise TrainingError(_other_kind(checkpoint, strategy, config))
    state.update(strategy.restore(checkpoint, runner, model, optimizer))
    return state.pop("step")


def train_step(run: Run, step: int, started: float) -> None:
    """Optimizer step ``step`` (0-based): its micro-batches, backward, clipping, AdamW; then
    the log line, an evaluation and a checkpoint when they are due.

    Nothing in the step itself waits for the device: the loss and the gradient norm stay
    device tensors, and are read (with the NaN/Inf guard's flag) only when a log line, an
    evaluation or a checkpoint is due."""
    config, processes, state = run.config, run.processes, run.state
    lr = learning_rate(config, step, run.total_steps)
    set_learning_rate(run.optimizer, lr)
    batches, units, counted = run.task.batches(step, processes, run.device)
    loss = processes.sum(accumulate(run.runner, batches, units, processes.world_size, run.autocast),
                         run.device) / units
    grad_norm = guarded(run.guard.step, config.out_dir, run.parameters, config.max_grad_norm, loss, step)

    done = step + 1
    state[run.task.counter] += counted
    state["seconds"] = time.perf_counter() - started
    logged = done % config.log_every == 0 or done == run.total_steps
    eval_every = getattr(config, "eval_every", 0)
    evaluated = bool(eval_every and done % eval_every == 0 and done != run.total_steps and run.task.held_out)
    saved = done % config.save_every == 0 or done == run.total_steps
    if not (logged or evaluated or saved):
        return
    guarded(run.guard.check, config.out_dir)  # nothing is logged or saved past a bad step
    state["train_loss"] = loss.item()
    if logged:
        run.monitor.step({"step": done, "loss": state["train_loss"], "lr": lr, "grad_norm": grad_norm.item(),
                          **run.task.metrics(state), "time": time.time()})
    if evaluated:
        run.monitor.evaluation(done, run.evaluate())
    if saved:
        run.strategy.save(config.out_dir, done, run.runner, run.model, run.optimizer, state, config.keep_checkpoints)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def guarded(call: Callable[..., Any], out: Path, *args: Any) -> Any:
    """``call(*args)``, with a non-finite step (guard.py) reported as the run's end."""
    try:
        return call(*args)
    except Diverged as bad:
        raise TrainingError(_diverged(bad.step, bad.loss, bad.grad_norm, out)) from None


def finish(run: Run, resumed_from: int | None, eval_after: dict[str, float] | None) -> Any:
    """The final adapter, loss.png, the task's own files and summary.json (written last: its
    presence marks a finished run)."""
    out, processes = run.config.out_dir, run.processes
    value = run.strategy.export(run.runner, run.model, run.config)  # a collective under FSDP
    if processes.main:
        write_adapter(value, out / "adapter")
        plot_loss(out / "metrics.jsonl", out / "loss.png", ylabel=run.task.loss_label)
    result = run.task.result(run, resumed_from, eval_after)
    if processes.main:
        write_text(out / "summary.json", json.dumps(result.to_json(), indent=2) + "\n")
    processes.barrier()
    return result


def accumulate(runner: nn.Module, batches: list[Any], units: float | Tensor, world_size: int, autocast) -> Tensor:
    """Backward every micro-batch with weight 1 / (units of the whole step), so the gradients
    add up to those of the mean loss over one large batch; return the loss sum (a device
    tensor: reading it would make the host wait)."""
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
        (loss * (world_size / units)).backward()
        total = loss.detach().double() if total is None else total + loss.detach()
    return total


def _diverged(step: int, loss: float, grad_norm: float, out: Path) -> str:
    checkpoint = latest_checkpoint(out)
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return (f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the step was not "
            f"applied and the run stopped; {kept}. Lower lr (or set max_grad_norm) and run again.")


def held_out(metrics: dict[str, float] | None, key: str = "eval_loss") -> float | None:
    """One held-out metric of an evaluation (None: no held-out data)."""
    return None if metrics is None else metrics.get(key)


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

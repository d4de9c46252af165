"""Where the model lives while it trains: one process or DDP (``Plain``), or FSDP2 (``Sharded``).

A strategy does what differs between them, and the loop (loop.py) never asks which one
it has:

    prepare   attach the adapter (and, sharded, shard the model and fill its shards)
    wrap      the loss module as the step runs it (DDP with several processes)
    restore   load a checkpoint of its own kind into the model and the optimizer
    save      write a checkpoint (plain: the main process; sharded: every process)
    export    the whole adapter as a value, on the main process
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import Adapter
from ..attach import attach
from ..files import export_adapter
from . import sharded
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import Processes
from .loop import TrainingError

if TYPE_CHECKING:
    from .loop import Task


class Plain:
    """The whole model on every process; with several processes, DDP averages the gradients."""

    kind = "plain"

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.loss: nn.Module | None = None

    def prepare(self, task: Task, config: Any, device: torch.device) -> nn.Module:
        """A fresh adapter on ``task.model`` (seeded), and the task's loss module around it."""
        task.model.to(device)
        return self.adapt(task, config)

    def adapt(self, task: Task, config: Any) -> nn.Module:
        """Attach the seeded adapter, let the task adjust the model, and keep its loss module."""
        torch.manual_seed(config.seed)  # the adapter's initial A, then dropout
        attach(task.model, config.lora())
        task.adapted(task.model)
        self.loss = task.loss_module()
        return self.loss

    def wrap(self, runner: nn.Module, device: torch.device) -> nn.Module:
        return self.processes.wrap(runner, device)

    def evaluator(self, runner: nn.Module) -> nn.Module:
        """The module evaluation runs: the loss module itself, outside DDP."""
        return self.loss

    def reads(self, checkpoint: Path) -> bool:
        return not sharded.is_sharded_checkpoint(checkpoint)

    def restore(self, checkpoint: Path, runner: nn.Module, model: nn.Module, optimizer) -> dict[str, Any]:
        return load_checkpoint(checkpoint, model, optimizer)

    def save(self, out: Path, step: int, runner: nn.Module, model: nn.Module, optimizer, state: dict[str, Any],
             keep: int) -> None:
        if self.processes.main:
            save_checkpoint(out, step, model, optimizer, state, keep)
        self.processes.barrier()

    def export(self, runner: nn.Module, model: nn.Module, config: Any) -> Adapter | None:
        return export_adapter(model, portable=True) if self.processes.main else None


class Sharded(Plain):
    """FSDP2 over the transformer blocks (sharded.py): the model is never whole on one process."""

    kind = "sharded (FSDP)"

    def prepare(self, task: Task, config: Any, device: torch.device) -> nn.Module:
        if config.fsdp_offload and device.type != "cuda":
            raise TrainingError("--fsdp-offload moves the shards from GPU to CPU memory; on a CPU they are there "
                                "already")
        runner = self.adapt(task, config)  # on the meta device: no memory yet
        sharded.shard(runner, task.model, config.bf16, config.fsdp_offload)
        sharded.materialize(runner, task.model, config.model, getattr(torch, config.dtype), config.lora(), "default",
                            config.seed, device)
        return runner

    def wrap(self, runner: nn.Module, device: torch.device) -> nn.Module:
        return runner  # the sharded root is what runs

    def evaluator(self, runner: nn.Module) -> nn.Module:
        return runner  # its hooks gather the weights

    def reads(self, checkpoint: Path) -> bool:
        return sharded.is_sharded_checkpoint(checkpoint)

    def restore(self, checkpoint: Path, runner: nn.Module, model: nn.Module, optimizer) -> dict[str, Any]:
        return sharded.load_sharded_checkpoint(checkpoint, runner, optimizer)

    def save(self, out: Path, step: int, runner: nn.Module, model: nn.Module, optimizer, state: dict[str, Any],
             keep: int) -> None:
        sharded.save_sharded_checkpoint(out, step, runner, optimizer, state, keep)  # every process its shards
        self.processes.barrier()

    def export(self, runner: nn.Module, model: nn.Module, config: Any) -> Adapter | None:
        return sharded.full_adapter(runner, model, config.lora(), "default")  # a collective


def strategy_for(config: Any, processes: Processes) -> Plain:
    """``Sharded`` for ``--shard fsdp``, ``Plain`` otherwise (image runs have no such setting)."""
    return Sharded(processes) if getattr(config, "shard", "ddp") == "fsdp" else Plain(processes)

"""Several processes under torchrun: DistributedDataParallel on gloo (CPU) or NCCL (GPU).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is one process
and every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, shard: str = "auto") -> Processes:
        """The processes torchrun started; ``shard="fsdp"`` needs torchrun, even for one process
        (FSDP works on a process group)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if shard == "fsdp" and "WORLD_SIZE" not in os.environ:
            raise ValueError("--shard fsdp runs under torchrun (torchrun --nproc-per-node N -m lorakit train ...)")
        if shard == "none" and world_size > 1:
            raise ValueError(f"--shard none with {world_size} processes: use ddp or fsdp under torchrun")
        if world_size == 1 and shard != "fsdp":
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    def device(self, wanted: str) -> torch.device:
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return torch.device(wanted)

    def sum(self, value: float | int | torch.Tensor, device: torch.device) -> float | torch.Tensor:
        """``value`` summed over all processes; a tensor stays a tensor (nothing is read on the host)."""
        if self.world_size == 1:
            return value
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to(device, torch.float64).clone()
            dist.all_reduce(tensor)
            return tensor
        tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel when there are several processes."""
        if self.world_size == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

"""The NaN/Inf guard of a training step, without a host synchronisation per step.

A step whose loss or gradient norm is NaN or infinite must not change the adapter. The
plain way asks the device after every step (``if not isfinite(loss)``), which makes the
host wait for the GPU to drain its queue before it may launch the next step. Here the
check stays on the device:

- AdamW runs fused and takes the step's ``found_inf`` flag (as it does from PyTorch's
  GradScaler): a bad step leaves parameters, moments and step counts untouched, on the
  device, with no host round trip;
- the guard keeps, on the device, the first bad step and its loss and norm; the host
  reads them only when it needs numbers anyway (a log line, an evaluation, a
  checkpoint) and stops the run there. No checkpoint is written after a bad step, so
  the last one on disk is always good, as with a check per step.

Optimizers that cannot skip on the device (FSDP's sharded parameters) are checked on the
host every step, as before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Diverged(Exception):
    """A non-finite step: ``step`` (1-based), its loss and gradient norm."""

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(f"step {step}: loss {loss}, gradient norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def adamw(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where every parameter allows it (plain float tensors on a CPU or a GPU):
    one kernel per step instead of one per tensor, and the device-side skip above."""
    params = [p for group in groups for p in group["params"]]
    fused = all(type(p.data) is Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


class Guard:
    """The step's finiteness, checked on the device when the optimizer allows it."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.on_device = bool(optimizer.defaults.get("fused"))
        self.first = torch.zeros((), dtype=torch.float64, device=device)  # 1-based step; 0: none yet
        self.values = torch.zeros(2, dtype=torch.float64, device=device)  # its loss and gradient norm

    def step(self, parameters: list[nn.Parameter], max_grad_norm: float | None, loss: Tensor,
             step: int) -> Tensor:
        """Clip the gradients and apply the optimizer's step unless the loss or the norm is
        not finite; return the gradient norm (a tensor: nothing is read on the host)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        loss = torch.as_tensor(loss, dtype=torch.float64, device=grad_norm.device)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if not self.on_device:
            if bad:  # the host reads the flag: the step waits for the device
                raise Diverged(step + 1, loss.item(), grad_norm.item())
            self.optimizer.step()
        else:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
            # The fused kernel writes the parameters through their pointers and leaves their
            # version counters alone; caches keyed on them (DoRA's norm) must see the change.
            torch.autograd.graph.increment_version(parameters)
            new = bad & (self.first == 0)
            self.first = torch.where(new, step + 1, self.first)
            self.values = torch.where(new, torch.stack([loss, grad_norm.double()]), self.values)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def check(self) -> None:
        """Raise Diverged if any step since the run began was not finite (one host read)."""
        if not self.on_device:
            return
        first, loss, grad_norm = torch.cat([self.first[None], self.values]).tolist()
        if first:
            raise Diverged(int(first), loss, grad_norm)

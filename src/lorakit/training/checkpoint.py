"""Checkpoints that let a run continue exactly where it stopped.

``<out>/checkpoints/step-000040/`` holds everything the next step depends on:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter, in PEFT's format;
- ``optimizer.safetensors``: AdamW's moments and step counts, one tensor each;
- ``rng.safetensors``: the torch random states (dropout), CPU and CUDA;
- ``state.json``: the step, counters, and the optimizer's hyperparameters.

The data position is the step itself (see ``batches``), and the learning rate is a
function of the step, so nothing else is needed. A checkpoint directory is written
whole under a temporary name and renamed into place: a run killed at any moment
leaves complete checkpoints and at most a hidden temporary sibling. Nothing is
pickled; loading reads safetensors and JSON only.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..files import adapter_files, restore_adapter, write_directory

STEP_DIR = re.compile(r"^step-(\d+)$")
# What an atomic write leaves behind when the process dies mid-write:
# ``.NAME.tmp-*`` / ``.NAME.old-*`` beside the file or directory it was replacing.
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[^/]+$")


class OutputInUse(ValueError):
    """Another process is writing a run into the same output directory."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``out`` while a run writes to it.

    The lock (``flock`` on the directory itself, released by the kernel when the
    process dies, even by SIGKILL) makes two runs into one directory an error rather
    than a silent mix. While it is held, every hidden temporary that an atomic write
    left there is stale, so they are removed first.

    A run refused before it wrote anything (a model that does not load, targets that match
    no module) leaves no empty directory behind: one this call made is removed again.
    """
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(f"{out} is being written by another lorakit train run") from None
        remove_stale_temporaries(out)
        yield
    except BaseException:
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        os.close(handle)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove what killed atomic writes left in ``out`` and ``out/checkpoints``; return it.

    Only hidden entries named like lorakit's temporaries are touched, and a symlink
    is removed itself, never followed.
    """
    removed = []
    for folder in (out, out / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not TEMPORARY.match(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the highest step (temporary and partial directories are hidden)."""
    found = [(int(m.group(1)), p) for p in (out / "checkpoints").glob("step-*") if (m := STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically and drop all but the newest ``keep``."""
    optim = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
               for index, slots in optim["state"].items() for key, value in slots.items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    files = adapter_files(model)
    files["optimizer.safetensors"] = safetensors_bytes(tensors)
    files["rng.safetensors"] = safetensors_bytes(rng)
    files["state.json"] = json.dumps({**state, "step": step, "param_groups": optim["param_groups"]},
                                     indent=2).encode()
    path = write_directory(checkpoint_dir(out, step), files)
    older = sorted(p for p in (out / "checkpoints").glob("step-*") if STEP_DIR.match(p.name))[:-keep]
    for old in older:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights, optimizer and random states from ``path``; return its state.json."""
    state = json.loads((path / "state.json").read_text())
    restore_adapter(model, path)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temporary file + rename)."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temporary file + rename)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)

"""FSDP2 for LoRA training: the frozen base sharded over the processes, adapters trained.

    each transformer block:  fully_shard(block)      its weights live 1/N on each process,
    the root (loss module):  fully_shard(root)       gathered for its forward and backward

(PyTorch's ``torch.distributed.fsdp.fully_shard``, as torchtune and Axolotl use it.) A
LoRA adapter computes inside its layer's call, so its parameters, sharded like the
base's, are gathered with its block. Gradients exist only for the adapters; they are
reduce-scattered in float32 and each process updates its own shard of A and B (float32
master weights; with ``bf16`` the gathered copies compute in bfloat16).

The model is never whole on one process: it is built on the meta device, adapters are
attached there, it is sharded, and then each process fills its own shards, reading the
base's safetensors files one tensor at a time and replaying the adapters' seeded
initialisation, so a sharded run starts from the same adapter as an unsharded one.

Checkpoints are ``torch.distributed.checkpoint`` directories (adapter and optimizer
shards, every process writing its own) plus ``state.json`` and the random states; they
load into any number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..adapter import Adapter
from ..attach import lora_layers
from ..config import LoraConfig
from ..files import described
from .checkpoint import STEP_DIR, checkpoint_dir


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.layers``, ``transformer.h``, ...)."""
    backbone = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        found = getattr(backbone, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"{type(model).__name__}: no list of transformer blocks found to shard")


def shard(runner: nn.Module, model: nn.Module, bf16: bool, offload: bool) -> None:
    """fully_shard every block of ``model``, then ``runner`` (the loss module holding it)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    placement = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in blocks(model):
        fully_shard(block, mp_policy=precision, offload_policy=placement)
    fully_shard(runner, mp_policy=precision, offload_policy=placement)


def build_meta_model(spec: str, dtype: torch.dtype) -> nn.Module:
    """The model of ``spec`` with its parameters on the meta device (no memory) and its
    buffers real (rotary frequencies are computed, not stored in the files)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..pretrained import load_config

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(load_config(spec), dtype=dtype)
    model.tie_weights()  # as from_pretrained does (lm_head = embed_tokens where the config says so)
    model.config.name_or_path = spec
    return model


def materialize(runner: nn.Module, model: nn.Module, spec: str, dtype: torch.dtype, config: LoraConfig, name: str,
                seed: int, device: torch.device) -> None:
    """Give the sharded meta ``runner`` real storage on ``device`` and fill it: the base from
    the model's files, the adapters from their seeded initialisation, the buffers as built."""
    from ..pretrained import release_freed_memory, resolve

    buffers = {key: buffer.clone() for key, buffer in runner.named_buffers()}
    runner.to_empty(device=device)
    with torch.no_grad():
        for key, buffer in runner.named_buffers():
            buffer.copy_(buffers[key])
    fill_base(runner, weight_files(resolve(spec)), _prefix(runner, model), dtype)
    fill_adapters(model, config, name, seed)
    release_freed_memory()


def weight_files(directory: Path) -> dict[str, Path]:
    """State-dict key -> the safetensors file holding it, for a model directory."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {key: directory / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{directory}: no model.safetensors (sharded loading reads safetensors files)")
    with safe_open(single, framework="pt") as handle:
        return {key: single for key in handle.keys()}


@torch.no_grad()
def fill_base(runner: nn.Module, files: dict[str, Path], prefix: str, dtype: torch.dtype) -> None:
    """Copy each process's own rows of every base parameter from the files: nothing but
    its shards is ever read."""
    from torch.distributed.tensor import DTensor

    filled, unfilled = set(), {}
    for name, param in runner.named_parameters(remove_duplicate=False):
        key = name.removeprefix(prefix)
        if ".adapters." in name:
            continue
        if key not in files:  # a tied weight (lm_head = embed_tokens) is stored once
            unfilled[name] = param
            continue
        # The file is opened (memory-mapped) per tensor and closed again: a mapping held over
        # the whole load keeps every page read so far resident (measured: 705 vs 442 MiB).
        with safe_open(files[key], framework="pt") as handle:
            if isinstance(param, DTensor):
                param.to_local().copy_(_local_rows(handle, key, param).to(dtype))
            else:
                param.copy_(handle.get_tensor(key).to(dtype))
        filled.add(id(param))
    missing = [name for name, param in unfilled.items() if id(param) not in filled]
    if missing:
        raise FileNotFoundError(f"no weights in the model's files for {', '.join(missing[:5])}")


def _local_rows(handle, key: str, param) -> torch.Tensor:
    """This process's rows of a dim-0-sharded parameter, read from the file alone (FSDP2 gives
    process i rows [i·c, (i+1)·c) with c = ceil(rows / processes))."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"{key}: expected a dim-0 shard, got {param.placements}")
    rows, processes = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // processes)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    return handle.get_slice(key)[start:min(start + chunk, rows)]


@torch.no_grad()
def fill_adapters(model: nn.Module, config: LoraConfig, name: str, seed: int) -> None:
    """Each process's shards of the adapters' initial values: the same seeded draws, in
    the same order, as ``attach`` makes on an unsharded model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    torch.manual_seed(seed)
    for _, layer in lora_layers(model):
        adapter = layer.adapters[name]
        fresh = adapter.first_values(layer)
        for key, param in adapter.named_parameters():
            value = fresh[key]
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
                param.to_local().copy_(value)
            else:
                param.copy_(value)


def full_adapter(runner: nn.Module, model: nn.Module, config: LoraConfig, name: str) -> Adapter | None:
    """The whole adapter, gathered from every process's shards (a collective: every process
    calls it); the value on the main process, None on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tensors = get_model_state_dict(runner, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if dist.get_rank() != 0:
        return None
    prefix = _prefix(runner, model)
    layers = {}
    for path, layer in lora_layers(model):
        adapter = layer.adapters[name]
        key = f"{prefix}{path}.adapters.{name}"
        gathered = {n: tensors[f"{key}.{n}"] for n, _ in adapter.named_parameters()}
        layers[path] = adapter.value(layer, gathered).cloned()
    return Adapter(config, layers, {}, *described(model))


def _prefix(runner: nn.Module, model: nn.Module) -> str:
    for name, module in runner.named_modules():
        if module is model:
            return f"{name}." if name else ""
    raise ValueError("the model is not inside the runner")


# -- checkpoints ---------------------------------------------------------------------------
def is_sharded_checkpoint(path: Path) -> bool:
    return (path / ".metadata").exists()


def save_sharded_checkpoint(out: Path, step: int, runner: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], keep: int) -> Path:
    """Every process writes its shards into a staging directory; the main process adds
    state.json and renames it into place once all have finished (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    rank = dist.get_rank()
    final = checkpoint_dir(out, step)
    staging = final.with_name(f".{final.name}.tmp-sharded")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(runner, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
    _write(staging / f"rng-{rank}.safetensors", safetensors_bytes({"cpu": torch.get_rng_state()}))
    dist.barrier()
    if rank == 0:
        _write(staging / "state.json", json.dumps({**state, "step": step, "world_size": dist.get_world_size()},
                                                  indent=2).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        older = sorted(p for p in (out / "checkpoints").glob("step-*") if STEP_DIR.match(p.name))[:-keep]
        for old in older:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, runner: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Adapter and optimizer shards from ``path`` into this world size; this process's random
    state (the main process's when the checkpoint had fewer processes); state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(runner, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=True))
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=path)  # every adapter and optimizer key must be in the checkpoint
    # not strict: the frozen base is not in a checkpoint (it comes from the model's files)
    set_state_dict(runner, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    rng = path / f"rng-{dist.get_rank()}.safetensors"
    torch.set_rng_state(load_file(rng if rng.exists() else path / "rng-0.safetensors")["cpu"])
    state = json.loads((path / "state.json").read_text())
    state.pop("world_size", None)
    return state


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

"""Peak training memory of a model, before any weight is loaded.

    peak = weights + adapter + gradients + optimizer state + activations + logits

For a method (full fine-tuning, LoRA, or QLoRA: LoRA on an NF4 base; DPO and GRPO train a
LoRA adapter too) and a batch of B x L tokens:

- weights: every base parameter in ``dtype``; QLoRA stores the linear layers (all but
  the output head) in NF4 at 0.516 bytes per weight (4 bits, an 8-bit scale per 64
  weights, a second-level scale per 256 scales) and the rest in bfloat16.
- adapter, gradients, optimizer: what is trained, with a gradient and AdamW's two
  moments in the trained parameter's dtype (LoRA trains float32 adapters; full
  fine-tuning trains the weights in ``dtype``).
- activations: not estimated from a formula but counted. The real model (transformers
  builds it from its config) runs its forward pass on fake tensors, shapes without
  data, with LoRA attached the way ``lorakit train`` attaches it, and every tensor
  autograd saves for the backward pass is summed, once per storage. Models of one and
  two blocks give the cost of a block and of everything else, so the count with
  gradient checkpointing is: everything else + each block's input + one block
  recomputed during backward.
- logits: the chunked loss (training/loss.py) holds one chunk's float32 logits (then
  their softmax) at a time, plus the (tokens x hidden) gradient.

- DPO: B pairs are 2B sequences (chosen and rejected) in one forward pass; the reference
  (the adapter switched off) runs without gradients, so it adds nothing that lasts.
- GRPO: B completions of L tokens (prompt + completion) are trained per forward pass; the
  rollouts of a step decode ``rollouts`` rows at once with a KV cache of
  2 x layers x rows x L x kv_heads x head_dim values. Decoding and training alternate, so
  the peak holds the larger of the two.

Not counted in the peak: allocator fragmentation and caching, the CUDA context (0.3 -
1 GiB), and kernels' own workspaces. So a model fits a GPU when the peak leaves
GPU_OVERHEAD_BYTES of it free. The planner is checked against measured peaks
(bench/bench_plan.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .pretrained import chunk_tokens, load_config, split_head

METHODS = ("full", "lora", "qlora", "dpo", "grpo")
DEFAULT_METHODS = ("full", "lora", "qlora")  # what ``lorakit plan`` shows unless asked
GPU_OVERHEAD_BYTES = 2**30  # the CUDA context, workspaces and allocator slack: left free when judging a fit
NF4_BYTES_PER_WEIGHT = 0.516  # torchao's NF4: 0.5 + 1/64 + 2/(64 * 256); pinned by tests/test_plan.py


@dataclass(frozen=True)
class Plan:
    model: str
    method: str
    rank: int | None
    batch: int
    seq: int
    dtype: str
    checkpointing: bool
    weights_bytes: int
    adapter_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # with checkpointing when ``checkpointing``, else without
    activations_without_checkpointing_bytes: int
    activations_with_checkpointing_bytes: int
    logits_bytes: int
    peak_bytes: int
    trainable_params: int
    gpu_bytes: int | None = None
    fits: bool | None = None
    kv_cache_bytes: int = 0  # GRPO's rollouts

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def plan(spec: str, method: str = "lora", rank: int = 16, batch: int = 1, seq: int = 512,
         dtype: torch.dtype = torch.bfloat16, checkpointing: bool = False, gpu_bytes: int | None = None,
         targets: str | tuple[str, ...] = ALL_LINEAR, rollouts: int | None = None) -> Plan:
    """The peak training memory of ``spec`` (a preset, a model directory or config.json).

    ``rollouts``: rows GRPO decodes at once (default ``batch``)."""

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got {batch} and {seq}")
    config = load_config(spec)
    compute = torch.bfloat16 if method == "qlora" else dtype
    lora = None if method == "full" else LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
    rows = 2 * batch if method == "dpo" else batch  # a DPO pair is two sequences
    tokens = rows * seq
    width = compute.itemsize

    counts = _count(config, compute, lora)
    one, two = (_saved_bytes(config, layers, compute, lora, rows, seq) for layers in (1, 2))
    per_block = two - one
    rest = one - per_block
    blocks = config.num_hidden_layers
    without = rest + blocks * per_block
    with_ = rest + blocks * tokens * config.hidden_size * width + per_block

    if method == "qlora":
        weights = round(counts["linear"] * NF4_BYTES_PER_WEIGHT) + (counts["base"] - counts["linear"]) * 2
    else:
        weights = counts["base"] * width
    trained, trained_width = (counts["base"], width) if method == "full" else (counts["adapter"], 4)
    adapter = 0 if method == "full" else counts["adapter"] * 4
    gradients = trained * trained_width
    optimizer = 2 * gradients  # AdamW's two moments, in the trained parameters' dtype
    chunk = min(tokens, chunk_tokens(config.vocab_size))
    # one chunk's float32 logits (then softmax) at a time, plus, in half precision, the head's
    # own output before its float32 copy; and the (tokens x hidden) gradient kept
    logits = chunk * config.vocab_size * (4 + (width if width != 4 else 0)) + tokens * config.hidden_size * width
    activations = with_ if checkpointing else without
    kv_cache = _kv_cache_bytes(config, rollouts or batch, seq, width) if method == "grpo" else 0
    peak = weights + adapter + gradients + optimizer + max(activations + logits, kv_cache)
    return Plan(
        model=spec, method=method, rank=None if method == "full" else rank, batch=batch, seq=seq,
        dtype=str(compute).removeprefix("torch."), checkpointing=checkpointing,
        weights_bytes=weights, adapter_bytes=adapter, gradients_bytes=gradients,
        optimizer_bytes=optimizer, activations_bytes=activations,
        activations_without_checkpointing_bytes=without, activations_with_checkpointing_bytes=with_,
        logits_bytes=logits, peak_bytes=peak, trainable_params=trained, gpu_bytes=gpu_bytes,
        fits=None if gpu_bytes is None else peak + GPU_OVERHEAD_BYTES <= gpu_bytes, kv_cache_bytes=kv_cache,
    )


def _kv_cache_bytes(config, rows: int, seq: int, width: int) -> int:
    """Keys and values of every layer for ``rows`` sequences of ``seq`` tokens."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * rows * seq * heads * head_dim * width


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80 GiB', '512MiB' -> bytes (GB and GiB both mean 2**30, as GPU memory is sold)."""
    units = {"tib": 2**40, "tb": 2**40, "gib": 2**30, "gb": 2**30, "g": 2**30, "mib": 2**20, "mb": 2**20, "m": 2**20}
    value = text.strip().lower().replace(" ", "")
    for unit, size in units.items():
        if value.endswith(unit):
            try:
                return int(float(value.removesuffix(unit)) * size)
            except ValueError:
                break
    raise ValueError(f"cannot read {text!r} as a memory size; expected e.g. 24GiB or 512MiB")


def _fake_model(config, compute: torch.dtype, lora: LoraConfig | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from .attach import attach

    model = AutoModelForCausalLM.from_config(config, dtype=compute).train()
    if lora is None:
        return model.requires_grad_(True)
    attach(model, lora)
    return model


def _count(config, compute: torch.dtype, lora: LoraConfig | None) -> dict[str, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .attach import output_head

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(config, compute, lora)
        head = output_head(model)
        adapter = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
        base = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
        linear = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, nn.Linear) and m is not head) if head is not None else 0
        linear += sum(layer.weight.numel() for layer in _lora_layers(model))
    return {"base": base, "adapter": adapter, "linear": linear}


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from .layers import LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def _saved_bytes(config, layers: int, compute: torch.dtype, lora: LoraConfig | None, batch: int, seq: int) -> int:
    """Bytes autograd saves in a forward pass of the backbone (no head) with ``layers`` blocks."""
    from torch._subclasses.fake_tensor import FakeTensorMode


    fields = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # per-block lists follow the count
    config = config.__class__.from_dict({**fields, "num_hidden_layers": layers})
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(config, compute, lora)
        parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in parameters:  # weights are counted once, as weights
                saved[storage._cdata] = storage.nbytes()
            return tensor

        ids = torch.zeros((batch, seq), dtype=torch.long)
        parts = split_head(model)
        backbone = parts[0] if parts is not None else model
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            backbone(input_ids=ids, use_cache=False)
    return sum(saved.values())

"""LoRA on fused mixture-of-experts weights: one low-rank update per expert.

    W_e <- W_e + s · B_e A_e,   e = 0 .. E-1,   W (E, out, in), A (E, r, in), B (E, out, r)

transformers 5 keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and their kin as 3-D
parameters of one module (``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj``
(E, H, I)) that its forward indexes per expert, so there is no ``nn.Linear`` to wrap. Here a
parameter is a target like a module: its path (``...mlp.experts.gate_up_proj``) is matched
by ``targets`` as PEFT's ``target_parameters`` matches it, and "all-linear" includes it.

``LoraExperts`` takes the experts module's place and runs its forward (token-expert pairs
sorted by expert, gate·up, down, weighted sum); each adapted parameter becomes a
``LoraExpertWeight`` layer, an ordinary ``LoraLayer`` (adapters, merge, the variant seam)
over the sorted rows: on expert e's block it computes x W_e^T + s (x A_e^T) B_e^T, so no
dense ΔW is ever built in the forward. Each of the three products is one grouped GEMM
(``F.grouped_mm``) where the device runs it, else a loop over the experts. ``state_dict`` keeps the base keys (``...experts.gate_up_proj``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .layers import LoraLayer, set_module
from .layouts import Layout, register_layout


PROJECTIONS = ("gate_up_proj", "down_proj")  # (E, 2I, H) and (E, H, I), as transformers 5 stores them


class Stacked(Layout):
    """E experts' weights in one tensor, W (E, out, in); A (E, r, in), B (E, out, r),
    ΔW_e = s · B_e A_e. PEFT names such a tensor in ``target_parameters`` and keeps the E
    pairs as one, A (E·r, in) expert-major and B (out, r·E) expert-minor."""

    name = "experts"
    peft_parameter = True  # told by target_parameters, never by the factors
    batch_dims = 1
    servable = True

    def product(self, A: Tensor, B: Tensor) -> Tensor:
        return torch.bmm(B, A)  # (E, out, r) @ (E, r, in) -> (E, out, in)

    def update_shape(self, A: Tensor, B: Tensor) -> tuple[int, ...]:
        return (A.shape[0], B.shape[1], A.shape[2])

    def to_peft(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        A, B = tensors["lora_A"], tensors["lora_B"]
        experts, rank, _ = A.shape  # column j·E + e of B is expert e's column j
        return {**tensors, "lora_A": A.reshape(experts * rank, -1),
                "lora_B": B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)}

    def from_peft(self, tensors: Mapping[str, Tensor], rank: int) -> dict[str, Tensor] | str:
        A, B = tensors["lora_A"], tensors["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] % rank or B.shape[1] != A.shape[0]:
            return (f"A {tuple(A.shape)}, B {tuple(B.shape)} are not E experts of rank {rank} "
                    "(expected A (E·r, in), B (out, r·E))")
        experts = A.shape[0] // rank
        return {**tensors, "lora_A": A.reshape(experts, rank, A.shape[1]),
                "lora_B": B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)}


EXPERTS = register_layout(Stacked())


def expert_parameters(module: nn.Module) -> dict[str, nn.Parameter] | None:
    """The 3-D expert tensors of a fused-experts module of the Mixtral / Qwen-MoE form (a
    ``gate_up_proj`` and a ``down_proj``, each (E, out, in), an ``act_fn``); None for any
    other module."""
    if isinstance(module, LoraExperts):
        return {name: module.weight_of(name) for name in PROJECTIONS}
    params = {name: getattr(module, name, None) for name in PROJECTIONS}
    if not all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params.values()):
        return None
    if not hasattr(module, "act_fn") or getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        return None
    return params


def unsupported_experts(module: nn.Module) -> str | None:
    """Why a module holding 3-D expert tensors cannot be adapted (None: it can, or it holds none)."""
    if expert_parameters(module) is not None:
        return None
    three_d = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not three_d:
        return None
    return (f"{type(module).__name__} holds expert tensors {three_d} in a form lorakit does not adapt "
            "(it adapts gate_up_proj (E, 2I, H) and down_proj (E, H, I) without biases: Mixtral, Qwen-MoE)")


class ExpertWeight(nn.Module):
    """One 3-D expert tensor as the base of a ``LoraExpertWeight`` (what ``nn.Linear`` is to
    ``LoraLinear``): ``weight`` (E, out, in) and its sizes."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = weight.shape
        self.weight = weight


class Groups:
    """Token-expert pairs sorted by expert: ``offsets`` (E,) ends each expert's block of rows;
    ``counts`` the block sizes on the host, read only where the per-expert loop runs."""

    def __init__(self, expert_of_pair: Tensor, num_experts: int, grouped: bool) -> None:
        self.grouped = grouped
        self.expert_of_pair, self.num_experts = expert_of_pair, num_experts
        self.offsets: Tensor | None = None
        self._counts: list[int] | None = None
        if grouped:  # stays on the device: no host read
            self.offsets = torch.bincount(expert_of_pair, minlength=num_experts).cumsum(0).to(torch.int32)

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = expert_counts(self.expert_of_pair, self.num_experts)
        return self._counts


def grouped_linear(x: Tensor, weight: Tensor, groups: Groups) -> Tensor:
    """Rows of ``x`` (S, in), grouped by expert, each times its expert's ``weight`` (E, out, in)
    transposed -> (S, out): one grouped GEMM where the device has one, else a loop."""
    aligned = all(n * x.element_size() % 16 == 0 for n in weight.shape[1:])  # grouped_mm's stride rule
    if groups.grouped and aligned:  # (S, in) x (E, in, out) by blocks
        return _ContiguousGrad.apply(F.grouped_mm(x, weight.transpose(-2, -1), offs=groups.offsets))
    blocks, start = [], 0
    for expert, count in enumerate(groups.counts):
        blocks.append(F.linear(x[start:start + count], weight[expert]))  # (n, in) @ (in, out)
        start += count
    return torch.cat(blocks)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    refuses the expanded (stride 0) gradients a ``sum`` hands back."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


_GROUPED: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` runs forward and backward here (torch >= 2.10 on CPU; on CUDA it
    depends on the card and dtype): tried once per device type and dtype on tiny tensors."""
    key = (device.type, dtype)
    if key not in _GROUPED:
        _GROUPED[key] = False
        if hasattr(F, "grouped_mm"):
            try:
                x = torch.ones(4, 16, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                offsets = torch.tensor([1, 4], device=device, dtype=torch.int32)
                out = F.grouped_mm(x, w.transpose(-2, -1), offs=offsets)
                out.backward(torch.ones_like(out))  # a dense gradient, as _ContiguousGrad hands it on
                _GROUPED[key] = True
            except (RuntimeError, NotImplementedError, TypeError):
                pass
    return _GROUPED[key]


class LoraExpertWeight(LoraLayer):
    """A fused expert tensor with adapters, over all experts' tokens at once: ``forward(x,
    groups)`` takes the rows grouped by expert and computes x W_e^T plus each adapter's
    s·B_e·A_e·x on expert e's block (``self.groups`` holds the grouping during that call, so
    the layer's shared forward and the variant seam work unchanged)."""

    layout = EXPERTS
    scalable_outputs = False
    adds_in_place = True  # one pass over the (S, out) output, not two

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.groups: Groups | None = None

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    @staticmethod
    def shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (base.num_experts, rank, base.in_features), (base.num_experts, base.out_features, rank)

    @staticmethod
    def draw_factors(A: Tensor, B: Tensor, init: str) -> None:
        """Each expert's A as an nn.Linear(in, r) weight would start (PEFT draws the (E·r, in)
        stack at once, which has the same fan-in); B zero."""
        stacked = A.view(-1, A.shape[-1])  # (E * r, in)
        if init == "gaussian":
            nn.init.normal_(stacked, std=1 / A.shape[1])
        else:
            nn.init.kaiming_uniform_(stacked, a=math.sqrt(5))
        nn.init.zeros_(B)

    def forward(self, x: Tensor, groups: Groups) -> Tensor:
        self.groups = groups
        try:
            return super().forward(x)
        finally:
            self.groups = None

    def base_forward(self, x: Tensor) -> Tensor:
        return grouped_linear(x, self.weight, self.groups)  # (S, in) -> (S, out)

    def down(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        return grouped_linear(dropout(x.to(A.dtype)), A, self.groups)  # (S, in) -> (S, r)

    def up(self, hidden: Tensor, B: Tensor, scaling: float) -> Tensor:
        return grouped_linear(hidden * scaling, B, self.groups)  # (S, r) -> (S, out)

    @classmethod
    def wrap(cls, model: nn.Module, path: str, base: nn.Module) -> LoraLayer:
        """The layer for expert tensor ``path`` (``base``: an ``ExpertWeight`` over it), put in
        its experts module, which becomes a ``LoraExperts`` on its first adapted tensor."""
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        if not isinstance(owner, LoraExperts):
            owner = LoraExperts(owner)
            set_module(model, owner_path, owner)
        layer = cls(base)
        delattr(owner, name)  # the tensor now lives in the layer
        setattr(owner, name, layer)
        return layer

    def unwrap(self, model: nn.Module, path: str) -> None:
        """Put the tensor back in its experts module, and that module back once none is adapted."""
        owner_path, _, name = path.rpartition(".")
        owner: LoraExperts = model.get_submodule(owner_path)
        setattr(owner, name, self.to_base().weight)
        if not any(isinstance(getattr(owner, n), LoraLayer) for n in owner.projections):
            set_module(model, owner_path, owner.to_base())


class LoraExperts(nn.Module):
    """A fused-experts module whose expert tensors may carry adapters.

    It holds the module's tensors under their own names, a ``Parameter`` or, once adapted,
    a ``LoraExpertWeight`` (whose ``weight`` state-dict hooks keep under the tensor's key), and
    runs the experts over the token-expert pairs sorted by expert (the ``grouped_mm`` form of
    transformers' experts)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.num_experts = base.num_experts
        self.act_fn = base.act_fn
        self.projections = PROJECTIONS
        for name in self.projections:
            self.register_parameter(name, getattr(base, name))
            base.register_parameter(name, None)
        self.train(base.training)
        object.__setattr__(self, "base_module", base)  # out of the tree, as a LoraLayer keeps its base
        self._register_state_dict_hook(_base_keys)
        self._register_load_state_dict_pre_hook(_layer_keys, with_module=True)

    def weight_of(self, name: str) -> Tensor:
        member = getattr(self, name)
        return member.weight if isinstance(member, LoraLayer) else member

    def project(self, name: str, x: Tensor, groups: Groups) -> Tensor:
        member = getattr(self, name)
        if isinstance(member, LoraExpertWeight):
            return member(x, groups)
        return grouped_linear(x, member, groups)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states (T, H); top_k_index, top_k_weights (T, k): each token's experts and weights."""
        top_k = top_k_index.shape[1]
        experts = top_k_index.reshape(-1)
        order = experts.argsort(stable=True)  # (T k,) token-expert pairs grouped by expert
        grouped = not is_fake(hidden_states) and grouped_mm_works(hidden_states.device, hidden_states.dtype)
        groups = Groups(experts, self.num_experts, grouped)
        rows = order // top_k  # the token of each pair
        gate, up = self.project("gate_up_proj", hidden_states[rows], groups).chunk(2, dim=-1)
        out = self.project("down_proj", self.act_fn(gate) * up, groups)  # (T k, H)
        weighted = out * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, rows, weighted.to(hidden_states.dtype))

    def to_base(self) -> nn.Module:
        """The original experts module, holding the (possibly merged) tensors."""
        base = self.base_module
        for name in self.projections:
            base.register_parameter(name, self.weight_of(name))
        object.__setattr__(self, "base_module", None)
        return base


def expert_counts(top_k_index: Tensor, num_experts: int) -> list[int]:
    """How many token-expert pairs each expert gets (one host read). In the memory planner's
    run on fake tensors there is nothing to read: it gets balanced routing, the expected load."""
    if is_fake(top_k_index):
        pairs = top_k_index.numel()
        return [pairs // num_experts + (e < pairs % num_experts) for e in range(num_experts)]
    return torch.bincount(top_k_index.reshape(-1), minlength=num_experts).tolist()


def _base_keys(module: LoraExperts, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """An adapted tensor's ``<name>.weight`` saved as ``<name>``, its key in the base model."""
    for name in module.projections:
        key = f"{prefix}{name}.weight"
        if key in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(key)


def _layer_keys(module: LoraExperts, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """The inverse of ``_base_keys`` on load: a base checkpoint loads straight in."""
    for name in module.projections:
        if isinstance(getattr(module, name), LoraLayer) and f"{prefix}{name}" in state_dict:
            state_dict[f"{prefix}{name}.weight"] = state_dict.pop(f"{prefix}{name}")

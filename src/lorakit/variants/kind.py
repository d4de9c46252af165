"""A kind of adapter: the module on each layer and the math of its value.

    y = base(x) + (the kind's update of W)·x,   W' = W + ΔW on merge

``Kind`` is the seam. A kind owns everything particular to it, and the rest of lorakit asks
it, never its name:

- its tensors: ``tensor_shapes(layer_class, base, rank)`` (their names are their PEFT file
  key suffixes) and ``initialise(layer)`` (their first values: ΔW = 0);
- its value (``LayerWeights``, adapter.py): ``delta_of`` (ΔW from the tensors), ``rank_of``,
  ``update_shape``, ``tensors_problem`` (is this set of names one module's?), ``value_problem``
  (do these tensors fit together?), ``merge_value`` (W with a value merged, without a model);
- on a layer: ``forward(layer, x, base, result, sign)``, ``merged_weight`` /
  ``unmerged_weight``, ``idle`` and ``release`` (for kinds that moved part of W into
  themselves), ``value(layer)`` / ``exported(layer)`` / ``load(value)``;
- its files: ``peft_config`` (the adapter_config.json fields that say the kind),
  ``kohya_names`` with ``kohya_tensors`` / ``from_kohya`` (its kohya / LyCORIS keys and
  alpha), ``diffusers``; None or False where it has no such file;
- what it refuses (``check_config``, ``check_layer``) and what it supports. Capabilities
  are opt-in: a kind is ``additive``, ``servable``, ``combinable``, ``shardable`` only where
  it says so and implements what that needs. A kind that declares nothing but its tensors
  and ΔW trains (its ΔW formed in each forward), saves, loads and merges.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .. import frozen
from ..adapter import LayerWeights
from ..config import LoraConfig
from ..layouts import CONV1D, CONV2D, LINEAR, Layout

if TYPE_CHECKING:
    from ..layers import LoraLayer


def factor_dtype(layer: LoraLayer) -> torch.dtype:
    """The dtype of an adapter's tensors on ``layer``: the base's, or float32 for a
    half-precision base, whose bf16/fp16 would lose most of the small update's bits (PEFT
    does the same)."""
    base_dtype = frozen.compute_dtype(layer.weight)
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class Kind(nn.Module):
    """One adapter of some kind on one layer: its tensors, registered as parameters under
    their file key suffixes, its scaling and its math."""

    display: ClassVar[str] = "adapter"  # how messages name it (register sets it from the name otherwise)
    additive = False  # its merge adds ΔW: it can be subtracted on the fly and unmerged exactly
    plain = False  # its update is s·B·A·x and nothing else (the sole-adapter path)
    fusable = False  # as a layer's only adapter it computes x (W + ΔW)ᵀ + b in one product
    servable = False  # a serving slot (A and s·Bᵀ per row) computes it in a mixed batch
    combinable = False  # its ΔW is a low-rank pair B·A that combine/compress/analyze can take
    shardable = False  # trains under FSDP2 (its first values need no base weight)
    # adapter_config.json fields that say this kind (peft_type "LORA" unless it says otherwise);
    # None: PEFT has no such kind, and lorakit names it in a field of its own
    peft_config: ClassVar[dict[str, Any] | None] = None
    kohya_names: ClassVar[dict[str, str] | None] = None  # tensor name -> kohya/LyCORIS key suffix; None: none
    diffusers = False  # diffusers' LoRA files hold it

    def __init__(self, layer: LoraLayer, rank: int, alpha: float, config: LoraConfig) -> None:
        super().__init__()
        dtype, device = factor_dtype(layer), layer.weight.device
        self.rank, self.alpha, self.init = rank, alpha, config.init
        self.scaling = config.scaling(alpha, rank)
        for name, shape in self.tensor_shapes(type(layer), layer.base_module, rank).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))
        self.dropout: nn.Module = nn.Identity()

    # -- what it is ---------------------------------------------------------------
    @classmethod
    def tensor_shapes(cls, layer_class: type[LoraLayer], base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of this kind on ``base`` (wrapped by ``layer_class``) at ``rank``, by name."""
        raise NotImplementedError(f"{cls.__name__} does not say its tensors")

    @classmethod
    def delta_of(cls, value: LayerWeights) -> Tensor:
        """ΔW in float32 from ``value``'s tensors, laid out like the module's weight (or, where
        ``value.shape`` is unknown, the (out, in) matrix)."""
        raise NotImplementedError(f"{cls.__name__} does not say its ΔW")

    @classmethod
    def rank_of(cls, value: LayerWeights) -> int:
        """The rank the value was made with (0 where no low-rank pair says one)."""
        return 0

    @classmethod
    def update_shape(cls, value: LayerWeights) -> tuple[int, ...]:
        """The shape of the weight ``value`` changes (ΔW's own where the tensors do not say it)."""
        return value.shape or tuple(value.delta().shape)

    @classmethod
    def tensors_problem(cls, names: set[str]) -> str | None:
        """What is wrong with a file module holding exactly these tensors (None: one module's)."""
        expected = set(cls.names())
        missing, unknown = sorted(expected - names), sorted(names - expected)
        if missing:
            return f"missing {missing[0]} (a {cls.__name__} module has {', '.join(sorted(expected))})"
        return f"unexpected tensor {unknown[0]}" if unknown else None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every tensor name a module of this kind may have (what a file key may end with)."""
        return ()

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The tensors every module of this kind has."""
        return cls.names()

    @classmethod
    def file_layout(cls, names: set[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> Layout:
        """The layout of a PEFT file's module of this kind from its tensors (``names``: their
        names as the file has them): a Conv2d's where a tensor has a kernel, else a Linear's."""
        return CONV2D if any(t.dim() == 4 for t in tensors.values()) else CONV1D if fan_in_fan_out else LINEAR

    @classmethod
    def value_problem(cls, value: LayerWeights, rank: int | None) -> str | None:
        """What does not fit in ``value``'s tensors (``rank``: the config's, where no model
        will check the shapes), or None."""
        try:
            value.delta()
        except RuntimeError as err:  # tensors that cannot be multiplied
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in value.tensors.items())
            return f"tensors {shapes} do not multiply ({str(err).splitlines()[0]})"
        return None

    @classmethod
    def kohya_tensors(cls, value: LayerWeights) -> dict[str, Tensor]:
        """``value`` as a kohya file's module holds it: tensors by ``kohya_names``, and ``alpha``."""
        raise NotImplementedError(f"{cls.__name__} has no kohya form")

    @classmethod
    def from_kohya(cls, name: str, part: dict[str, Tensor], alpha: float, layer_class: type[LoraLayer], base: nn.Module,
                   shape: tuple[int, ...]) -> tuple[str | None, LayerWeights | None, int]:
        """A kohya file's module (tensors by kohya key suffix, alpha) as a value checked to fit
        ``base`` (whose weight has ``shape``; ``name``: its kohya name, for messages), with the
        rank its config takes; or what is wrong."""
        raise NotImplementedError(f"{cls.__name__} has no kohya form")

    @staticmethod
    def merge_value(weight: Tensor, value: LayerWeights) -> Tensor:
        """W (float32, any device) with ``value`` merged in, without a model."""
        return weight + value.delta().reshape(weight.shape).to(weight.device)

    # -- what it refuses ----------------------------------------------------------
    @classmethod
    def describe(cls, config: LoraConfig) -> str:
        """How messages name this kind of adapter."""
        return f"variant {config.variant}"

    @classmethod
    def check_config(cls, config: LoraConfig) -> str | None:
        """Why this kind cannot take ``config``'s settings, or None."""
        return None

    @classmethod
    def check_layer(cls, layer_class: type[LoraLayer], base: nn.Module) -> str | None:
        """Why this kind cannot go on ``base`` (``layer_class`` would wrap it), or None."""
        if not layer_class.dense_update:
            return f"not supported on {type(base).__name__} (its layer cannot apply a dense update)"
        return None

    # -- on a layer ---------------------------------------------------------------
    def initialise(self, layer: LoraLayer) -> None:
        """The first values (ΔW = 0, so nothing changes); all zero unless the kind says otherwise."""

    def first_values(self, layer: LoraLayer) -> dict[str, Tensor]:
        """Full tensors of the first values, drawn as ``initialise`` draws them, for a sharded
        model whose parameters are shards (``shardable`` kinds)."""
        raise NotImplementedError(f"{type(self).__name__} is not shardable")

    def forward(self, layer: LoraLayer, x: Tensor, base: Tensor | None, result: Tensor | None,
                sign: float = 1.0) -> Tensor:
        """``result`` plus ``sign`` times this adapter's change of ``layer``'s output for input
        ``x`` (``base``: the frozen layer's own output, which a kind may rescale). Called for
        the layer's sole adapter before any base output exists (``result`` None, ``fusable``
        kinds), it returns the whole output. Here: ΔW formed from the tensors, applied as the
        base operation is."""
        delta = self.value(layer, dict(self.named_parameters())).delta().reshape(layer.weight.shape)
        if result is None:  # x (W + ΔW)ᵀ + b, one product
            return layer.weight_forward(x, layer.weight + delta, layer.bias)
        update = layer.weight_forward(x.to(delta.dtype), delta).to(result.dtype)  # x ΔWᵀ, or the base's conv
        return result + update if sign == 1.0 else result - update

    def idle(self, layer: LoraLayer, x: Tensor, result: Tensor) -> Tensor:
        """The layer's output while this adapter is neither in use nor merged (kinds that
        moved part of W into themselves add it back here)."""
        return result

    def merged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """W + ΔW for ``weight`` = W in float32, laid out like ``layer.weight``."""
        return self.merge_value(weight, self.value(layer))

    def unmerged_weight(self, layer: LoraLayer, weight: Tensor) -> Tensor:
        """The inverse of ``merged_weight`` (kinds that are ``additive``)."""
        return weight - self.value(layer).delta().reshape(weight.shape)

    def release(self, layer: LoraLayer) -> None:
        """Give back to ``layer`` what this adapter took from W (it is about to go, unmerged)."""

    def value(self, layer: LoraLayer, tensors: dict[str, Tensor] | None = None) -> LayerWeights:
        """This adapter as a plain value (detached, not copied); ``tensors``: its parameters by
        name from elsewhere (an FSDP gather) instead of its own."""
        tensors = tensors if tensors is not None else {n: p.detach() for n, p in self.named_parameters()}
        return LayerWeights(type(self), tensors, self.scaling, layer.layout, tuple(layer.weight.shape))

    def exported(self, layer: LoraLayer) -> LayerWeights:
        """The value an adapter file holds for other tools: relative to the base they load."""
        return self.value(layer)

    def load(self, value: LayerWeights) -> None:
        """Copy ``value``'s tensors (checked to fit) into this adapter's parameters."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(value.tensors[name].reshape(param.shape))

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters())
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, {shapes}"

"""One adapter as a plain value: per module, its kind's tensors, the scaling and the layout.

    ΔW = (alpha / r) · B A,  laid out like the module's ``weight``      (plain LoRA)

or whatever update the value's kind (variants/) forms from its tensors: DoRA adds a
magnitude, LoHa and LoKr have factors instead of A and B. A ``LayerWeights`` carries its
kind (the adapter class) and its layout (layouts.py) as objects, and asks them for its
ΔW, rank and shape; nothing here knows a kind's tensor names.

An ``Adapter`` is what an adapter *is*, apart from any model: formats/ reads and writes
it (each file format's keys stay there), ``export_adapter`` takes it out of a live model
and ``install`` puts it back, serving fills its slots from it, and code that combines
adapters works on it. It is immutable: operations return new values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from torch import Tensor

from .config import LoraConfig
from .layouts import LAYOUTS, Layout

if TYPE_CHECKING:
    from .variants.kind import Kind


@dataclass(frozen=True)
class LayerWeights:
    """One adapter on one module: its kind's tensors by name (their PEFT file key suffixes:
    ``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``hada_w1_a``, ...)."""

    kind: type[Kind]  # the adapter class whose math these tensors follow
    tensors: Mapping[str, Tensor]
    scaling: float
    layout: Layout
    # the weight's shape where the tensors do not say it (a LoHa's on a Conv2d); None: unknown
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layout, Layout):
            raise ValueError(f"layout must be one of the layouts (a lorakit.layouts.Layout: "
                             f"{', '.join(LAYOUTS)}), got {self.layout!r}")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def cloned(self) -> LayerWeights:
        """A copy that owns its tensors (later training does not change it)."""
        return self.replace({name: t.clone() for name, t in self.tensors.items()})

    def replace(self, tensors: Mapping[str, Tensor]) -> LayerWeights:
        """The same kind, scaling, layout and shape with other tensors."""
        return LayerWeights(self.kind, tensors, self.scaling, self.layout, self.shape)

    @property
    def A(self) -> Tensor:
        """The down factor of a kind with a low-rank pair B·A (combinable and servable kinds)."""
        return self.tensors["lora_A"]

    @property
    def B(self) -> Tensor:
        """The up factor of a kind with a low-rank pair B·A."""
        return self.tensors["lora_B"]

    @property
    def rank(self) -> int:
        return self.kind.rank_of(self)

    @property
    def nbytes(self) -> int:  # as float32, the way serving keeps it
        return 4 * sum(t.numel() for t in self.tensors.values())

    def delta(self) -> Tensor:
        """ΔW in float32, laid out like the module's weight (a kind may use it otherwise:
        DoRA's is the update of the direction)."""
        return self.kind.delta_of(self)

    def update_shape(self) -> tuple[int, ...]:
        """The shape of the weight this value changes."""
        return self.kind.update_shape(self)


@dataclass(frozen=True)
class Adapter:
    """A whole adapter: its settings, its layers by module path, and any modules it
    stores whole (``modules_to_save``, by state-dict key under the module path)."""

    config: LoraConfig
    layers: Mapping[str, LayerWeights]
    saved: Mapping[str, Tensor] = field(default_factory=dict)
    base_model: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "saved", MappingProxyType(dict(self.saved)))

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

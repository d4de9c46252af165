"""Layouts: how an update in matrix form, ΔW (out, in), lies in a module's weight.

    linear     W (out, in)                 ΔW = s · B A
    conv1d     W (in, out), GPT-2          ΔW = s · (B A)^T
    embedding  W (num_embeddings, dim)     ΔW = s · (B A)^T, A (r, num_embeddings), B (dim, r)
    conv2d     W (out, in, kh, kw)         ΔW = s · B ∘ A, A (r, in, kh, kw), B (out, r, 1, 1)
    experts    W (E, out, in), MoE         ΔW_e = s · B_e A_e  (experts.py defines it)

A layout is an object that each layer class names (``LoraLinear.layout``) and each adapter
value carries; code that meets an update asks its layout how it lies, never its name. The
PEFT file rules that depend on the layout (the keys of A and B, whether a file's module is
of this layout, how a stacked pair is stored) are the layout's too, so a new layout is one
object plus ``register_layout``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor


class Layout:
    """A module's weight seen as the matrix an update changes: ``matrix`` and ``weight`` map
    between the two, ``product`` lays out B·A. The defaults are the plain (out, in) matrix's;
    what a layout supports (kohya files, serving slots) it says, as a kind does."""

    name = "layout"
    peft_names = ("lora_A.weight", "lora_B.weight")  # the file key suffixes of A and B
    fan_in_fan_out = False  # PEFT's flag for a weight stored (in, out)
    peft_parameter = False  # PEFT names it in target_parameters (a tensor, not a module)
    kernel = False  # W has a kernel beyond (out, in): a DoRA magnitude broadcasts over it
    out_dim = 0  # the dimension of W that indexes output units
    batch_dims = 0  # leading dimensions of W, A and B that index separate weights (experts)
    kohya = False  # kohya / LyCORIS files hold updates of it
    servable = False  # serving slots hold updates of it (serve/slots.py)

    def __repr__(self) -> str:
        return f"<layout {self.name}>"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:  # a layout is its name: LoraLinear.layout == "linear"
        return self.name == (other.name if isinstance(other, Layout) else other)

    def __hash__(self) -> int:
        return hash(self.name)

    def product(self, A: Tensor, B: Tensor) -> Tensor:
        """B·A laid out like the weight (unscaled)."""
        return self.weight(B @ A)  # (out, r) @ (r, in) -> (out, in)

    def weight(self, matrix: Tensor) -> Tensor:
        """A (out, in) matrix laid out like the weight."""
        return matrix

    def matrix(self, weight: Tensor) -> Tensor:
        """The inverse of ``weight``: the (out, in) matrix of a weight-shaped tensor."""
        return weight

    def rank(self, A: Tensor) -> int:
        """The rank of the pair, read from A."""
        return A.shape[self.batch_dims]

    def up_rank(self, B: Tensor) -> int:
        """The rank of the pair, read from B."""
        return B.shape[self.batch_dims + 1]

    def pair(self, A: Tensor, B: Tensor, weight_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """A (k, in) and B (out, k) of a factorisation of the matrix, shaped as this layout's
        pair for a weight of ``weight_shape``."""
        return A, B

    def update_shape(self, A: Tensor, B: Tensor) -> tuple[int, ...]:
        """The shape of the weight that A and B change."""
        return tuple(self.weight(torch.empty(B.shape[0], A.shape[1], device="meta")).shape)

    def matches_peft(self, names: Collection[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> bool:
        """Whether a PEFT file's module is of this layout, from its tensors (``names``: as the
        file names them; ``tensors``: by lorakit's names, lora_A, lora_B, ...)."""
        return False

    def to_peft(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A module's tensors as PEFT stores them."""
        return dict(tensors)

    def from_peft(self, tensors: Mapping[str, Tensor], rank: int) -> dict[str, Tensor] | str:
        """The inverse of ``to_peft`` (``rank``: the module's), or what does not fit."""
        return dict(tensors)


class Matrix(Layout):
    """nn.Linear: W (out, in)."""

    name = "linear"
    kohya = True
    servable = True

    def matches_peft(self, names: Collection[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> bool:
        return tensors["lora_A"].dim() == 2 and not fan_in_fan_out and "lora_A" in names


class Transposed(Matrix):
    """GPT-2's Conv1D: W stored (in, out)."""

    name = "conv1d"
    fan_in_fan_out = True
    out_dim = 1
    kohya = False

    def weight(self, matrix: Tensor) -> Tensor:
        return matrix.T

    def matrix(self, weight: Tensor) -> Tensor:
        return weight.T

    def matches_peft(self, names: Collection[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> bool:
        return tensors["lora_A"].dim() == 2 and fan_in_fan_out and "lora_A" in names


class EmbeddingTable(Transposed):
    """nn.Embedding: W (num_embeddings, dim), A (r, num_embeddings) looked up by row."""

    name = "embedding"
    peft_names = ("lora_embedding_A", "lora_embedding_B")
    fan_in_fan_out = False
    servable = False

    def matches_peft(self, names: Collection[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> bool:
        return "lora_embedding_A" in names


class Kernel(Layout):
    """nn.Conv2d: W (out, in, kh, kw); A (r, in, kh, kw) keeps the kernel, B (out, r, 1, 1)."""

    name = "conv2d"
    kernel = True
    kohya = True

    def product(self, A: Tensor, B: Tensor) -> Tensor:
        return torch.einsum("or,rikl->oikl", B.flatten(1), A)  # (out, r) x (r, in, kh, kw)

    def matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)  # (out, in·kh·kw)

    def update_shape(self, A: Tensor, B: Tensor) -> tuple[int, ...]:
        return (B.shape[0], *A.shape[1:])

    def pair(self, A: Tensor, B: Tensor, weight_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        return A.reshape(A.shape[0], *weight_shape[1:]), B.reshape(B.shape[0], B.shape[1], 1, 1)

    def matches_peft(self, names: Collection[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> bool:
        return tensors["lora_A"].dim() == 4


LINEAR, CONV1D, EMBEDDING, CONV2D = Matrix(), Transposed(), EmbeddingTable(), Kernel()

# every layout by name, in the order a PEFT file's module is matched against them
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (EMBEDDING, CONV2D, CONV1D, LINEAR)}


def register_layout(layout: Layout) -> Layout:
    """Make ``layout`` known to the file readers (first in line: a new layout is more specific)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"a layout is a lorakit.layouts.Layout, got {layout!r}")
    others = {name: known for name, known in LAYOUTS.items() if name != layout.name}
    LAYOUTS.clear()
    LAYOUTS.update({layout.name: layout, **others})
    return layout


def unregister_layout(name: str) -> None:
    """Forget the layout registered as ``name``."""
    del LAYOUTS[name]


def peft_layout(names: Collection[str], tensors: Mapping[str, Tensor], fan_in_fan_out: bool) -> Layout:
    """The layout of a PEFT file's module (not one in target_parameters) from its tensors."""
    return next(layout for layout in LAYOUTS.values()
                if not layout.peft_parameter and layout.matches_peft(names, tensors, fan_in_fan_out))


def parameter_layout() -> Layout:
    """The layout of a tensor PEFT names in target_parameters."""
    return next(layout for layout in LAYOUTS.values() if layout.peft_parameter)

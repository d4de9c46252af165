"""The frozen base computation, written once for training and for serving.

    y = x W^T + b    nn.Linear: W is (out, in)
    y = x W + b      GPT-2 Conv1D: W is stored transposed, (in, out)

Both ``LoraLinear``/``LoraConv1D`` (layers.py) and the serving ``SlotLinear``
(serve/slots.py) call ``linear`` here, so this is the one place where a weight that
is not a plain tensor plugs in:

- torchao's ``NF4Tensor`` and ``Int8Tensor`` (made by ``lorakit.quantize``). They are
  tensor subclasses kept under the plain ``weight`` key, as torchtune keeps its NF4
  weights, so ``state_dict`` keys stay those of the base; ``F.linear`` dispatches to
  their own kernels. Their compute dtype is the dtype they report (bfloat16).
- bitsandbytes' ``Params4bit``/``Int8Params``, from models a user quantized with
  transformers + ``BitsAndBytesConfig``: those modules keep computing their own base
  output (``LoraBnbLinear`` in bnb.py), since their kernels depend on module state
  (CPU weight repacking, int8 outlier handling); here they are only read (``dense``).

``dense`` gives any of them back as a float32 tensor laid out like the weight, which is
what merging and error bounds are computed against.

``linear_onto`` is ``linear``'s product for a plain weight, accumulated into a tensor
that already holds an adapter's update and the bias (layers.py says when).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantization(weight: Tensor) -> str | None:
    """'nf4', 'int8', 'bnb-4bit', 'bnb-int8', or None for a plain tensor."""
    name = type(weight).__name__
    if name == "NF4Tensor":
        return "nf4"
    if name == "Int8Tensor":
        return "int8"
    if "bitsandbytes" in sys.modules:  # only then can a weight be one of its parameters
        if name == "Params4bit":
            return "bnb-4bit"
        if name == "Int8Params":
            return "bnb-int8"
    return None


def is_quantized(weight: Tensor) -> bool:
    return quantization(weight) is not None


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of the base's output: that of the weight, or of a bitsandbytes weight
    before it was quantized (its module returns its input's dtype)."""
    if quantization(weight) in ("bnb-4bit", "bnb-int8"):
        state = getattr(weight, "quant_state", None)
        return state.dtype if state is not None else torch.float32
    return weight.dtype


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool = False) -> Tensor:
    """The base output for inputs ``x`` (..., in); ``transposed``: W is stored (in, out)."""
    if quantization(weight) is None:
        if transposed:  # GPT-2's Conv1D, which always has a bias
            flat = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)  # (N, in) @ (in, out)
            return flat.view(*x.shape[:-1], flat.shape[-1])
        return F.linear(x, weight, bias)
    x = x.to(weight.dtype)
    return F.linear(x, weight, _cast(bias, x))


def linear_onto(update: Tensor, x: Tensor, weight: Tensor, transposed: bool = False) -> Tensor:
    """``update`` + x W^T for a plain weight, the product accumulated into ``update``
    ((N, out), N the tokens of ``x``) by one GEMM with beta = 1, which reads ``update``
    while it computes. A layer with one adapter writes the adapter's update and the bias
    first and lets the base product land on them: adding the update after the base
    output instead reads and writes the whole (tokens x out) output once more, and that
    pass was most of the unmerged overhead."""
    flat = x.reshape(-1, x.shape[-1])
    update.addmm_(flat, weight if transposed else weight.T)  # (N, in) @ (in, out)
    return update.view(*x.shape[:-1], update.shape[-1])


def dense(weight: Tensor) -> Tensor:
    """W as a plain float32 tensor (dequantized when it is quantized), same layout."""
    kind = quantization(weight)
    if kind is None:
        return weight.detach().float()
    if kind == "nf4":
        return weight.get_original_weight().float()
    if kind == "int8":
        return weight.dequantize(torch.float32)
    import bitsandbytes as bnb

    if kind == "bnb-4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).float()


def nbytes(weight: Tensor) -> int:
    """Bytes the weight really holds: for a tensor subclass, the sum over its inner
    tensors (packed values, scales, the NF4 code table); for bitsandbytes, the packed
    data and its statistics."""
    if quantization(weight) is None:
        return weight.numel() * weight.element_size()
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return sum(nbytes(getattr(weight, name)) for name in names)
    state = getattr(weight, "quant_state", None)
    statistics = list(state.as_dict(packed=True).values()) if state is not None else [getattr(weight, "SCB", None)]
    return sum(t.numel() * t.element_size() for t in [weight.data, *statistics] if isinstance(t, Tensor))


def _cast(bias: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bias is None else bias.to(x.dtype)


# -- lorakit's own quantized weights (quantize.py makes them) ------------------------------
QUANTIZATIONS = ("nf4", "int8")


class QuantizeError(ValueError):
    """A weight or model cannot be quantized as asked."""


def requantized(weight: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    """``value`` quantized the way ``weight`` is (for merging into a quantized base)."""
    kind = quantization(weight)
    if kind not in QUANTIZATIONS:
        raise QuantizeError(f"cannot re-quantize a {kind} weight; load the base unquantized to merge into it")
    return nn.Parameter(quantizer(kind)(value.to(torch.bfloat16)), requires_grad=False)


NF4_BLOCK = 64  # weights per NF4 scale
NF4_SCALER_BLOCK = 256  # scales per second-level (double quantization) scale, at most


def _to_nf4(weight: torch.Tensor):
    from torchao.quantization import to_nf4

    # torchao needs the number of scales to divide into second-level blocks; SmolLM2's
    # 576 x 576 has 5184 scales, so take the largest block size <= 256 that divides them.
    scales = weight.numel() // NF4_BLOCK
    scaler_block = next(size for size in range(NF4_SCALER_BLOCK, 0, -1) if scales % size == 0)
    return to_nf4(weight, NF4_BLOCK, scaler_block)


def quantizable(weight: torch.Tensor, method: str) -> bool:
    return method != "nf4" or weight.numel() % NF4_BLOCK == 0


def quantizer(method: str):
    if method == "nf4":
        return _to_nf4
    from torchao.quantization import Int8Tensor, PerRow

    return lambda weight: Int8Tensor.from_hp(weight, PerRow())

"""The one base computation (frozen.py) against dense math, for plain and quantized weights."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import frozen
from lorakit.frozen import quantizer

torch.manual_seed(0)


def test_plain_weights_compute_exactly_the_dense_formula():
    W, b, x = torch.randn(12, 16), torch.randn(12), torch.randn(3, 5, 16)
    assert torch.equal(frozen.linear(x, W, b), F.linear(x, W, b))
    assert torch.equal(frozen.linear(x, W.T.contiguous(), b, transposed=True),
                       torch.addmm(b, x.reshape(-1, 16), W.T.contiguous()).view(3, 5, 12))
    assert frozen.quantization(W) is None and frozen.nbytes(W) == 12 * 16 * 4


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_linear_is_the_dense_product_of_its_dequantized_weight(method):
    """Within bfloat16 arithmetic: |y - x dense(Q)^T| <= 2^-7 (|x| |dense(Q)|^T) elementwise,
    the bound of rounding the inputs (2^-9 each) and the output (2^-9) of a bf16 product."""
    W = torch.randn(128, 256) / 16
    Q = quantizer(method)(W.bfloat16())
    x = torch.randn(4, 7, 256).bfloat16()
    y = frozen.linear(x, Q, None)
    assert y.dtype == torch.bfloat16 and frozen.quantization(Q) == method
    dense = frozen.dense(Q)
    reference = x.float() @ dense.T
    bound = 2 ** -7 * (x.float().abs() @ dense.abs().T) + 1e-6
    assert ((y.float() - reference).abs() <= bound).all()


def test_nf4_error_is_within_half_the_widest_code_gap_of_each_block():
    """NF4 rounds w / absmax(block) to the nearest of 16 codes in [-1, 1]; the widest gap
    between codes is 1 - 0.6962 = 0.3038 (the bottom two), so no weight moves by more
    than 0.1519 x its block's absmax, plus at most 1 % of the absmax for the 8-bit
    second-level quantization of that absmax and the bfloat16 rounding of the result."""
    W = torch.randn(64, 512).bfloat16()
    Q = quantizer("nf4")(W)
    error = (frozen.dense(Q) - W.float()).abs().view(-1, 64)
    absmax = W.float().abs().view(-1, 64).amax(dim=1, keepdim=True)
    assert (error <= (0.1519 + 0.01) * absmax).all()
    assert error.max() > 0.05 * absmax.max()  # and it is a 4-bit code, not a copy


def test_int8_error_is_within_half_a_step_of_each_row():
    W = torch.randn(64, 512).bfloat16()
    Q = quantizer("int8")(W)
    error = (frozen.dense(Q) - W.float()).abs()
    step = W.float().abs().amax(dim=1, keepdim=True) / 127
    assert (error <= 0.5 * step * 1.01 + 1e-6).all()


def test_real_bytes_count_the_inner_tensors():
    W = torch.randn(256, 512).bfloat16()
    nf4, int8 = quantizer("nf4")(W), quantizer("int8")(W)
    # 4 bits per weight plus 8-bit scales per 64 and a few float32 second-level scales
    assert 256 * 512 // 2 < frozen.nbytes(nf4) < 0.27 * W.numel() * 2
    # one byte per weight plus a scale (and zero point) per row
    assert 256 * 512 < frozen.nbytes(int8) <= 256 * 512 + 256 * 8

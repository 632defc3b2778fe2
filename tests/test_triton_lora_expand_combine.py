"""Triton `lora_expand_combine` / its backward against the float64 reference ops (interpreter, CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from test_triton_common import assert_close, make_routing, requires_interpreter  # noqa: E402

from mixlora_kernels.triton.lora_expand_combine import (  # noqa: E402
    lora_expand_combine_backward, lora_expand_combine_forward)

pytestmark = requires_interpreter

# Forward: 64 tokens a block, experts folded E x next_pow2(R) wide (chunks of <= 128, >= 16). Backward: 32 rows.
CASES = [
    # T, H, E, K, R, routing
    (1, 33, 4, 2, 8, "random"),     # T=1; odd H; fold 4 x 8 = 32
    (10, 45, 5, 2, 16, "empty"),    # T below the block size; prime E: fold 80 padded to 128; an expert with no tokens
    (70, 32, 3, 3, 16, "random"),   # K=E; T above one 64-row block (and two 32-row ones)
    (20, 40, 4, 1, 64, "one"),      # K=1 with every token on expert 0; R=64: fold in 2 chunks
    (9, 20, 2, 2, 4, "random"),     # R=4, E=2: fold 8 padded to 16 (padding experts)
]


def _inputs(T, H, E, K, R, mode, dtype, noncontig=False):
    gen = torch.Generator().manual_seed(T * 1000 + H)
    experts, order, offsets = make_routing(T, E, K, mode, gen)
    zd = torch.randn(T * K, R + 2 if noncontig else R, generator=gen).to(dtype)
    B = (torch.randn(E, H, R + 2 if noncontig else R, generator=gen) / R**0.5).to(dtype)
    weights = torch.softmax(torch.randn(T, K + 1 if noncontig else K, generator=gen), -1).to(dtype)
    if noncontig:  # column slices: strides differ from the logical widths
        zd, B, weights = zd[:, :R], B[:, :, 1:R + 1], weights[:, 1:]
    gy = torch.randn(T, H, generator=gen).to(dtype)
    return zd, B, weights, gy, experts, order, offsets


def _ref(zd, B, weights, gy, experts, order, offsets, dtype, scale=2.0):
    args = (zd.to(dtype), B.to(dtype), weights.to(dtype), experts, order, offsets, scale)
    y = torch.ops.mixlora.lora_expand_combine(*args)
    return (y,) + tuple(torch.ops.mixlora.lora_expand_combine_backward(gy.to(dtype), *args))


@pytest.mark.parametrize("T,H,E,K,R,mode", CASES)
def test_lora_expand_combine_fp32(T, H, E, K, R, mode):
    torch.manual_seed(0)
    zd, B, weights, gy, experts, order, offsets = _inputs(T, H, E, K, R, mode, torch.float32)
    y = lora_expand_combine_forward(zd, B, weights, experts, order, offsets, 2.0)
    grads = lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0)
    ref = _ref(zd, B, weights, gy, experts, order, offsets, torch.float64)
    for name, out, r in zip(("y", "dzd", "dB", "dweights"), (y,) + grads, ref):
        assert out.dtype == torch.float32, name
        assert_close(out, r, name=name)


# bf16 everywhere (zd too) on non-contiguous column slices: the stride path and the 16-bit dot in the backward.
def test_lora_expand_combine_bf16_noncontiguous():
    torch.manual_seed(0)
    zd, B, weights, gy, experts, order, offsets = _inputs(12, 33, 5, 2, 8, "random", torch.bfloat16, True)
    assert not (zd.is_contiguous() or B.is_contiguous() or weights.is_contiguous())
    y = lora_expand_combine_forward(zd, B, weights, experts, order, offsets, 2.0)
    grads = lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0)
    ref = _ref(zd, B, weights, gy, experts, order, offsets, torch.float64)
    low = _ref(zd, B, weights, gy, experts, order, offsets, torch.bfloat16)
    assert_close(y, ref[0], low[0], name="y", mma=torch.bfloat16)  # fp32 from bf16 MMA operands
    for name, out, r, lo in zip(("dzd", "dB", "dweights"), grads, ref[1:], low[1:]):
        assert out.dtype == torch.bfloat16, name
        assert_close(out, r, lo, name=name)


# Rank 0: zeros without launching.
def test_lora_expand_combine_rank0():
    zd, B, weights, gy, experts, order, offsets = _inputs(5, 16, 3, 2, 0, "random", torch.float32)
    y = lora_expand_combine_forward(zd, B, weights, experts, order, offsets, 2.0)
    assert y.shape == (5, 16) and not y.any()
    dzd, dB, dw = lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0)
    assert dzd.shape == zd.shape and dB.shape == B.shape and not dw.any()


# As the MoE layer calls it in a bf16 model: bf16 B and weights, fp32 zd (from expand_act_combine) and fp32 grad_y
# (the bf16 output's gradient upcast, so bf16-exact); y and dzd are fp32 from bf16 MMA operands. 70 tokens: two
# 64-row forward blocks; E 8 x R 16 = one 128-wide fold.
def test_lora_expand_combine_bf16_model():
    torch.manual_seed(0)
    zd, B, weights, gy, experts, order, offsets = _inputs(70, 40, 8, 2, 16, "random", torch.bfloat16)
    zd = torch.randn(zd.shape, generator=torch.Generator().manual_seed(3))
    gy = gy.float()
    y = lora_expand_combine_forward(zd, B, weights, experts, order, offsets, 2.0)
    grads = lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0)
    ref = _ref(zd, B, weights, gy, experts, order, offsets, torch.float64)
    low = (torch.ops.mixlora.lora_expand_combine(zd, B, weights, experts, order, offsets, 2.0),) + tuple(
        torch.ops.mixlora.lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0))
    for name, out, r, lo in zip(("y", "dzd", "dB", "dweights"), (y,) + grads, ref, low):
        assert out.dtype == lo.dtype, name
        assert_close(out, r, lo, name=name, mma=torch.bfloat16)

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

CASES = [
    # T, H, E, K, R, routing
    (1, 33, 4, 2, 8, "random"),     # T=1; odd H; R=8 padded to 16 for tl.dot
    (10, 45, 5, 2, 16, "empty"),    # T below the block size; prime E; odd H; an expert with no tokens
    (40, 32, 3, 3, 16, "random"),   # K=E; T above one 32-row block
    (20, 40, 4, 1, 64, "one"),      # K=1 with every token on expert 0; R=64
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
    assert_close(y, ref[0], name="y")  # y is fp32 for every input dtype
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

"""Triton `lora_expand_combine` / its backward against the float64 reference ops (interpreter, CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from backend_checks import assert_tolerance, mma_operands, reference, rounded_to  # noqa: E402
from test_triton_common import make_routing, requires_interpreter  # noqa: E402

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


def _ref(zd, B, weights, gy, experts, order, offsets, dtype=None, scale=2.0, mma=None):
    """(y, dzd, dB, dweights) of the reference, the float inputs in `dtype` (None: as given, for ref_same); mma: the
    kernels' 16-bit MMA operand dtype (fp32 operands rounded to it, see test_triton_common).

    For ref_same (dtype None) y is the reference on the forward kernel's own MMA operands: it folds each slot's
    routing weight into its rank vector, zw_j = w_j·zd_j in fp32, and one dot does the K expands and the combine; so
    the reference gets zd·w and weights 1 (the rule's input, not a looser rule)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    args = (cast(zd), cast(B), cast(weights), experts, order, offsets, scale)
    fwd_args = args
    if dtype is None:
        zw = weights.reshape(-1, 1).float() * zd.float()
        fwd_args = (zw, B, torch.ones_like(weights, dtype=torch.float32), experts, order, offsets, scale)
    with mma_operands(rounded_to(mma) if mma else None):
        y = reference("lora_expand_combine")(*fwd_args)
        return (y,) + tuple(reference("lora_expand_combine_backward")(cast(gy), *args))


@pytest.mark.parametrize("T,H,E,K,R,mode", CASES)
def test_lora_expand_combine_fp32(T, H, E, K, R, mode):
    torch.manual_seed(0)
    zd, B, weights, gy, experts, order, offsets = _inputs(T, H, E, K, R, mode, torch.float32)
    y = lora_expand_combine_forward(zd, B, weights, experts, order, offsets, 2.0)
    grads = lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0)
    ref = _ref(zd, B, weights, gy, experts, order, offsets, torch.float64)
    same = _ref(zd, B, weights, gy, experts, order, offsets)
    for name, out, r, s in zip(("y", "dzd", "dB", "dweights"), (y,) + grads, ref, same, strict=True):
        assert out.dtype == torch.float32, name
        assert_tolerance(out, s, r, name)


# bf16 everywhere (zd too) on non-contiguous column slices: the stride path and the 16-bit dot in the backward.
def test_lora_expand_combine_bf16_noncontiguous():
    torch.manual_seed(0)
    zd, B, weights, gy, experts, order, offsets = _inputs(12, 33, 5, 2, 8, "random", torch.bfloat16, True)
    assert not (zd.is_contiguous() or B.is_contiguous() or weights.is_contiguous())
    y = lora_expand_combine_forward(zd, B, weights, experts, order, offsets, 2.0)
    grads = lora_expand_combine_backward(gy, zd, B, weights, experts, order, offsets, 2.0)
    ref = _ref(zd, B, weights, gy, experts, order, offsets, torch.float64)
    same = _ref(zd, B, weights, gy, experts, order, offsets, mma=torch.bfloat16)
    assert y.dtype == torch.float32  # fp32 from bf16 MMA operands
    for name, out, r, s in zip(("y", "dzd", "dB", "dweights"), (y,) + grads, ref, same, strict=True):
        assert out.dtype == torch.bfloat16 or name == "y", name
        assert_tolerance(out, s, r, name)


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
    same = _ref(zd, B, weights, gy, experts, order, offsets, mma=torch.bfloat16)
    for name, out, r, s in zip(("y", "dzd", "dB", "dweights"), (y,) + grads, ref, same, strict=True):
        assert_tolerance(out, s, r, name)

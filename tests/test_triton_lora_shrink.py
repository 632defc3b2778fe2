"""Triton `lora_shrink` / `lora_shrink_backward` launchers against the float64 reference ops (interpreter, CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from backend_checks import assert_tolerance, mma_operands, reference, rounded_to  # noqa: E402
from test_triton_common import make_routing, requires_interpreter  # noqa: E402

from mixlora_kernels.triton.lora_shrink import lora_shrink_backward, lora_shrink_forward  # noqa: E402

pytestmark = requires_interpreter

CASES = [
    # T, H, E, K, R, routing, dropout_p
    (1, 33, 4, 2, 8, "random", 0.0),     # T=1; odd H; R=8 padded to 16 for tl.dot
    (10, 45, 5, 2, 16, "empty", 0.0),    # T below the block size; prime E; odd H; an expert with no tokens
    (70, 32, 3, 3, 16, "random", 0.25),  # K=E; T above one 64-row block; dropout mask must match the reference
    (20, 40, 4, 1, 64, "one", 0.0),      # K=1 with every token on expert 0; R=64 (dx fold 256: one chunk)
    (9, 40, 8, 2, 64, "random", 0.1),    # dx fold 512 in 2 chunks; dropout: one folded dot per slot k
]
# dx folds the experts E x next_pow2(R) wide (chunks of <= 256, >= 16): R=8 x E=4 is 32, prime E=5 pads 80 to 128.


def _inputs(T, H, E, K, R, mode, dtype, noncontig):
    gen = torch.Generator().manual_seed(T * 1000 + H)
    experts, order, offsets = make_routing(T, E, K, mode, gen)
    x = torch.randn(T, H + 3 if noncontig else H, generator=gen).to(dtype)
    A = (torch.randn(E, R + 2 if noncontig else R, H, generator=gen) / H**0.5).to(dtype)
    if noncontig:  # column slices: row strides differ from the logical widths
        x, A = x[:, 1:H + 1], A[:, :R]
    gz = torch.randn(T * K, R, generator=gen)
    return x, A, gz, experts, order, offsets


def _ref(x, A, gz, experts, order, offsets, p, seed, dtype, mma=None):
    """(z, dx, dA) of the reference with x, A in `dtype`; mma: the kernels' 16-bit MMA operand dtype (the fp32
    grad_z is rounded to it, see test_triton_common)."""
    with mma_operands(rounded_to(mma) if mma else None):
        z = reference("lora_shrink")(x.to(dtype), A.to(dtype), experts, order, offsets, p, seed)
        dx, dA = reference("lora_shrink_backward")(gz.to(z.dtype), x.to(dtype), A.to(dtype), experts, order,
                                                   offsets, p, seed)
    return z, dx, dA


@pytest.mark.parametrize("T,H,E,K,R,mode,p", CASES)
def test_lora_shrink_fp32(T, H, E, K, R, mode, p):
    torch.manual_seed(0)
    x, A, gz, experts, order, offsets = _inputs(T, H, E, K, R, mode, torch.float32, noncontig=False)
    z = lora_shrink_forward(x, A, experts, order, offsets, p, 7)
    dx, dA = lora_shrink_backward(gz, x, A, experts, order, offsets, p, 7)
    assert z.dtype == torch.float32 and dx.dtype == x.dtype and dA.dtype == A.dtype
    ref = _ref(x, A, gz, experts, order, offsets, p, 7, torch.float64)
    same = _ref(x, A, gz, experts, order, offsets, p, 7, torch.float32)
    for name, out, r, s in zip(("z", "dx", "dA"), (z, dx, dA), ref, same, strict=True):
        assert_tolerance(out, s, r, name)


# 16-bit with dropout on non-contiguous views (x and A are column slices): the stride path and the 16-bit dot.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_shrink_16bit_noncontiguous_dropout(dtype):
    torch.manual_seed(0)
    x, A, gz, experts, order, offsets = _inputs(12, 33, 5, 2, 8, "random", dtype, noncontig=True)
    assert not x.is_contiguous() and not A.is_contiguous()
    z = lora_shrink_forward(x, A, experts, order, offsets, 0.3, 99)
    dx, dA = lora_shrink_backward(gz, x, A, experts, order, offsets, 0.3, 99)
    ref = _ref(x, A, gz, experts, order, offsets, 0.3, 99, torch.float64)
    same = _ref(x, A, gz, experts, order, offsets, 0.3, 99, dtype, mma=dtype)
    assert z.dtype == torch.float32  # z is fp32 for every input dtype
    for name, out, r, s in zip(("z", "dx", "dA"), (z, dx, dA), ref, same, strict=True):
        assert_tolerance(out, s, r, name)


# Rank 0 (a projection without expert LoRA) returns zeros without launching.
def test_lora_shrink_rank0():
    x, A, gz, experts, order, offsets = _inputs(5, 16, 3, 2, 0, "random", torch.float32, noncontig=False)
    assert lora_shrink_forward(x, A, experts, order, offsets, 0.0, 0).shape == (10, 0)
    dx, dA = lora_shrink_backward(gz, x, A, experts, order, offsets, 0.0, 0)
    assert dx.shape == x.shape and not dx.any() and dA.shape == A.shape


def test_lora_shrink_rejects_bad_input():
    x, A, gz, experts, order, offsets = _inputs(5, 16, 3, 2, 8, "random", torch.float32, noncontig=False)
    with pytest.raises(ValueError, match="A must have shape"):
        lora_shrink_forward(x, A[:, :, :8], experts, order, offsets, 0.0, 0)
    with pytest.raises(ValueError, match="Triton kernels support"):
        lora_shrink_forward(x.double(), A.double(), experts, order, offsets, 0.0, 0)

"""Pieces shared by the Triton launchers: dot precision, input checks, activations, the dropout hash, expert blocks.

Every kernel accumulates in fp32. Matmul operands that are both 16-bit of one dtype go to `tl.dot` as they are;
anything involving fp32 (the rank-R shrinks z are fp32 by contract) is multiplied in fp32 with `FP32_DOT`, so results
stay at fp32 accuracy rather than TF32's 10-bit mantissa.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check

# 3xTF32 keeps fp32 accuracy on tensor cores; "ieee" would fall back to FMA units (unmeasured: no GPU this session).
FP32_DOT: tl.constexpr = tl.constexpr("tf32x3")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def check_supported(op: str, *named: tuple[str, torch.Tensor | None]) -> None:
    """Triton-side checks the references do not need: same device for every tensor and a kernel-supported dtype."""
    device = None
    for name, t in named:
        if t is None:
            continue
        if device is None:
            device = t.device
        check(t.device == device, op, f"{name} is on {t.device} but the first tensor is on {device}")
        if t.is_floating_point():
            check(t.dtype in SUPPORTED_DTYPES, op,
                  f"{name} has dtype {t.dtype}; the Triton kernels support {SUPPORTED_DTYPES} "
                  "(for fp64 on CUDA use MIXLORA_BACKEND=torch)")


def dot_dtype(*tensors: torch.Tensor):
    """Operand dtype for `tl.dot` between these tensors: their common 16-bit dtype, else fp32.

    Under the Triton 3.8 interpreter a bf16 `tl.dot` multiplies the raw uint16 storage as integers, so bf16 operands
    are widened to fp32 there; that is exact (bf16 -> fp32 and products of bf16 values are exact in fp32) and only
    changes the accumulation order, which is fp32 either way.
    """
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or torch.float32 in dtypes:
        return tl.float32
    dtype = dtypes.pop()
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_block(n: int) -> int:
    """Tile size covering a rank (or other small) dimension n in one piece; at least 16 because of `tl.dot`."""
    return max(16, triton.next_power_of_2(n))


def dropout_threshold(p: float) -> int:
    """floor(p * 2**32): an element is kept when its 32-bit hash is >= this (see ops._common.dropout_scale)."""
    return int(p * 2**32)


def num_expert_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Grid size for `expert_block`: cdiv(S, block_m) + E bounds the number of expert-homogeneous row blocks (each
    expert adds at most one partial block); the host never reads the routing."""
    return triton.cdiv(num_slots, block_m) + num_experts


@triton.jit
def expert_block(pid, offsets_ptr, E, BLOCK_M: tl.constexpr):
    """(expert, first sorted position) of row block `pid` when every expert's segment of the sorted slot order is cut
    into BLOCK_M-row blocks and the blocks are numbered expert by expert; expert E means a spare block.

    Scans offsets (E + 1 cached scalars) in the program instead of building a block table with extra launches.
    """
    # Loop-carried values start as tensors of their final dtypes (a plain int would change type in the loop).
    expert = tl.cast(E, tl.int32)
    start = tl.load(offsets_ptr)
    first = tl.cast(0, tl.int64)
    for e in range(E):
        lo = tl.load(offsets_ptr + e)
        n = tl.cdiv(tl.load(offsets_ptr + e + 1) - lo, BLOCK_M)
        hit = (pid >= first) & (pid < first + n)
        expert = tl.where(hit, e, expert)
        start = tl.where(hit, lo + (pid - first) * BLOCK_M, start)
        first += n
    return expert, start


@triton.jit
def dropout_keep(slots, cols, n_cols, seed, threshold):
    """Keep-mask of elements (slots[:, None], cols[None, :]) of an (S, n_cols) slot matrix; same hash as the reference.

    All arithmetic is mod 2**32: (slot * n_cols + col) mod 2**32, XOR seed, two multiply-xorshift rounds.
    """
    # tl.cast (not .to) because Triton specialises an int argument equal to 1 into a constexpr (seed=1, H=1).
    x = slots.to(tl.uint32)[:, None] * tl.cast(n_cols, tl.uint32) + cols.to(tl.uint32)[None, :]
    x = x ^ tl.cast(seed, tl.uint32)
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = (x >> 16) ^ x
    return x.to(tl.int64) >= threshold


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates correctly at both ends; no libdevice so it also runs in the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    if ACT == "silu":
        out = g * tl.sigmoid(g)
    elif ACT == "gelu":
        out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        out = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def act_grad(g, ACT: tl.constexpr):
    if ACT == "silu":
        sig = tl.sigmoid(g)
        out = sig * (1.0 + g * (1.0 - sig))
    elif ACT == "gelu":
        out = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476)) + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == "gelu_tanh":
        th = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        out = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        out = (g > 0.0).to(tl.float32)
    return out

"""Pieces shared by the Triton launchers: dot precision, activations, the dropout hash, the expert block table.

Every kernel accumulates in fp32. Matmul operands that are both 16-bit of one dtype go to `tl.dot` as they are;
anything involving fp32 (the rank-R shrinks z are fp32 by contract) is multiplied in fp32 with `FP32_DOT`, so results
stay at fp32 accuracy rather than TF32's 10-bit mantissa.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixlora_kernels.ops._common import check

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
                  f"{name} has dtype {t.dtype}; the Triton kernels support {SUPPORTED_DTYPES} (fp64 uses the reference)")


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


def expert_blocks(offsets: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tile the expert-sorted slot order into row blocks that never straddle two experts, on device (no sync).

    Returns (block_expert (NB,) int32, block_start (NB,) int64, NB) where NB = cdiv(S, block_m) + E is an upper bound
    on the number of blocks (each expert adds at most one partial block); spare blocks get expert id E and exit.
    """
    E = offsets.numel() - 1
    nb = triton.cdiv(num_slots, block_m) + E
    counts = offsets[1:] - offsets[:-1]
    blocks = (counts + block_m - 1) // block_m
    last = torch.cumsum(blocks, 0)
    b = torch.arange(nb, device=offsets.device)
    expert = torch.searchsorted(last, b, right=True)
    e = expert.clamp(max=E - 1)
    start = offsets[e] + (b - (last - blocks)[e]) * block_m
    return expert.to(torch.int32), start, nb


@triton.jit
def dropout_keep(slots, cols, n_cols, seed, threshold):
    """Keep-mask of elements (slots[:, None], cols[None, :]) of an (S, n_cols) slot matrix; same hash as the reference.

    All arithmetic is mod 2**32: (slot * n_cols + col) mod 2**32, XOR seed, two multiply-xorshift rounds.
    """
    x = slots.to(tl.uint32)[:, None] * n_cols.to(tl.uint32) + cols.to(tl.uint32)[None, :]
    x = x ^ seed.to(tl.uint32)
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

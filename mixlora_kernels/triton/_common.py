"""Pieces shared by the Triton launchers: dot precision, input checks, activations, the dropout hash, expert blocks,
and the expert fold.

Every kernel accumulates in fp32. The MMA operand dtype follows the model (`mma_dtype`): a 16-bit model (weights and
activations of one 16-bit dtype) multiplies 16-bit operands on the tensor cores, the fp32 rank-R tensors of its
pipeline (z, zd, their gradients, which are fp32 by contract) and fp32 intermediates (h, dg, du) rounded to that dtype
first, as a plain bf16 LoRA (PEFT) rounds its own; an fp32 model keeps fp32 operands with `FP32_DOT`, so its results
stay at fp32 accuracy rather than TF32's 10-bit mantissa.

Expert fold (rows of mixed experts, one MMA for all experts): a slot row j of expert e_j becomes a row of width
EPC * BLOCK_R with its rank-R vector in the block of its expert and zeros elsewhere (`fold_rows`); the LoRA weights of
EPC experts stacked along the rank, a (EPC * BLOCK_R, BLOCK_N) slab (`fold_slab`), make one dot of reduction depth
EPC * BLOCK_R do every expert's product, and `unfold_rows` picks each row's own block out of a wide product.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check

# 3xTF32 keeps fp32 accuracy on tensor cores; "ieee" would fall back to FMA units (unmeasured: no GPU this session).
FP32_DOT: tl.constexpr = tl.constexpr("tf32x3")
# Under the Triton 3.8 interpreter a bf16 `tl.dot` multiplies the raw uint16 storage as integers and an fp32 -> bf16
# cast truncates: `round_to` rounds to nearest even there by hand and `mma_operand` widens the rounded operand back to
# fp32 (exact), so the interpreter sees the GPU's roundings.
INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# Widest expert fold: 128 = E 8 x R 16 (LLaMA-2-7B MixLoRA) in one dot; wider folds are cut into chunks so a row
# block's (rows x fold) fp32 accumulators stay within the register file (R 64 x E 8 would need 512 columns).
FOLD_WIDTH = 128

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


def mma_dtype(*model_tensors: torch.Tensor | None):
    """MMA operand dtype for a kernel whose model tensors (weights, activations; not the fp32-by-contract rank-R
    tensors) are these: their common 16-bit dtype, else fp32 (multiplied with `FP32_DOT`)."""
    dtypes = {t.dtype for t in model_tensors if t is not None}
    if len(dtypes) != 1 or torch.float32 in dtypes:
        return tl.float32
    return _TL_DTYPES[dtypes.pop()]


@triton.jit
def round_to(x, DT: tl.constexpr):
    """x.to(DT), rounding to nearest even (the GPU's default) also under the interpreter."""
    if INTERPRET and DT == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        y = b.to(tl.float32, bitcast=True).to(DT)
    else:
        y = x.to(DT)
    return y


@triton.jit
def mma_operand(x, DT: tl.constexpr):
    """x rounded to the MMA operand dtype DT (see INTERPRET for the interpreter's widening)."""
    y = round_to(x, DT)
    if INTERPRET:
        y = y.to(tl.float32)
    return y


def expert_fold(E: int, R: int, width: int = FOLD_WIDTH) -> dict:
    """Fold constexprs for E experts of rank R: BLOCK_R (rank padded to a power of two), EPC (experts per chunk) and
    N_CHUNKS; a chunk is EPC * BLOCK_R >= 16 wide (tl.dot), at most `width` unless one expert is wider."""
    block_r = triton.next_power_of_2(max(R, 1))
    epc = max(min(triton.next_power_of_2(E), max(1, width // block_r)), triton.cdiv(16, block_r))
    return dict(BLOCK_R=block_r, EPC=epc, N_CHUNKS=triton.cdiv(E, epc))


@triton.jit
def fold_rows(z_ptr, rows, e_row, s_zs, s_zr, R, e0, EPC: tl.constexpr, BLOCK_R: tl.constexpr):
    """(ROWS, EPC * BLOCK_R): row j holds z[rows[j], :R] in the block of its expert e_row[j] when that expert is one
    of e0 .. e0 + EPC - 1, zeros elsewhere (e_row = -1 marks an invalid row). rows are int64 slot ids."""
    c = tl.arange(0, EPC * BLOCK_R)
    r = c % BLOCK_R
    hit = (e_row[:, None] == e0 + c[None, :] // BLOCK_R) & (r < R)[None, :]
    return tl.load(z_ptr + rows[:, None] * s_zs + r[None, :] * s_zr, mask=hit, other=0.0)


@triton.jit
def fold_slab(ptr, e0, n, n_ok, R, E, s_e, s_n, s_r, EPC: tl.constexpr, BLOCK_R: tl.constexpr):
    """(EPC * BLOCK_R, BLOCK_N) slab: row e_local * BLOCK_R + r is W[e0 + e_local, n, r] of a weight W indexed
    (expert, n, rank) through strides (s_e, s_n, s_r); zero for padding ranks and experts >= E."""
    c = tl.arange(0, EPC * BLOCK_R)
    e = e0 + c // BLOCK_R
    r = c % BLOCK_R
    ok = (e < E) & (r < R)
    return tl.load(ptr + e[:, None] * s_e + r[:, None] * s_r + n[None, :] * s_n, mask=ok[:, None] & n_ok[None, :],
                   other=0.0)


@triton.jit
def unfold_rows(wide, e_row, e0, EPC: tl.constexpr, BLOCK_R: tl.constexpr):
    """(ROWS, EPC * BLOCK_R) -> (ROWS, BLOCK_R): each row's own expert block (zeros when it is not in this chunk)."""
    c = tl.arange(0, EPC * BLOCK_R)
    x = tl.where(e_row[:, None] == e0 + c[None, :] // BLOCK_R, wide, 0.0)
    return tl.sum(tl.reshape(x, (wide.shape[0], EPC, BLOCK_R)), axis=1)


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
    # threshold = floor(p * 2**32) < 2**32 for p < 1: a 32-bit compare (a 64-bit one doubles the mask's registers)
    return x >= tl.cast(threshold, tl.uint32)


@triton.jit
def _sigmoid(x):
    """1 / (1 + 2^(-x log2 e)) on the special-function unit: ex2.approx.ftz (2 ulp) and rcp.approx.ftz (1 ulp), four
    instructions per element where tl.sigmoid's exp and full-range division take eleven (a third of the
    expand_act_combine forward loop on sm_90). Saturates to 0 and 1: 2^(+large) is +inf and its reciprocal 0."""
    if INTERPRET:
        out = 1.0 / (1.0 + tl.exp(-x))
    else:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * -1.4426950408889634],
                                      dtype=tl.float32, is_pure=True, pack=1)
        out = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def _tanh(x):
    # 1 - 2 sigmoid(-2x) = 1 - 2 / (exp(2x) + 1): saturates correctly at both ends; no libdevice so it also runs in
    # the interpreter.
    return 1.0 - 2.0 * _sigmoid(-2.0 * x)


@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    if ACT == "silu":
        out = g * _sigmoid(g)
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
        sig = _sigmoid(g)
        out = sig * (1.0 + g * (1.0 - sig))
    elif ACT == "gelu":
        out = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476)) + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == "gelu_tanh":
        th = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        out = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        out = (g > 0.0).to(tl.float32)
    return out

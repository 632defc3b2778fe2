"""Triton launchers for `mixlora::lora_shrink` and `mixlora::lora_shrink_backward` (same arguments and results).

Strides are passed to the kernels, so x and A may be non-contiguous views; grad_z is read through its strides too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check_lora_shrink
from mixlora_kernels.checks import check
from mixlora_kernels.triton._common import (FP32_DOT, check_supported, dot_block, dropout_keep, dropout_threshold,
                                            expert_block, expert_fold, fold_rows, fold_slab, mma_dtype, mma_operand,
                                            num_expert_blocks, round_to)

# Row block over expert-sorted slots / tokens and column block over H. Untuned (no GPU this session): 64 x 64 tiles
# with R <= 64 keep the fp32 accumulators small; the H loop streams x.
_BLOCK_M = 64
_BLOCK_H = 64
# The dx role's fold width: predicted (benchmarks/sm90_cost, LLaMA-2-7B T 4096, R = 16 + 16) 0.052 / 0.099 ms without
# / with dropout at 32 (one expert per dot), 0.063 / 0.149 at 64, 0.116 / 0.177 at 128, 0.175 at 256 (255 registers):
# a wider fold loads more masked rows per tile than it saves in MMA issue.
_FOLD_WIDTH = 32


@triton.jit
def _lora_shrink_fwd_kernel(
        x_ptr, a_ptr, z_ptr, order_ptr, offsets_ptr,
        H, R, K, E, stride_xt, stride_xh, stride_ae, stride_ar, stride_ah, seed, threshold, keep_scale,
        HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[order[p]] = A_e drop(x[order[p] // K]) for one expert-homogeneous block of sorted positions p."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    e, start = expert_block(pid_m, offsets_ptr, E, BLOCK_M)
    if e >= E:
        return
    end = tl.load(offsets_ptr + e + 1)
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    slots = tl.load(order_ptr + pos, mask=row_ok, other=0)
    tokens = slots // K
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        xt = tl.load(x_ptr + tokens[:, None] * stride_xt + h[None, :] * stride_xh,
                     mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(dropout_keep(slots, h, H, seed, threshold), xt, 0.0)
        at = tl.load(a_ptr + e * stride_ae + r[:, None] * stride_ar + h[None, :] * stride_ah,
                     mask=r_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(mma_operand(xt, DOT_DTYPE), tl.trans(mma_operand(at, DOT_DTYPE)), acc, input_precision=FP32_DOT)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(z_ptr + slots[:, None] * R + r[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_shrink_bwd_kernel(
        gz_ptr, x_ptr, a_ptr, experts_ptr, order_ptr, offsets_ptr, dx_ptr, da_ptr,
        T, H, R, K, E, stride_gs, stride_gr, stride_xt, stride_xh, stride_ae, stride_ar, stride_ah,
        stride_et, stride_ek, seed, threshold, keep_scale,
        HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr, FOLD_R: tl.constexpr, EPC: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Two roles by program id (one launch): programs [0, cdiv(T, BLOCK_M)) along axis 0 compute dx token-major,
    the remaining E programs compute dA_e (one expert each) by a segmented reduction; axis 1 tiles H in both.

    dx_t = sum_k drop_j(A_e^T dz_j) through the expert fold (see `_common`, FOLD_R / EPC / N_CHUNKS): without dropout
    the K slots of a token fill their experts' blocks of one row and one dot per chunk of experts does them all
    (dx = dz_cat A_cat); with dropout (a mask per slot) one folded dot per slot k and chunk. No atomics, no (S, H)
    scratch. dA_e = sum_{j->e} dz_j drop_j(x_t)^T over e's slots, in sorted order, accumulated transposed so the
    MMA's M is the 64-wide H tile.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_tok_blocks = tl.cdiv(T, BLOCK_M)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    if pid_m < n_tok_blocks:
        t = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        t_ok = t < T
        dx = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for ch in tl.static_range(N_CHUNKS):
            slab = mma_operand(fold_slab(a_ptr, ch * EPC, h, h_ok, R, E, stride_ae, stride_ah, stride_ar, EPC,
                                         FOLD_R), DOT_DTYPE)
            if HAS_DROPOUT:
                for k in range(K):
                    ek = tl.load(experts_ptr + t * stride_et + k * stride_ek, mask=t_ok, other=-1)
                    zw = fold_rows(gz_ptr, t * K + k, ek, stride_gs, stride_gr, R, ch * EPC, EPC, FOLD_R)
                    part = tl.dot(mma_operand(zw, DOT_DTYPE), slab, input_precision=FP32_DOT)
                    dx += tl.where(dropout_keep(t * K + k, h, H, seed, threshold), part * keep_scale, 0.0)
            else:
                zw = tl.zeros((BLOCK_M, EPC * FOLD_R), dtype=tl.float32)
                for k in range(K):  # the K experts of a token are distinct: their blocks do not overlap
                    ek = tl.load(experts_ptr + t * stride_et + k * stride_ek, mask=t_ok, other=-1)
                    zw += fold_rows(gz_ptr, t * K + k, ek, stride_gs, stride_gr, R, ch * EPC, EPC, FOLD_R)
                dx = tl.dot(mma_operand(zw, DOT_DTYPE), slab, dx, input_precision=FP32_DOT)
        tl.store(dx_ptr + t[:, None] * H + h[None, :], round_to(dx, dx_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & h_ok[None, :])
    else:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        e = pid_m - n_tok_blocks
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        dat = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_M):
            pos = p0 + tl.arange(0, BLOCK_M)
            row_ok = pos < end
            # 32-bit division (slot ids are < 2**31, checked by the launcher): 64-bit division is a slow path
            slots32 = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int32)
            slots = slots32.to(tl.int64)
            xt = tl.load(x_ptr + (slots32 // K).to(tl.int64)[:, None] * stride_xt + h[None, :] * stride_xh,
                         mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                xt = tl.where(dropout_keep(slots, h, H, seed, threshold), xt, 0.0)
            gz = tl.load(gz_ptr + slots[:, None] * stride_gs + r[None, :] * stride_gr,
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            dat = tl.dot(tl.trans(mma_operand(xt, DOT_DTYPE)), mma_operand(gz, DOT_DTYPE), dat,
                         input_precision=FP32_DOT)
        if HAS_DROPOUT:
            dat = dat * keep_scale
        tl.store(da_ptr + e * R * H + r[None, :] * H + h[:, None], round_to(dat, da_ptr.dtype.element_ty),
                 mask=r_ok[None, :] & h_ok[:, None])


def lora_shrink_forward(x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor, order: torch.Tensor,
                        offsets: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """Triton `mixlora::lora_shrink`: x (T, H), A (E, R, H) -> z (S, R) fp32, z_j = A_{e_j} drop_j(x_t).

    Grouped GEMM over the expert-sorted slot order; the token gather x[order[p] // K] and the dropout mask are fused
    into the x load. Grid: (expert-homogeneous row blocks, R tiles); each program loops over H.
    """
    check_lora_shrink(x, A, experts, order, offsets, dropout_p)
    check_supported("lora_shrink", ("x", x), ("A", A))
    H, (E, R, _) = x.shape[1], A.shape
    S = experts.numel()
    if S == 0 or R == 0 or H == 0:
        return torch.zeros(S, R, dtype=torch.float32, device=x.device)
    z = torch.empty(S, R, dtype=torch.float32, device=x.device)  # every slot is in exactly one expert block
    block_r = min(dot_block(R), 64)
    _lora_shrink_fwd_kernel[(num_expert_blocks(S, E, _BLOCK_M), triton.cdiv(R, block_r))](
        x, A, z, order, offsets, H, R, experts.shape[1], E,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
        seed & 0xFFFFFFFF, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0, DOT_DTYPE=mma_dtype(x, A),
        BLOCK_M=_BLOCK_M, BLOCK_R=block_r, BLOCK_H=_BLOCK_H)
    return z


def lora_shrink_backward(grad_z: torch.Tensor, x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor,
                         order: torch.Tensor, offsets: torch.Tensor, dropout_p: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `mixlora::lora_shrink_backward`: grad_z (S, R) -> (dx (T, H) like x, dA (E, R, H) like A).

    One launch, grid (cdiv(T, BLOCK_M) + E, cdiv(H, BLOCK_H)): token-major dx programs, then one dA program per
    (expert, H tile). Deterministic, no atomics.
    """
    check_lora_shrink(x, A, experts, order, offsets, dropout_p, grad_z)
    check_supported("lora_shrink_backward", ("grad_z", grad_z), ("x", x), ("A", A))
    (T, H), (E, R, _) = x.shape, A.shape
    dx = torch.empty(T, H, dtype=x.dtype, device=x.device)
    dA = torch.empty(E, R, H, dtype=A.dtype, device=A.device)
    if R == 0 or T == 0 or H == 0 or experts.shape[1] == 0:
        return dx.zero_(), dA.zero_()
    check(experts.numel() < 2**31, "lora_shrink_backward", f"T * K must be < 2**31, got {experts.numel()}")
    fold = expert_fold(E, R, _FOLD_WIDTH)
    _lora_shrink_bwd_kernel[(triton.cdiv(T, _BLOCK_M) + E, triton.cdiv(H, _BLOCK_H))](
        grad_z, x, A, experts, order, offsets, dx, dA, T, H, R, experts.shape[1], E,
        grad_z.stride(0), grad_z.stride(1), x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
        experts.stride(0), experts.stride(1), seed & 0xFFFFFFFF, dropout_threshold(dropout_p),
        1.0 / (1.0 - dropout_p), HAS_DROPOUT=dropout_p > 0, DOT_DTYPE=mma_dtype(x, A),
        BLOCK_M=_BLOCK_M, BLOCK_R=dot_block(R), BLOCK_H=_BLOCK_H, FOLD_R=fold["BLOCK_R"], EPC=fold["EPC"],
        N_CHUNKS=fold["N_CHUNKS"])
    return dx, dA

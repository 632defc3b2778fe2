"""Triton launchers for `mixlora::lora_expand_combine` and its backward (same arguments and results).

All inputs are read through their strides (non-contiguous views are fine); outputs are allocated contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check, check_lora_expand_combine
from mixlora_kernels.triton._common import (FP32_DOT, check_supported, dot_block, expert_block, expert_fold,
                                            fold_rows, fold_slab, mma_dtype, mma_operand, num_expert_blocks,
                                            round_to)

# Untuned (no GPU this session). Token / slot rows per program and the H tile. Forward: 128 tokens x 256 columns, two
# warpgroups of 64-row wgmma tiles; every program reads the whole (E * R, BLOCK_H) B slab and its tokens' folded zd,
# so larger tiles re-read less from L2: predicted (benchmarks/sm90_cost, LLaMA-2-7B T 16384) 0.113 ms against 0.215
# for 64 x 64 x 4 warps and 0.120 for 64 x 256 x 8 warps (237 registers, no spills).
_FWD = dict(BLOCK_M=128, BLOCK_H=256, num_warps=8)
_BLOCK_M = 64
_BLOCK_H = 64


@triton.jit
def _lora_expand_combine_fwd_kernel(
        zd_ptr, b_ptr, w_ptr, experts_ptr, y_ptr,
        T, H, R, K, E, scale, stride_zs, stride_zr, stride_be, stride_bh, stride_br, stride_wt, stride_wk,
        stride_et, stride_ek, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr, EPC: tl.constexpr, N_CHUNKS: tl.constexpr):
    """y[t, h-tile] = s Σ_k w_tk B_{e_tk}[h-tile] zd_{tK+k}, token-major: no atomics, no slot scratch.

    Expert fold (see `_common`): a token's row holds w_tk zd_{tK+k} in the block of expert e_tk for each of its K
    slots, so one dot against the all-expert B slab does the K expands and the combine (y = zw_cat B_catᵀ).
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < T
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for ch in tl.static_range(N_CHUNKS):
        zw = tl.zeros((BLOCK_M, EPC * BLOCK_R), dtype=tl.float32)
        for k in range(K):
            ek = tl.load(experts_ptr + t * stride_et + k * stride_ek, mask=t_ok, other=-1)
            wk = tl.load(w_ptr + t * stride_wt + k * stride_wk, mask=t_ok, other=0.0).to(tl.float32)
            z = fold_rows(zd_ptr, t * K + k, ek, stride_zs, stride_zr, R, ch * EPC, EPC, BLOCK_R)
            zw += wk[:, None] * z.to(tl.float32)
        slab = fold_slab(b_ptr, ch * EPC, h, h_ok, R, E, stride_be, stride_bh, stride_br, EPC, BLOCK_R)
        acc = tl.dot(mma_operand(zw, DT), mma_operand(slab, DT), acc, input_precision=FP32_DOT)
    tl.store(y_ptr + t[:, None] * H + h[None, :], acc * scale, mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def _slot_token(order_ptr, pos, ok, K):
    """(slot, token, k) of sorted positions pos as int64; the division in 32 bits (slot ids < 2**31, checked by the
    launcher), since a 64-bit one is a slow path in SASS."""
    slot = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int32)
    token = slot // K
    return slot.to(tl.int64), token.to(tl.int64), slot - token * K


@triton.jit
def _lora_expand_combine_bwd_kernel(
        gy_ptr, zd_ptr, b_ptr, w_ptr, order_ptr, offsets_ptr,
        dzd_ptr, db_ptr, dw_ptr, NB, H, R, K, E, scale,
        stride_gt, stride_gh, stride_zs, stride_zr, stride_be, stride_bh, stride_br, stride_wt, stride_wk,
        GB_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Two roles by program id. Programs [0, NB): one expert-homogeneous block of sorted slots each, looping over H:
    q_j = s B_e^T dy_t, dzd_j = w_j q_j, dw_j = <q_j, zd_j>. Programs NB + (e * cdiv(H, BLOCK_H) + h-tile):
    dB_e[h-tile] = s sum_{j->e} w_j dy_t zd_j^T, a deterministic segmented reduction over e's slots. Dots in B's
    dtype when it is 16-bit (dy, w dy and zd rounded to it), else fp32 (tf32x3)."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    if pid < NB:
        e, start = expert_block(pid, offsets_ptr, E, BLOCK_M)
        if e < E:  # spare blocks carry expert id E
            end = tl.load(offsets_ptr + e + 1)
            pos = start + tl.arange(0, BLOCK_M)
            row_ok = pos < end
            slots, tokens, ks = _slot_token(order_ptr, pos, row_ok, K)
            q = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                h_ok = h < H
                gy = tl.load(gy_ptr + tokens[:, None] * stride_gt + h[None, :] * stride_gh,
                             mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                b = tl.load(b_ptr + e * stride_be + h[:, None] * stride_bh + r[None, :] * stride_br,
                            mask=h_ok[:, None] & r_ok[None, :], other=0.0)
                q = tl.dot(mma_operand(gy, GB_DOT), mma_operand(b, GB_DOT), q, input_precision=FP32_DOT)
            q = q * scale
            w = tl.load(w_ptr + tokens * stride_wt + ks * stride_wk, mask=row_ok, other=0.0).to(tl.float32)
            z = tl.load(zd_ptr + slots[:, None] * stride_zs + r[None, :] * stride_zr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            tl.store(dzd_ptr + slots[:, None] * R + r[None, :], round_to(w[:, None] * q, dzd_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & r_ok[None, :])
            tl.store(dw_ptr + slots, round_to(tl.sum(q * z, axis=1), dw_ptr.dtype.element_ty), mask=row_ok)
    else:
        n_h = tl.cdiv(H, BLOCK_H)
        e = (pid - NB) // n_h
        h = ((pid - NB) % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < H
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_M):
            pos = p0 + tl.arange(0, BLOCK_M)
            row_ok = pos < end
            slots, tokens, ks = _slot_token(order_ptr, pos, row_ok, K)
            w = tl.load(w_ptr + tokens * stride_wt + ks * stride_wk, mask=row_ok, other=0.0)
            gy = tl.load(gy_ptr + tokens[:, None] * stride_gt + h[None, :] * stride_gh,
                         mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            z = tl.load(zd_ptr + slots[:, None] * stride_zs + r[None, :] * stride_zr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            wgy = w.to(tl.float32)[:, None] * gy.to(tl.float32)
            acc = tl.dot(tl.trans(mma_operand(wgy, GB_DOT)), mma_operand(z, GB_DOT), acc, input_precision=FP32_DOT)
        tl.store(db_ptr + e * H * R + h[:, None] * R + r[None, :], round_to(acc * scale, db_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & r_ok[None, :])


def _check(op, zd, B, weights, experts, order, offsets, grad_y=None):
    check_lora_expand_combine(zd, B, weights, experts, order, offsets, grad_y)
    check_supported(op, ("zd", zd), ("B", B), ("weights", weights), ("grad_y", grad_y))
    check(B.shape[2] <= 256, op, f"the Triton kernels support R <= 256, got {B.shape[2]}")
    check(experts.numel() < 2**31, op, f"T * K must be < 2**31, got {experts.numel()}")


def lora_expand_combine_forward(zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                                order: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton `mixlora::lora_expand_combine`: zd (S, R), B (E, H, R), weights (T, K) -> y (T, H) fp32,
    y_t = s sum_k w_j B_{e_j} zd_j. Grid (cdiv(T, BLOCK_M), cdiv(H, BLOCK_H)), token-major; the weighted zd are
    multiplied in B's dtype when it is 16-bit (rounded like a bf16 LoRA's), else in fp32 (tf32x3)."""
    _check("lora_expand_combine", zd, B, weights, experts, order, offsets)
    (T, K), (E, H, R) = experts.shape, B.shape
    if R == 0 or T == 0 or K == 0 or H == 0:
        return torch.zeros(T, H, dtype=torch.float32, device=zd.device)
    y = torch.empty(T, H, dtype=torch.float32, device=zd.device)
    _lora_expand_combine_fwd_kernel[(triton.cdiv(T, _FWD["BLOCK_M"]), triton.cdiv(H, _FWD["BLOCK_H"]))](
        zd, B, weights, experts, y, T, H, R, K, E, scale, zd.stride(0), zd.stride(1),
        B.stride(0), B.stride(1), B.stride(2), weights.stride(0), weights.stride(1), experts.stride(0),
        experts.stride(1), DT=mma_dtype(B), **expert_fold(E, R), **_FWD)
    return y


def lora_expand_combine_backward(grad_y: torch.Tensor, zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                                 experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `mixlora::lora_expand_combine_backward`: grad_y (T, H) -> (dzd like zd, dB like B, dweights like
    weights). One launch: NB grouped slot blocks (dzd, dweights) then E x cdiv(H, BLOCK_H) dB programs."""
    _check("lora_expand_combine_backward", zd, B, weights, experts, order, offsets, grad_y)
    (T, K), (E, H, R) = experts.shape, B.shape
    S = T * K
    if R == 0 or S == 0 or H == 0:
        return (torch.zeros_like(zd, memory_format=torch.contiguous_format),
                torch.zeros_like(B, memory_format=torch.contiguous_format),
                torch.zeros_like(weights, memory_format=torch.contiguous_format))
    dzd = torch.empty(S, R, dtype=zd.dtype, device=zd.device)
    dB = torch.empty(E, H, R, dtype=B.dtype, device=B.device)
    dw = torch.empty(T, K, dtype=weights.dtype, device=weights.device)
    nb = num_expert_blocks(S, E, _BLOCK_M)
    _lora_expand_combine_bwd_kernel[(nb + E * triton.cdiv(H, _BLOCK_H),)](
        grad_y, zd, B, weights, order, offsets, dzd, dB, dw, nb, H, R, K, E, scale,
        grad_y.stride(0), grad_y.stride(1), zd.stride(0), zd.stride(1), B.stride(0), B.stride(1), B.stride(2),
        weights.stride(0), weights.stride(1), GB_DOT=mma_dtype(B),
        BLOCK_M=_BLOCK_M, BLOCK_R=dot_block(R), BLOCK_H=_BLOCK_H)
    return dzd, dB, dw

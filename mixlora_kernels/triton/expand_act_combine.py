"""Triton launchers for `mixlora::expand_act_combine` and its backward (same arguments and results).

All inputs are read through their strides, so zg, zu = z.split(...) and Bg = B[:, :I] style views need no copy;
outputs are allocated contiguous.

Row layout of the token-major programs: BLOCK_T tokens x KP = next_pow2(K) slot rows per token, row = t_local * KP + k
(rows with k >= K are padding), ROWS = BLOCK_T * KP = 64 or 128 rows so the dots are 64-row wgmma tiles on sm_90.
G / U / grad_hbar rows are loaded once per token per tile and repeated for its KP slot rows in registers, and the K
slots of a token are summed by a reshape to (BLOCK_T, KP, BLOCK_I) inside the program: no atomics. The rows of a block
belong to mixed experts; every rank-R product is one dot over the expert fold (see `_common`): z of a row placed in
its expert's block of an E * R-wide row against the (E * R, BLOCK_I) slab of all experts' B, so a tile costs one MMA
per projection whatever E. The launchers lay each LoRA weight out as that slab once per call (`_slab_weights`).

I is split over the second grid axis when the row blocks alone do not fill the GPU; the rank-R reductions over I
(zd forward; dzg, dzu, dweights backward) are then written per split and summed by the launcher in a fixed order
(deterministic, no atomics). The weight gradients dBg, dBu, dAd are a separate launch, one program per (I tile,
expert), a segmented reduction over the expert's sorted slots.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check, check_expand_act_combine
from mixlora_kernels.triton._common import (FP32_DOT, act_fwd, act_grad, check_supported, dot_block, dropout_keep,
                                            dropout_threshold, expert_fold, fold_rows, mma_dtype,
                                            mma_operand, round_to, unfold_rows)

# Untuned (no GPU this session): chosen by the predicted time of benchmarks/sm90_cost (LLaMA-2-7B, E 8, R 16, bf16,
# T 4096 and 16384, dropout 0 and 0.05) among configurations that compile for sm_90 without spills (triton 3.8 and
# 3.6). One warpgroup per 64 slot rows: 8 warps on 64 rows split every wgmma's N between two warpgroups, which
# doubled the MMA, fence and descriptor instructions per tile (predicted +65% for the backward). The token-major
# kernels load each token's G / U / grad_hbar row once for its K slot rows (`_token_rows`), which frees the registers
# for wider I tiles. Forward: 128 slot rows (two warpgroups of 64) x 64 columns of I, 8 warps (254 registers;
# predicted 0.62 / 0.79 ms without / with dropout at T 16384 against 0.67 / 0.92 for 32 columns loaded per row);
# token-major backward: 64 x 16, 4 warps (248 registers; 32 columns spill 6 words, 128 rows gain nothing), with
# dropout 64 x 32 (255, unspilled; predicted 1.30 against 1.47 ms at T 16384); weight role: 64 columns x 16 sorted
# slots per step, one stage, 137-140 registers (capped at 168 by `maxnreg`) so that three 4-warp programs share an SM
# (predicted 0.67 / 0.93 ms without / with dropout at T 16384, against 0.76 / 1.06 at 32 slots and two stages, which
# need the cap and spill under it with dropout, and 1.09 / 1.40 uncapped). A fold in several chunks (E * R > 128,
# e.g. R 32 or 64 at E 8) or fp32 operands (tf32x3 triples the MMAs) take `_WIDE`, one stage so they fit shared
# memory (two stages of four R-64 chunks need 640 KB); those still spill (R 32: ~60 words, R 64 and fp32: ~200-260
# words in the backward).
_FWD = dict(ROWS=128, BLOCK_I=64, num_warps=8, num_stages=2)
_BWD = {False: dict(ROWS=64, BLOCK_I=16, num_warps=4, num_stages=2),  # keyed by LoRA dropout > 0
        True: dict(ROWS=64, BLOCK_I=32, num_warps=4, num_stages=2)}
_WIDE = dict(ROWS=64, BLOCK_I=16, num_warps=8, num_stages=1)
_BWD_WEIGHT = dict(BLOCK_I=64, BLOCK_M=16, num_warps=4, num_stages=1, maxnreg=168)
# Token-major programs to aim for per launch (row blocks x I splits): ~8 per H200 SM keeps the last wave short while
# each split still loops over >= 20 I tiles at LLaMA-2-7B T 4096 (172 tiles / 8 splits). A prediction, not measured.
_TARGET_PROGRAMS = 1024


@triton.jit
def _slot_tile(pid, T, K, experts_ptr, s_et, s_ek, w_ptr, s_wt, s_wk, BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """The BLOCK_T * KP slot rows of token block `pid` (KP = K padded to a power of two): validity, slot id t * K + k
    (int64), expert id (-1 where invalid) and fp32 routing weight (0 where invalid)."""
    row = tl.arange(0, BLOCK_T * KP)
    t = pid.to(tl.int64) * BLOCK_T + row // KP
    k = row % KP
    ok = (t < T) & (k < K)
    e_row = tl.load(experts_ptr + t * s_et + k * s_ek, mask=ok, other=-1)
    w = tl.load(w_ptr + t * s_wt + k * s_wk, mask=ok, other=0.0).to(tl.float32)
    return ok, t * K + k, e_row, w


@triton.jit
def _token_rows(ptr, tok, s_t, i, s_i, tok_ok, i_ok, KP: tl.constexpr):
    """(BLOCK_T * KP, BLOCK_I) fp32 slot rows of a per-token (T, I) tensor (row = t_local * KP + k): each token's row
    loaded once and repeated for its KP slot rows, not loaded once per slot row."""
    x = tl.load(ptr + tok[:, None] * s_t + i[None, :] * s_i, mask=tok_ok[:, None] & i_ok[None, :], other=0.0)
    x = tl.broadcast_to(x.to(tl.float32)[:, None, :], (x.shape[0], KP, x.shape[1]))
    return tl.reshape(x, (x.shape[0] * KP, x.shape[2]))


@triton.jit
def _sum_slots(x, BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """(BLOCK_T * KP, BLOCK_I) slot rows -> (BLOCK_T, BLOCK_I) per-token sums."""
    return tl.sum(tl.reshape(x, (BLOCK_T, KP, x.shape[1])), axis=1)


@triton.jit
def _slab(wt_ptr, ch, i, i_ok, DT: tl.constexpr, EPC: tl.constexpr, BLOCK_R: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Chunk ch of the all-expert slab of a LoRA weight laid out by `_slab_weights`, (EPC * BLOCK_R, BLOCK_I) as an
    MMA operand: row e * BLOCK_R + r is expert e's rank-r vector at columns i. Rows of a column are contiguous and
    the row stride is a constexpr, so the load is vectorised with no per-element address or rank/expert mask."""
    c = ch * EPC * BLOCK_R + tl.arange(0, EPC * BLOCK_R)
    return mma_operand(tl.load(wt_ptr + c[:, None] + i[None, :] * (N_CHUNKS * EPC * BLOCK_R), mask=i_ok[None, :],
                               other=0.0), DT)


@triton.jit
def _fold_expand(z0, slab0, z_ptr, slot, e_row, s_zs, s_zr, b_ptr, i, i_ok, R,
                 DT: tl.constexpr, EPC: tl.constexpr, BLOCK_R: tl.constexpr, N_CHUNKS: tl.constexpr):
    """(ROWS, BLOCK_I) fp32: row j times its own expert's B_e[i]ᵀ. z0 / slab0 are chunk 0's folded rows (hoisted out
    of the I loop) and B slab; further chunks (only when E * R > FOLD_WIDTH) are folded here."""
    out = tl.dot(z0, slab0, input_precision=FP32_DOT)
    for ch in tl.static_range(1, N_CHUNKS):
        zc = mma_operand(fold_rows(z_ptr, slot, e_row, s_zs, s_zr, R, ch * EPC, EPC, BLOCK_R), DT)
        out = tl.dot(zc, _slab(b_ptr, ch, i, i_ok, DT, EPC, BLOCK_R, N_CHUNKS), out, input_precision=FP32_DOT)
    return out


@triton.jit
def _fold_shrink(x, slab0, wide, acc, e_row, b_ptr, i, i_ok,
                 DT: tl.constexpr, EPC: tl.constexpr, BLOCK_R: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Accumulate x (ROWS, BLOCK_I) (an MMA operand) times each row's own expert's B_e[i]: with one chunk into the
    wide (ROWS, EPC * BLOCK_R) accumulator (unfolded once after the I loop, `_fold_result`), else chunk by chunk
    into acc (ROWS, BLOCK_R)."""
    if N_CHUNKS == 1:
        wide = tl.dot(x, tl.trans(slab0), wide, input_precision=FP32_DOT)
    else:
        acc += unfold_rows(tl.dot(x, tl.trans(slab0), input_precision=FP32_DOT), e_row, 0, EPC, BLOCK_R)
        for ch in tl.static_range(1, N_CHUNKS):
            slab = _slab(b_ptr, ch, i, i_ok, DT, EPC, BLOCK_R, N_CHUNKS)
            acc += unfold_rows(tl.dot(x, tl.trans(slab), input_precision=FP32_DOT), e_row, ch * EPC, EPC, BLOCK_R)
    return wide, acc


@triton.jit
def _fold_result(wide, acc, e_row, EPC: tl.constexpr, BLOCK_R: tl.constexpr, N_CHUNKS: tl.constexpr):
    out = acc
    if N_CHUNKS == 1:
        out = unfold_rows(wide, e_row, 0, EPC, BLOCK_R)
    return out


@triton.jit
def _expand_act_combine_fwd_kernel(
        g_ptr, u_ptr, zg_ptr, bg_ptr, zu_ptr, bu_ptr, w_ptr, experts_ptr, ad_ptr, hbar_ptr, zd_ptr,
        T, I, K, E, Rg, Ru, Rd, S, TILES, scale, seed, threshold, keep_scale,
        s_gt, s_gi, s_ut, s_ui, s_zgs, s_zgr, s_zus, s_zur, s_wt, s_wk, s_et, s_ek,
        ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_RG: tl.constexpr, HAS_RU: tl.constexpr, HAS_RD: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DT: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_RG: tl.constexpr, EPC_G: tl.constexpr, NC_G: tl.constexpr,
        BLOCK_RU: tl.constexpr, EPC_U: tl.constexpr, NC_U: tl.constexpr,
        BLOCK_RD: tl.constexpr, EPC_D: tl.constexpr, NC_D: tl.constexpr):
    """Program (token block, I split): hbar for the split's I tiles, and the split's part of zd (the whole zd when
    there is one split; else zd_ptr is a (splits, S, Rd) fp32 scratch the launcher sums)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    ok, slot, e_row, w = _slot_tile(pid, T, K, experts_ptr, s_et, s_ek, w_ptr, s_wt, s_wk, BLOCK_T, KP)
    if HAS_RG:
        zg0 = mma_operand(fold_rows(zg_ptr, slot, e_row, s_zgs, s_zgr, Rg, 0, EPC_G, BLOCK_RG), DT)
    if HAS_RU:
        zu0 = mma_operand(fold_rows(zu_ptr, slot, e_row, s_zus, s_zur, Ru, 0, EPC_U, BLOCK_RU), DT)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    zd_wide = tl.zeros((BLOCK_T * KP, EPC_D * BLOCK_RD), dtype=tl.float32)
    zd = tl.zeros((BLOCK_T * KP, BLOCK_RD), dtype=tl.float32)
    first = split * TILES
    for it in range(first, tl.minimum(first + TILES, tl.cdiv(I, BLOCK_I))):
        i = it * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < I
        m = ok[:, None] & i_ok[None, :]
        g = _token_rows(g_ptr, tok, s_gt, i, s_gi, tok < T, i_ok, KP)
        if HAS_RG:
            slab = _slab(bg_ptr, 0, i, i_ok, DT, EPC_G, BLOCK_RG, NC_G)
            g += scale * _fold_expand(zg0, slab, zg_ptr, slot, e_row, s_zgs, s_zgr, bg_ptr, i, i_ok, Rg, DT, EPC_G,
                                      BLOCK_RG, NC_G)
        h = act_fwd(g, ACT)
        if HAS_U:
            u = _token_rows(u_ptr, tok, s_ut, i, s_ui, tok < T, i_ok, KP)
            if HAS_RU:
                slab = _slab(bu_ptr, 0, i, i_ok, DT, EPC_U, BLOCK_RU, NC_U)
                u += scale * _fold_expand(zu0, slab, zu_ptr, slot, e_row, s_zus, s_zur, bu_ptr, i, i_ok, Ru, DT,
                                          EPC_U, BLOCK_RU, NC_U)
            h = h * u
        h = tl.where(m, h, 0.0)  # padding slot rows (k >= K) hold their token's G / U
        hbar = _sum_slots(w[:, None] * h, BLOCK_T, KP)
        tl.store(hbar_ptr + tok[:, None] * I + i[None, :], round_to(hbar, hbar_ptr.dtype.element_ty),
                 mask=(tok < T)[:, None] & i_ok[None, :])
        if HAS_RD:
            if HAS_DROPOUT:
                h = tl.where(dropout_keep(slot, i, I, seed, threshold), h, 0.0)
            hm = mma_operand(h, DT)
            slab = _slab(ad_ptr, 0, i, i_ok, DT, EPC_D, BLOCK_RD, NC_D)
            zd_wide, zd = _fold_shrink(hm, slab, zd_wide, zd, e_row, ad_ptr, i, i_ok, DT, EPC_D, BLOCK_RD, NC_D)
    if HAS_RD:
        zd = _fold_result(zd_wide, zd, e_row, EPC_D, BLOCK_RD, NC_D)
        if HAS_DROPOUT:
            zd = zd * keep_scale
        rd = tl.arange(0, BLOCK_RD)
        tl.store(zd_ptr + split.to(tl.int64) * S * Rd + slot[:, None] * Rd + rd[None, :], zd,
                 mask=ok[:, None] & (rd < Rd)[None, :])


# TILES is not specialised: at TILES == 1 (small T, one I tile per split) triton 3.6 compiles the 32-column dropout
# configuration with spills.
@triton.jit(do_not_specialize=["TILES"])
def _expand_act_combine_bwd_kernel(
        ghbar_ptr, gzd_ptr, g_ptr, u_ptr, zg_ptr, bg_ptr, zu_ptr, bu_ptr, w_ptr, experts_ptr, ad_ptr,
        dg_ptr, du_ptr, dzg_ptr, dzu_ptr, dw_ptr,
        T, I, K, E, Rg, Ru, Rd, S, TILES, scale, seed, threshold, keep_scale,
        s_ght, s_ghi, s_gzs, s_gzr, s_gt, s_gi, s_ut, s_ui, s_zgs, s_zgr, s_zus, s_zur, s_wt, s_wk, s_et, s_ek,
        ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_RG: tl.constexpr, HAS_RU: tl.constexpr, HAS_RD: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DT: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_RG: tl.constexpr, EPC_G: tl.constexpr, NC_G: tl.constexpr,
        BLOCK_RU: tl.constexpr, EPC_U: tl.constexpr, NC_U: tl.constexpr,
        BLOCK_RD: tl.constexpr, EPC_D: tl.constexpr, NC_D: tl.constexpr):
    """Token role, program (token block, I split), recomputing g, u, h from G, U and the shrinks: dG, dU (sums over
    a token's K slots) for the split's I tiles, and the split's part of dzg, dzu, dweights (the whole of them with
    one split; else (splits, S, .) fp32 scratch the launcher sums)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    ok, slot, e_row, w = _slot_tile(pid, T, K, experts_ptr, s_et, s_ek, w_ptr, s_wt, s_wk, BLOCK_T, KP)
    if HAS_RG:
        zg0 = mma_operand(fold_rows(zg_ptr, slot, e_row, s_zgs, s_zgr, Rg, 0, EPC_G, BLOCK_RG), DT)
    if HAS_RU:
        zu0 = mma_operand(fold_rows(zu_ptr, slot, e_row, s_zus, s_zur, Ru, 0, EPC_U, BLOCK_RU), DT)
    if HAS_RD:
        gzd0 = mma_operand(fold_rows(gzd_ptr, slot, e_row, s_gzs, s_gzr, Rd, 0, EPC_D, BLOCK_RD), DT)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dzg_wide = tl.zeros((BLOCK_T * KP, EPC_G * BLOCK_RG), dtype=tl.float32)
    dzg = tl.zeros((BLOCK_T * KP, BLOCK_RG), dtype=tl.float32)
    dzu_wide = tl.zeros((BLOCK_T * KP, EPC_U * BLOCK_RU), dtype=tl.float32)
    dzu = tl.zeros((BLOCK_T * KP, BLOCK_RU), dtype=tl.float32)
    dw = tl.zeros((BLOCK_T * KP,), dtype=tl.float32)
    first = split * TILES
    for it in range(first, tl.minimum(first + TILES, tl.cdiv(I, BLOCK_I))):
        i = it * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < I
        m = ok[:, None] & i_ok[None, :]
        g = _token_rows(g_ptr, tok, s_gt, i, s_gi, tok < T, i_ok, KP)
        if HAS_RG:
            slab_g = _slab(bg_ptr, 0, i, i_ok, DT, EPC_G, BLOCK_RG, NC_G)
            g += scale * _fold_expand(zg0, slab_g, zg_ptr, slot, e_row, s_zgs, s_zgr, bg_ptr, i, i_ok, Rg, DT, EPC_G,
                                      BLOCK_RG, NC_G)
        a = act_fwd(g, ACT)
        gh = _token_rows(ghbar_ptr, tok, s_ght, i, s_ghi, tok < T, i_ok, KP)
        dh = w[:, None] * gh
        if HAS_RD:
            slab_d = _slab(ad_ptr, 0, i, i_ok, DT, EPC_D, BLOCK_RD, NC_D)
            back = _fold_expand(gzd0, slab_d, gzd_ptr, slot, e_row, s_gzs, s_gzr, ad_ptr, i, i_ok, Rd, DT, EPC_D,
                                BLOCK_RD, NC_D)
            if HAS_DROPOUT:
                back = tl.where(dropout_keep(slot, i, I, seed, threshold), back * keep_scale, 0.0)
            dh += back
        dg = dh * act_grad(g, ACT)
        if HAS_U:
            u = _token_rows(u_ptr, tok, s_ut, i, s_ui, tok < T, i_ok, KP)
            if HAS_RU:
                slab_u = _slab(bu_ptr, 0, i, i_ok, DT, EPC_U, BLOCK_RU, NC_U)
                u += scale * _fold_expand(zu0, slab_u, zu_ptr, slot, e_row, s_zus, s_zur, bu_ptr, i, i_ok, Ru, DT,
                                          EPC_U, BLOCK_RU, NC_U)
            dw += tl.sum(gh * a * u, axis=1)
            du = tl.where(m, dh * a, 0.0)
            dg = dg * u
            tl.store(du_ptr + tok[:, None] * I + i[None, :], round_to(_sum_slots(du, BLOCK_T, KP),
                     du_ptr.dtype.element_ty), mask=(tok < T)[:, None] & i_ok[None, :])
            if HAS_RU:
                dzu_wide, dzu = _fold_shrink(mma_operand(du, DT), slab_u, dzu_wide, dzu, e_row, bu_ptr, i, i_ok, DT,
                                             EPC_U, BLOCK_RU, NC_U)
        else:
            dw += tl.sum(gh * a, axis=1)
        dg = tl.where(m, dg, 0.0)
        tl.store(dg_ptr + tok[:, None] * I + i[None, :], round_to(_sum_slots(dg, BLOCK_T, KP),
                 dg_ptr.dtype.element_ty), mask=(tok < T)[:, None] & i_ok[None, :])
        if HAS_RG:
            dzg_wide, dzg = _fold_shrink(mma_operand(dg, DT), slab_g, dzg_wide, dzg, e_row, bg_ptr, i, i_ok, DT,
                                         EPC_G, BLOCK_RG, NC_G)
    tl.store(dw_ptr + split.to(tl.int64) * S + slot, round_to(dw, dw_ptr.dtype.element_ty), mask=ok)
    if HAS_RG:
        dzg = _fold_result(dzg_wide, dzg, e_row, EPC_G, BLOCK_RG, NC_G)
        rg = tl.arange(0, BLOCK_RG)
        tl.store(dzg_ptr + split.to(tl.int64) * S * Rg + slot[:, None] * Rg + rg[None, :],
                 round_to(scale * dzg, dzg_ptr.dtype.element_ty), mask=ok[:, None] & (rg < Rg)[None, :])
    if HAS_RU:
        dzu = _fold_result(dzu_wide, dzu, e_row, EPC_U, BLOCK_RU, NC_U)
        ru = tl.arange(0, BLOCK_RU)
        tl.store(dzu_ptr + split.to(tl.int64) * S * Ru + slot[:, None] * Ru + ru[None, :],
                 round_to(scale * dzu, dzu_ptr.dtype.element_ty), mask=ok[:, None] & (ru < Ru)[None, :])


@triton.jit
def _expand_act_combine_bwd_weight_kernel(
        ghbar_ptr, gzd_ptr, g_ptr, u_ptr, zg_ptr, bg_ptr, zu_ptr, bu_ptr, w_ptr, order_ptr, offsets_ptr, ad_ptr,
        dbg_ptr, dbu_ptr, dad_ptr,
        I, E, Rg, Ru, Rd, scale, seed, threshold, keep_scale,
        s_ght, s_ghi, s_gzs, s_gzr, s_gt, s_gi, s_ut, s_ui, s_zgs, s_zgr, s_bge, s_bgi, s_bgr, s_zus, s_zur,
        s_bue, s_bui, s_bur, s_wt, s_wk, s_ade, s_adr, s_adi,
        K: tl.constexpr, ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_RG: tl.constexpr, HAS_RU: tl.constexpr,
        HAS_RD: tl.constexpr, HAS_DROPOUT: tl.constexpr, DT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_RG: tl.constexpr, BLOCK_RU: tl.constexpr, BLOCK_RD: tl.constexpr):
    """Weight role, program (I tile, expert) (experts fastest, so the K programs reading one token's G row run
    together): dBg, dBu, dAd of that tile as a deterministic segmented reduction over the expert's sorted slots,
    BLOCK_M at a time, recomputing g, u, h (rows of one expert: plain rank-R dots, no fold)."""
    pid = tl.program_id(0)
    e = pid % E
    i = (pid // E) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < I
    rg = tl.arange(0, BLOCK_RG)
    ru = tl.arange(0, BLOCK_RU)
    rd = tl.arange(0, BLOCK_RD)
    rg_ok = rg < Rg
    ru_ok = ru < Ru
    rd_ok = rd < Rd
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    bg = mma_operand(tl.load(bg_ptr + e * s_bge + i[None, :] * s_bgi + rg[:, None] * s_bgr,
                             mask=rg_ok[:, None] & i_ok[None, :], other=0.0), DT)
    bu = mma_operand(tl.load(bu_ptr + e * s_bue + i[None, :] * s_bui + ru[:, None] * s_bur,
                             mask=ru_ok[:, None] & i_ok[None, :], other=0.0), DT)
    ad = mma_operand(tl.load(ad_ptr + e * s_ade + rd[:, None] * s_adr + i[None, :] * s_adi,
                             mask=rd_ok[:, None] & i_ok[None, :], other=0.0), DT)
    # dB tiles are accumulated as (BLOCK_I, rank) so the MMA's M is the 64-wide I tile, not the rank.
    dbg = tl.zeros((BLOCK_I, BLOCK_RG), dtype=tl.float32)
    dbu = tl.zeros((BLOCK_I, BLOCK_RU), dtype=tl.float32)
    dadt = tl.zeros((BLOCK_I, BLOCK_RD), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        ok = pos < end
        # K is a constexpr: slot // K is a shift (K a power of two) or a multiply-high, not a division sequence; in 32
        # bits (slot ids are < 2**31, checked by the launcher), as a 64-bit one is a slow path in SASS
        slot32 = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int32)
        t32 = slot32 // K
        k = slot32 - t32 * K
        slot = slot32.to(tl.int64)
        t = t32.to(tl.int64)
        m = ok[:, None] & i_ok[None, :]
        zg = mma_operand(tl.load(zg_ptr + slot[:, None] * s_zgs + rg[None, :] * s_zgr,
                                 mask=ok[:, None] & rg_ok[None, :], other=0.0), DT)
        zu = mma_operand(tl.load(zu_ptr + slot[:, None] * s_zus + ru[None, :] * s_zur,
                                 mask=ok[:, None] & ru_ok[None, :], other=0.0), DT)
        gzd = mma_operand(tl.load(gzd_ptr + slot[:, None] * s_gzs + rd[None, :] * s_gzr,
                                  mask=ok[:, None] & rd_ok[None, :], other=0.0), DT)
        w = tl.load(w_ptr + t * s_wt + k * s_wk, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t[:, None] * s_gt + i[None, :] * s_gi, mask=m, other=0.0).to(tl.float32)
        if HAS_RG:
            g += scale * tl.dot(zg, bg, input_precision=FP32_DOT)
        a = act_fwd(g, ACT)
        dh = w[:, None] * tl.load(ghbar_ptr + t[:, None] * s_ght + i[None, :] * s_ghi, mask=m,
                                  other=0.0).to(tl.float32)
        if HAS_U:
            u = tl.load(u_ptr + t[:, None] * s_ut + i[None, :] * s_ui, mask=m, other=0.0).to(tl.float32)
            if HAS_RU:
                u += scale * tl.dot(zu, bu, input_precision=FP32_DOT)
            h = a * u
        else:
            h = a
        if HAS_RD:
            back = tl.dot(gzd, ad, input_precision=FP32_DOT)
            if HAS_DROPOUT:
                keep = dropout_keep(slot, i, I, seed, threshold)
                back = tl.where(keep, back * keep_scale, 0.0)
                h = tl.where(keep, h, 0.0)
            dh += back
            dadt = tl.dot(tl.trans(mma_operand(h, DT)), gzd, dadt, input_precision=FP32_DOT)
        dg = dh * act_grad(g, ACT)
        if HAS_U:
            dg = dg * u
            if HAS_RU:
                dbu = tl.dot(tl.trans(mma_operand(dh * a, DT)), zu, dbu, input_precision=FP32_DOT)
        if HAS_RG:
            dbg = tl.dot(tl.trans(mma_operand(dg, DT)), zg, dbg, input_precision=FP32_DOT)
    if HAS_RG:
        tl.store(dbg_ptr + e * I * Rg + i[:, None] * Rg + rg[None, :], round_to(scale * dbg, dbg_ptr.dtype.element_ty),
                 mask=i_ok[:, None] & rg_ok[None, :])
    if HAS_RU:
        tl.store(dbu_ptr + e * I * Ru + i[:, None] * Ru + ru[None, :], round_to(scale * dbu, dbu_ptr.dtype.element_ty),
                 mask=i_ok[:, None] & ru_ok[None, :])
    if HAS_RD:
        if HAS_DROPOUT:
            dadt = dadt * keep_scale
        tl.store(dad_ptr + e * Rd * I + rd[None, :] * I + i[:, None], round_to(dadt, dad_ptr.dtype.element_ty),
                 mask=rd_ok[None, :] & i_ok[:, None])


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _meta(G, U, Bg, Bu, Ad, K, act, dropout_p, launch):
    """Constexprs and launch options of the token-major kernels; `launch` is _FWD or one of _BWD."""
    E, Rg, Ru, Rd = Bg.shape[0], Bg.shape[2], Bu.shape[2], Ad.shape[1]
    kp = triton.next_power_of_2(K)
    meta = dict(ACT=act, HAS_U=U is not None, HAS_RG=Rg > 0, HAS_RU=Ru > 0, HAS_RD=Rd > 0,
                HAS_DROPOUT=dropout_p > 0, DT=mma_dtype(G, U, Bg, Bu, Ad), KP=kp)
    for name, r in (("G", Rg), ("U", Ru), ("D", Rd)):
        fold = expert_fold(E, r)
        meta.update({f"BLOCK_R{name}": fold["BLOCK_R"], f"EPC_{name}": fold["EPC"], f"NC_{name}": fold["N_CHUNKS"]})
    wide = meta["DT"] == tl.float32 or max(meta["NC_G"], meta["NC_U"], meta["NC_D"]) > 1
    launch = dict(_WIDE if wide else launch)
    meta["BLOCK_T"] = max(1, launch.pop("ROWS") // kp)
    return {**meta, **launch}


def _slab_weights(W: torch.Tensor, meta: dict, name: str, rank_last: bool) -> torch.Tensor:
    """A LoRA weight, (E, I, R) when rank_last else (E, R, I), laid out for `_slab`: (I, N_CHUNKS * EPC * BLOCK_R)
    contiguous, column e * BLOCK_R + r = W[e, :, r], zero for padding experts and ranks. One copy per call (2.8 MB
    at LLaMA-2-7B: I 11008, E 8, R 16, bf16, where no padding is needed)."""
    src = (W if rank_last else W.transpose(1, 2)).permute(1, 0, 2)  # (I, E, R) view
    (I, E, R), blocks, block_r = src.shape, meta[f"NC_{name}"] * meta[f"EPC_{name}"], meta[f"BLOCK_R{name}"]
    if (E, R) == (blocks, block_r):
        return src.contiguous().view(I, -1)
    slab = W.new_zeros(I, blocks, block_r)
    slab[:, :E, :R] = src
    return slab.view(I, -1)


def _grid(T, I, meta):
    """(row blocks, I splits) and the I tiles per split."""
    n_rb, n_i = triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(I, meta["BLOCK_I"])
    tiles = triton.cdiv(n_i, max(1, min(n_i, triton.cdiv(_TARGET_PROGRAMS, n_rb))))
    return (n_rb, triton.cdiv(n_i, tiles)), tiles


def _split_sum(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out itself when the kernel wrote it directly (one split), else the per-split parts summed in split order."""
    return out if part is None else part.sum(0).view(out.shape).to(out.dtype)


def expand_act_combine_forward(G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor, Bg: torch.Tensor,
                               zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                               order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float,
                               activation_name: str, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `mixlora::expand_act_combine` -> (hbar (T, I) like G, zd (S, Rd) fp32); see the op for semantics.

    Grid (cdiv(T, BLOCK_T), I splits): token-major programs over the split's I tiles, so G and U are read once and zd
    (a reduction over I) stays in registers. `order` and `offsets` are not needed by this kernel.
    """
    op = "expand_act_combine"
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p)
    check_supported(op, ("G", G), ("U", U), ("zg", zg), ("Bg", Bg), ("zu", zu), ("Bu", Bu), ("weights", weights),
                    ("Ad", Ad))
    (T, I), (_, K), E = G.shape, experts.shape, Bg.shape[0]
    Rg, Ru, Rd = zg.shape[1], zu.shape[1], Ad.shape[1]
    S = T * K
    hbar = torch.empty(T, I, dtype=G.dtype, device=G.device)
    zd = torch.empty(S, Rd, dtype=torch.float32, device=G.device)
    if T == 0 or I == 0 or K == 0:
        return hbar.zero_(), zd.zero_()
    meta = _meta(G, U, Bg, Bu, Ad, K, activation_name, dropout_p, _FWD)
    grid, tiles = _grid(T, I, meta)
    zd_part = None if grid[1] == 1 else torch.empty(grid[1], S, Rd, dtype=torch.float32, device=G.device)
    Uarg = G if U is None else U
    Bgs, Bus, Ads = (_slab_weights(Bg, meta, "G", True), _slab_weights(Bu, meta, "U", True),
                     _slab_weights(Ad, meta, "D", False))
    _expand_act_combine_fwd_kernel[grid](
        G, Uarg, zg, Bgs, zu, Bus, weights, experts, Ads, hbar, zd if zd_part is None else zd_part,
        T, I, K, E, Rg, Ru, Rd, S, tiles, scale, seed & 0xFFFFFFFF, dropout_threshold(dropout_p),
        1.0 / (1.0 - dropout_p), *_strides(G, Uarg, zg, zu, weights, experts), **meta)
    return hbar, _split_sum(zd_part, zd)


def expand_act_combine_backward(
        grad_hbar: torch.Tensor, grad_zd: torch.Tensor, G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor,
        Bg: torch.Tensor, zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float, activation_name: str,
        dropout_p: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Triton `mixlora::expand_act_combine_backward` -> (dG, dU, dzg, dBg, dzu, dBu, dweights, dAd), each like its
    input (dU empty when U is None).

    Two launches, both recomputing g, u, h: token-major programs, grid (cdiv(T, BLOCK_T), I splits), for dG, dU, dzg,
    dzu, dweights; then one program per (I tile, expert) for dBg, dBu, dAd.
    """
    op = "expand_act_combine_backward"
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p,
                             grad_hbar, grad_zd)
    check_supported(op, ("grad_hbar", grad_hbar), ("grad_zd", grad_zd), ("G", G), ("U", U), ("zg", zg), ("Bg", Bg),
                    ("zu", zu), ("Bu", Bu), ("weights", weights), ("Ad", Ad))
    (T, I), (_, K), E = G.shape, experts.shape, Bg.shape[0]
    Rg, Ru, Rd = zg.shape[1], zu.shape[1], Ad.shape[1]
    S = T * K
    check(S < 2**31, op, f"T * K must be < 2**31, got {S}")

    def new(shape, like):  # every element is written by the kernels (or the early return zeroes it)
        return torch.empty(shape, dtype=like.dtype, device=G.device)

    dG = new((T, I), G)
    dU = G.new_empty(0) if U is None else new((T, I), U)
    dzg, dBg, dzu, dBu = new(zg.shape, zg), new(Bg.shape, Bg), new(zu.shape, zu), new(Bu.shape, Bu)
    dw, dAd = new(weights.shape, weights), new(Ad.shape, Ad)
    if T == 0 or I == 0 or K == 0:
        return tuple(t.zero_() for t in (dG, dU, dzg, dBg, dzu, dBu, dw, dAd))
    meta = _meta(G, U, Bg, Bu, Ad, K, activation_name, dropout_p, _BWD[dropout_p > 0])
    grid, tiles = _grid(T, I, meta)
    if grid[1] == 1:
        parts = (None, None, None)
    else:
        parts = tuple(torch.empty(grid[1], S, *r, dtype=torch.float32, device=G.device) for r in ((Rg,), (Ru,), ()))
    Uarg = G if U is None else U
    Bgs, Bus, Ads = (_slab_weights(Bg, meta, "G", True), _slab_weights(Bu, meta, "U", True),
                     _slab_weights(Ad, meta, "D", False))
    _expand_act_combine_bwd_kernel[grid](
        grad_hbar, grad_zd, G, Uarg, zg, Bgs, zu, Bus, weights, experts, Ads, dG, dG if U is None else dU,
        *(out if part is None else part for part, out in zip(parts, (dzg, dzu, dw))),
        T, I, K, E, Rg, Ru, Rd, S, tiles, scale, seed & 0xFFFFFFFF, dropout_threshold(dropout_p),
        1.0 / (1.0 - dropout_p), *_strides(grad_hbar, grad_zd, G, Uarg, zg, zu, weights, experts), **meta)
    dzg, dzu, dw = (_split_sum(part, out) for part, out in zip(parts, (dzg, dzu, dw)))
    _expand_act_combine_bwd_weight_kernel[(triton.cdiv(I, _BWD_WEIGHT["BLOCK_I"]) * E,)](
        grad_hbar, grad_zd, G, Uarg, zg, Bg, zu, Bu, weights, order, offsets, Ad, dBg, dBu, dAd,
        I, E, Rg, Ru, Rd, scale, seed & 0xFFFFFFFF, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        *_strides(grad_hbar, grad_zd, G, Uarg, zg, Bg, zu, Bu, weights, Ad),
        K=K, ACT=activation_name, HAS_U=U is not None, HAS_RG=Rg > 0, HAS_RU=Ru > 0, HAS_RD=Rd > 0,
        HAS_DROPOUT=dropout_p > 0, DT=meta["DT"], BLOCK_RG=dot_block(Rg), BLOCK_RU=dot_block(Ru),
        BLOCK_RD=dot_block(Rd), **_BWD_WEIGHT)
    return dG, dU, dzg, dBg, dzu, dBu, dw, dAd

"""Triton launchers for `mixlora::expand_act_combine` and its backward (same arguments and results).

All inputs are read through their strides, so zg, zu = z.split(...) and Bg = B[:, :I] style views need no copy;
outputs are allocated contiguous. Every matmul here mixes an fp32 operand (the shrinks z, or the fp32 h / dg) with a
LoRA weight, so all dots run on fp32 operands (`FP32_DOT`), matching the reference's fp32 math.

Row layout of the token-major programs: BLOCK_T tokens x KP = next_pow2(K) slot rows per token, row = t_local * KP + k
(rows with k >= K are padding). G / U / grad_hbar rows are loaded once per token per tile (the KP repeats hit L1),
and the K slots of a token are summed by a reshape to (BLOCK_T, KP, BLOCK_I) inside the program: no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check_expand_act_combine
from mixlora_kernels.triton._common import (FP32_DOT, act_fwd, act_grad, check_supported, dot_block, dropout_keep,
                                            dropout_threshold)

# Untuned (no GPU this session): 32 slot rows x 64 columns of I per tile, all ranks in one tile.
_ROWS = 32
_BLOCK_I = 64
_BLOCK_M = 32


@triton.jit
def _masked_expand(z, b_ptr, e_row, i, i_ok, r, r_ok, E, stride_be, stride_bi, stride_br):
    """sum_e [e_row == e] z B_e[i]^T: (ROWS, BLOCK_R) x (BLOCK_R, BLOCK_I) per expert, rows of other experts zeroed."""
    out = tl.zeros((z.shape[0], i.shape[0]), dtype=tl.float32)
    for e in range(E):
        b = tl.load(b_ptr + e * stride_be + i[None, :] * stride_bi + r[:, None] * stride_br,
                    mask=r_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        out = tl.dot(tl.where((e_row == e)[:, None], z, 0.0), b, out, input_precision=FP32_DOT)
    return out


@triton.jit
def _masked_shrink(x, b_ptr, e_row, i, i_ok, r, r_ok, E, stride_be, stride_bi, stride_br, acc):
    """acc + [e_row == e] x B_e[i] summed over e: (ROWS, BLOCK_I) x (BLOCK_I, BLOCK_R), b indexed [e, i, r]."""
    for e in range(E):
        b = tl.load(b_ptr + e * stride_be + i[:, None] * stride_bi + r[None, :] * stride_br,
                    mask=i_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.where((e_row == e)[:, None], tl.dot(x, b, input_precision=FP32_DOT), 0.0)
    return acc


@triton.jit
def _slot_tile(pid, T, K, experts_ptr, s_et, s_ek, w_ptr, s_wt, s_wk, BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """The BLOCK_T * KP slot rows of token block `pid` (KP = K padded to a power of two): token t, validity, slot id
    t * K + k, expert id (-1 where invalid) and fp32 routing weight (0 where invalid)."""
    row = tl.arange(0, BLOCK_T * KP)
    t = pid * BLOCK_T + row // KP
    k = row % KP
    ok = (t < T) & (k < K)
    e_row = tl.load(experts_ptr + t * s_et + k * s_ek, mask=ok, other=-1)
    w = tl.load(w_ptr + t * s_wt + k * s_wk, mask=ok, other=0.0).to(tl.float32)
    return t, ok, t.to(tl.int64) * K + k, e_row, w


@triton.jit
def _sum_slots(x, BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """(BLOCK_T * KP, BLOCK_I) slot rows -> (BLOCK_T, BLOCK_I) per-token sums."""
    return tl.sum(tl.reshape(x, (BLOCK_T, KP, x.shape[1])), axis=1)


@triton.jit
def _expand_act_combine_fwd_kernel(
        g_ptr, u_ptr, zg_ptr, bg_ptr, zu_ptr, bu_ptr, w_ptr, experts_ptr, ad_ptr, hbar_ptr, zd_ptr,
        T, I, K, E, Rg, Ru, Rd, scale, seed, threshold, keep_scale,
        s_gt, s_gi, s_ut, s_ui, s_zgs, s_zgr, s_bge, s_bgi, s_bgr, s_zus, s_zur, s_bue, s_bui, s_bur,
        s_wt, s_wk, s_et, s_ek, s_ade, s_adr, s_adi,
        ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_RG: tl.constexpr, HAS_RU: tl.constexpr, HAS_RD: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr, BLOCK_I: tl.constexpr,
        BLOCK_RG: tl.constexpr, BLOCK_RU: tl.constexpr, BLOCK_RD: tl.constexpr):
    """One block of BLOCK_T tokens (all their K slots), looping over I: hbar tile by tile, zd accumulated."""
    pid = tl.program_id(0)
    t, ok, slot, e_row, w = _slot_tile(pid, T, K, experts_ptr, s_et, s_ek, w_ptr, s_wt, s_wk, BLOCK_T, KP)
    rg = tl.arange(0, BLOCK_RG)
    ru = tl.arange(0, BLOCK_RU)
    rd = tl.arange(0, BLOCK_RD)
    zg = tl.load(zg_ptr + slot[:, None] * s_zgs + rg[None, :] * s_zgr, mask=ok[:, None] & (rg < Rg)[None, :],
                 other=0.0).to(tl.float32)
    zu = tl.load(zu_ptr + slot[:, None] * s_zus + ru[None, :] * s_zur, mask=ok[:, None] & (ru < Ru)[None, :],
                 other=0.0).to(tl.float32)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    zd = tl.zeros((BLOCK_T * KP, BLOCK_RD), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_ok = i < I
        m = ok[:, None] & i_ok[None, :]
        g = tl.load(g_ptr + t[:, None] * s_gt + i[None, :] * s_gi, mask=m, other=0.0).to(tl.float32)
        if HAS_RG:
            g += scale * _masked_expand(zg, bg_ptr, e_row, i, i_ok, rg, rg < Rg, E, s_bge, s_bgi, s_bgr)
        h = act_fwd(g, ACT)
        if HAS_U:
            u = tl.load(u_ptr + t[:, None] * s_ut + i[None, :] * s_ui, mask=m, other=0.0).to(tl.float32)
            if HAS_RU:
                u += scale * _masked_expand(zu, bu_ptr, e_row, i, i_ok, ru, ru < Ru, E, s_bue, s_bui, s_bur)
            h = h * u
        hbar = _sum_slots(w[:, None] * h, BLOCK_T, KP)
        tl.store(hbar_ptr + tok[:, None] * I + i[None, :], hbar.to(hbar_ptr.dtype.element_ty),
                 mask=(tok < T)[:, None] & i_ok[None, :])
        if HAS_RD:
            if HAS_DROPOUT:
                h = tl.where(dropout_keep(slot, i, I, seed, threshold), h, 0.0)
            h = tl.where(m, h, 0.0)
            zd = _masked_shrink(h, ad_ptr, e_row, i, i_ok, rd, rd < Rd, E, s_ade, s_adi, s_adr, zd)
    if HAS_RD:
        if HAS_DROPOUT:
            zd = zd * keep_scale
        tl.store(zd_ptr + slot[:, None] * Rd + rd[None, :], zd, mask=ok[:, None] & (rd < Rd)[None, :])


@triton.jit
def _expand_act_combine_bwd_kernel(
        ghbar_ptr, gzd_ptr, g_ptr, u_ptr, zg_ptr, bg_ptr, zu_ptr, bu_ptr, w_ptr, experts_ptr, order_ptr,
        offsets_ptr, ad_ptr, dg_ptr, du_ptr, dzg_ptr, dbg_ptr, dzu_ptr, dbu_ptr, dw_ptr, dad_ptr,
        T, I, K, E, Rg, Ru, Rd, scale, seed, threshold, keep_scale,
        s_ght, s_ghi, s_gzs, s_gzr, s_gt, s_gi, s_ut, s_ui, s_zgs, s_zgr, s_bge, s_bgi, s_bgr, s_zus, s_zur,
        s_bue, s_bui, s_bur, s_wt, s_wk, s_et, s_ek, s_ade, s_adr, s_adi,
        ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_RG: tl.constexpr, HAS_RU: tl.constexpr, HAS_RD: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr, BLOCK_I: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_RU: tl.constexpr, BLOCK_RD: tl.constexpr):
    """Two roles by program id; both recompute g, u, h from G, U and the shrinks instead of loading saved ones.

    Programs [0, cdiv(T, BLOCK_T)): token-major like the forward, looping over I: dG, dU (sums over a token's K
    slots), and per slot dzg, dzu (masked per-expert dots) and dweights. Programs after that, one per (expert,
    I tile): dBg, dBu, dAd of that tile as a deterministic segmented reduction over the expert's sorted slots.
    """
    pid = tl.program_id(0)
    n_tok = tl.cdiv(T, BLOCK_T)
    rg = tl.arange(0, BLOCK_RG)
    ru = tl.arange(0, BLOCK_RU)
    rd = tl.arange(0, BLOCK_RD)
    rg_ok = rg < Rg
    ru_ok = ru < Ru
    rd_ok = rd < Rd
    if pid < n_tok:
        t, ok, slot, e_row, w = _slot_tile(pid, T, K, experts_ptr, s_et, s_ek, w_ptr, s_wt, s_wk, BLOCK_T, KP)
        zg = tl.load(zg_ptr + slot[:, None] * s_zgs + rg[None, :] * s_zgr, mask=ok[:, None] & rg_ok[None, :],
                     other=0.0).to(tl.float32)
        zu = tl.load(zu_ptr + slot[:, None] * s_zus + ru[None, :] * s_zur, mask=ok[:, None] & ru_ok[None, :],
                     other=0.0).to(tl.float32)
        gzd = tl.load(gzd_ptr + slot[:, None] * s_gzs + rd[None, :] * s_gzr, mask=ok[:, None] & rd_ok[None, :],
                      other=0.0).to(tl.float32)
        tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        dzg = tl.zeros((BLOCK_T * KP, BLOCK_RG), dtype=tl.float32)
        dzu = tl.zeros((BLOCK_T * KP, BLOCK_RU), dtype=tl.float32)
        dw = tl.zeros((BLOCK_T * KP,), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            i_ok = i < I
            m = ok[:, None] & i_ok[None, :]
            g = tl.load(g_ptr + t[:, None] * s_gt + i[None, :] * s_gi, mask=m, other=0.0).to(tl.float32)
            if HAS_RG:
                g += scale * _masked_expand(zg, bg_ptr, e_row, i, i_ok, rg, rg_ok, E, s_bge, s_bgi, s_bgr)
            a = act_fwd(g, ACT)
            gh = tl.load(ghbar_ptr + t[:, None] * s_ght + i[None, :] * s_ghi, mask=m, other=0.0).to(tl.float32)
            dh = w[:, None] * gh
            if HAS_RD:
                back = _masked_expand(gzd, ad_ptr, e_row, i, i_ok, rd, rd_ok, E, s_ade, s_adi, s_adr)
                if HAS_DROPOUT:
                    back = tl.where(dropout_keep(slot, i, I, seed, threshold), back * keep_scale, 0.0)
                dh += back
            dg = dh * act_grad(g, ACT)
            if HAS_U:
                u = tl.load(u_ptr + t[:, None] * s_ut + i[None, :] * s_ui, mask=m, other=0.0).to(tl.float32)
                if HAS_RU:
                    u += scale * _masked_expand(zu, bu_ptr, e_row, i, i_ok, ru, ru_ok, E, s_bue, s_bui, s_bur)
                dw += tl.sum(gh * a * u, axis=1)
                du = tl.where(m, dh * a, 0.0)
                dg = dg * u
                tl.store(du_ptr + tok[:, None] * I + i[None, :], _sum_slots(du, BLOCK_T, KP).to(
                    du_ptr.dtype.element_ty), mask=(tok < T)[:, None] & i_ok[None, :])
                if HAS_RU:
                    dzu = _masked_shrink(du, bu_ptr, e_row, i, i_ok, ru, ru_ok, E, s_bue, s_bui, s_bur, dzu)
            else:
                dw += tl.sum(gh * a, axis=1)
            dg = tl.where(m, dg, 0.0)
            tl.store(dg_ptr + tok[:, None] * I + i[None, :], _sum_slots(dg, BLOCK_T, KP).to(dg_ptr.dtype.element_ty),
                     mask=(tok < T)[:, None] & i_ok[None, :])
            if HAS_RG:
                dzg = _masked_shrink(dg, bg_ptr, e_row, i, i_ok, rg, rg_ok, E, s_bge, s_bgi, s_bgr, dzg)
        tl.store(dw_ptr + slot, dw.to(dw_ptr.dtype.element_ty), mask=ok)
        if HAS_RG:
            tl.store(dzg_ptr + slot[:, None] * Rg + rg[None, :], (scale * dzg).to(dzg_ptr.dtype.element_ty),
                     mask=ok[:, None] & rg_ok[None, :])
        if HAS_RU:
            tl.store(dzu_ptr + slot[:, None] * Ru + ru[None, :], (scale * dzu).to(dzu_ptr.dtype.element_ty),
                     mask=ok[:, None] & ru_ok[None, :])
    else:
        n_i = tl.cdiv(I, BLOCK_I)
        e = (pid - n_tok) // n_i
        i = ((pid - n_tok) % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < I
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        bg = tl.load(bg_ptr + e * s_bge + i[None, :] * s_bgi + rg[:, None] * s_bgr,
                     mask=rg_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        bu = tl.load(bu_ptr + e * s_bue + i[None, :] * s_bui + ru[:, None] * s_bur,
                     mask=ru_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        ad = tl.load(ad_ptr + e * s_ade + rd[:, None] * s_adr + i[None, :] * s_adi,
                     mask=rd_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        dbg = tl.zeros((BLOCK_I, BLOCK_RG), dtype=tl.float32)
        dbu = tl.zeros((BLOCK_I, BLOCK_RU), dtype=tl.float32)
        dad = tl.zeros((BLOCK_RD, BLOCK_I), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_M):
            pos = p0 + tl.arange(0, BLOCK_M)
            ok = pos < end
            slot = tl.load(order_ptr + pos, mask=ok, other=0)
            t = slot // K
            m = ok[:, None] & i_ok[None, :]
            zg = tl.load(zg_ptr + slot[:, None] * s_zgs + rg[None, :] * s_zgr, mask=ok[:, None] & rg_ok[None, :],
                         other=0.0).to(tl.float32)
            zu = tl.load(zu_ptr + slot[:, None] * s_zus + ru[None, :] * s_zur, mask=ok[:, None] & ru_ok[None, :],
                         other=0.0).to(tl.float32)
            gzd = tl.load(gzd_ptr + slot[:, None] * s_gzs + rd[None, :] * s_gzr, mask=ok[:, None] & rd_ok[None, :],
                          other=0.0).to(tl.float32)
            w = tl.load(w_ptr + t * s_wt + (slot % K) * s_wk, mask=ok, other=0.0).to(tl.float32)
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
                dad = tl.dot(tl.trans(gzd), tl.where(m, h, 0.0), dad, input_precision=FP32_DOT)
            dg = dh * act_grad(g, ACT)
            if HAS_U:
                dg = dg * u
                if HAS_RU:
                    dbu = tl.dot(tl.trans(tl.where(m, dh * a, 0.0)), zu, dbu, input_precision=FP32_DOT)
            if HAS_RG:
                dbg = tl.dot(tl.trans(tl.where(m, dg, 0.0)), zg, dbg, input_precision=FP32_DOT)
        if HAS_RG:
            tl.store(dbg_ptr + e * I * Rg + i[:, None] * Rg + rg[None, :], (scale * dbg).to(dbg_ptr.dtype.element_ty),
                     mask=i_ok[:, None] & rg_ok[None, :])
        if HAS_RU:
            tl.store(dbu_ptr + e * I * Ru + i[:, None] * Ru + ru[None, :], (scale * dbu).to(dbu_ptr.dtype.element_ty),
                     mask=i_ok[:, None] & ru_ok[None, :])
        if HAS_RD:
            if HAS_DROPOUT:
                dad = dad * keep_scale
            tl.store(dad_ptr + e * Rd * I + rd[:, None] * I + i[None, :], dad.to(dad_ptr.dtype.element_ty),
                     mask=rd_ok[:, None] & i_ok[None, :])


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _meta(K, Rg, Ru, Rd, U, act, dropout_p):
    kp = triton.next_power_of_2(K)
    return dict(ACT=act, HAS_U=U is not None, HAS_RG=Rg > 0, HAS_RU=Ru > 0, HAS_RD=Rd > 0, HAS_DROPOUT=dropout_p > 0,
                BLOCK_T=max(1, _ROWS // kp), KP=kp, BLOCK_I=_BLOCK_I, BLOCK_RG=dot_block(Rg),
                BLOCK_RU=dot_block(Ru), BLOCK_RD=dot_block(Rd))


def expand_act_combine_forward(G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor, Bg: torch.Tensor,
                               zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                               order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float,
                               activation_name: str, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `mixlora::expand_act_combine` -> (hbar (T, I) like G, zd (S, Rd) fp32); see the op for semantics.

    Grid (cdiv(T, BLOCK_T),): one token-major program per BLOCK_T tokens, looping over I tiles, so G and U are read
    once and zd (a reduction over I) stays in registers. `order` and `offsets` are not needed by this kernel.
    """
    op = "expand_act_combine"
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p)
    check_supported(op, ("G", G), ("U", U), ("zg", zg), ("Bg", Bg), ("zu", zu), ("Bu", Bu), ("weights", weights),
                    ("Ad", Ad))
    (T, I), (_, K), E = G.shape, experts.shape, Bg.shape[0]
    Rg, Ru, Rd = zg.shape[1], zu.shape[1], Ad.shape[1]
    hbar = torch.empty(T, I, dtype=G.dtype, device=G.device)
    zd = torch.empty(T * K, Rd, dtype=torch.float32, device=G.device)
    if T == 0 or I == 0 or K == 0:
        return hbar.zero_(), zd.zero_()
    meta = _meta(K, Rg, Ru, Rd, U, activation_name, dropout_p)
    Uarg = G if U is None else U
    _expand_act_combine_fwd_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](
        G, Uarg, zg, Bg, zu, Bu, weights, experts, Ad, hbar, zd, T, I, K, E, Rg, Ru, Rd, scale,
        seed & 0xFFFFFFFF, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        *_strides(G, Uarg, zg, Bg, zu, Bu, weights, experts, Ad), **meta)
    return hbar, zd


def expand_act_combine_backward(
        grad_hbar: torch.Tensor, grad_zd: torch.Tensor, G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor,
        Bg: torch.Tensor, zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float, activation_name: str,
        dropout_p: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Triton `mixlora::expand_act_combine_backward` -> (dG, dU, dzg, dBg, dzu, dBu, dweights, dAd), each like its
    input (dU empty when U is None).

    One launch, grid (cdiv(T, BLOCK_T) + E * cdiv(I, BLOCK_I),): token-major programs for dG, dU, dzg, dzu, dweights,
    then per-(expert, I tile) programs for dBg, dBu, dAd. g, u, h are recomputed by both roles.
    """
    op = "expand_act_combine_backward"
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p,
                             grad_hbar, grad_zd)
    check_supported(op, ("grad_hbar", grad_hbar), ("grad_zd", grad_zd), ("G", G), ("U", U), ("zg", zg), ("Bg", Bg),
                    ("zu", zu), ("Bu", Bu), ("weights", weights), ("Ad", Ad))
    (T, I), (_, K), E = G.shape, experts.shape, Bg.shape[0]
    Rg, Ru, Rd = zg.shape[1], zu.shape[1], Ad.shape[1]

    def new(shape, like):  # every element is written by the kernel (or the early return zeroes it)
        return torch.empty(shape, dtype=like.dtype, device=G.device)

    dG = new((T, I), G)
    dU = G.new_empty(0) if U is None else new((T, I), U)
    dzg, dBg, dzu, dBu = new(zg.shape, zg), new(Bg.shape, Bg), new(zu.shape, zu), new(Bu.shape, Bu)
    dw, dAd = new(weights.shape, weights), new(Ad.shape, Ad)
    if T == 0 or I == 0 or K == 0:
        return tuple(t.zero_() for t in (dG, dU, dzg, dBg, dzu, dBu, dw, dAd))
    meta = _meta(K, Rg, Ru, Rd, U, activation_name, dropout_p)
    Uarg = G if U is None else U
    grid = (triton.cdiv(T, meta["BLOCK_T"]) + E * triton.cdiv(I, _BLOCK_I),)
    _expand_act_combine_bwd_kernel[grid](
        grad_hbar, grad_zd, G, Uarg, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad,
        dG, dG if U is None else dU, dzg, dBg, dzu, dBu, dw, dAd, T, I, K, E, Rg, Ru, Rd, scale,
        seed & 0xFFFFFFFF, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        *_strides(grad_hbar, grad_zd, G, Uarg, zg, Bg, zu, Bu, weights, experts, Ad), BLOCK_M=_BLOCK_M, **meta)
    return dG, dU, dzg, dBg, dzu, dBu, dw, dAd

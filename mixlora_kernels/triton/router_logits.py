"""Triton launchers for `mixlora::router_logits` (logits = x W_gᵀ) and `mixlora::router_logits_backward`.

Exact fp32 on SIMT FMA units: x is read once per launch in its own dtype and widened in registers (exact), the
router weight W (E, H) is multiplied as it is (fp32 in the model: no tf32, no bf16 rounding of it, no `tl.dot`;
benchmarks/sm90_cost checks that none of these kernels has a dot or an MMA), every sum accumulates in fp32. E is
small (8 in the model): each program keeps one fp32 accumulator tile per expert (unrolled), so a loaded element of
x feeds E FMAs, and no reduction crosses threads inside a loop.

Launches and their HBM bytes (T tokens, H hidden, E experts, 16-bit x: 2 bytes, the rest fp32), about 6 bytes per
(T, H) element in all against the torch path's 30 (x.to(fp32) copies, an fp32 dx):
    forward      _router_logits_fwd_kernel         x (T H 2) + W (E H 4) + logits (T E 4)
    backward     _router_logits_dx_kernel          grad (T E 4) + W (E H 4) + dx (T H 2)
                 _router_logits_dw_partial_kernel  grad (T E 4) + x (T H 2) + partials (cdiv(T, CHUNK_T) E H 4)
                 _router_logits_dw_kernel          partials + dW (E H 4)
(the partials are 4 E / CHUNK_T bytes per element each way: 0.03 at E 8). dx and dW do not share a launch: dx
needs no x, so a fused kernel would save no traffic and would hold both W's tile and dW's accumulators.

dW is deterministic: T is cut into fixed chunks of CHUNK_T rows; a program sums its chunk's row blocks in order into
a partial (E, H) tile, and the last launch adds the cdiv(T, CHUNK_T) partials in chunk order. No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check_router_logits
from mixlora_kernels.triton._common import check_supported, round_to

# Experts per program: one fp32 accumulator tile each, unrolled (a tuple). E <= MAX_EG (8 in the model) is one
# group; more experts take more programs (the forward, dW: a grid axis, x read once per group) or, for dx, a loop.
MAX_EG = 8
# Tiles (rows x columns) per program, 4 warps: with 16-bit x each thread holds one row x 8 columns of a 32 x 32
# tile (one 16-byte access), so its E accumulators are 8 E registers. Untuned (no GPU this session): chosen with
# benchmarks/sm90_cost (registers, issue slots).
_FWD_BLOCK_T, _FWD_BLOCK_H = 32, 32
# The forward's register cap: without it ptxas 13 (Triton 3.8, --regAllocOptLevel=2) allocates 96 registers and
# spills inside the H loop; at 128 it does not spill (4 warps: 4 programs per SM still fit).
_FWD_MAXNREG = 128
_DX_BLOCK_T, _DX_BLOCK_H = 32, 32
_DW_BLOCK_T, _DW_BLOCK_H = 32, 32
# Rows of T per dW partial: fixed, so the summation order (and the result) depends on T alone. A multiple of the
# backward's BLOCK_T.
CHUNK_T = 1024
_DW_SUM_BLOCK = 256


@triton.jit
def _router_logits_fwd_kernel(x_ptr, w_ptr, out_ptr, T, H, E, stride_xt, stride_xh, stride_we, stride_wh,
                              EG: tl.constexpr, ONE_GROUP: tl.constexpr, EVEN_T: tl.constexpr, EVEN_H: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """logits[t, e] = sum_h x[t, h] W[e, h] for BLOCK_T rows and the EG experts of group program_id(1): one fp32
    accumulator tile (BLOCK_T, BLOCK_H) per expert, FMAs along the H loop in x's layout (no shuffles), one
    reduction over H at the end. EVEN_T / EVEN_H: no row / column masks."""
    t = tl.cast(tl.program_id(0), tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    if ONE_GROUP:
        e0 = 0
    else:
        e0 = tl.program_id(1) * EG
    x_rows = x_ptr + t[:, None] * stride_xt
    accs = ()
    for e in tl.static_range(EG):
        accs = accs + (tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32),)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        x_ptrs = x_rows + h[None, :] * stride_xh
        if EVEN_T and EVEN_H:
            xt = tl.load(x_ptrs)
        elif EVEN_H:
            xt = tl.load(x_ptrs, mask=t_ok[:, None], other=0.0)
        else:
            xt = tl.load(x_ptrs, mask=t_ok[:, None] & (h < H)[None, :], other=0.0)
        xt = xt.to(tl.float32)
        new = ()
        for e in tl.static_range(EG):
            if ONE_GROUP:
                w_ptrs = w_ptr + e * stride_we + h[None, :] * stride_wh
            else:  # experts past E (the last group) read expert E - 1; their logits are not stored
                w_ptrs = w_ptr + tl.minimum(e0 + e, E - 1) * stride_we + h[None, :] * stride_wh
            if EVEN_H:
                we = tl.load(w_ptrs)
            else:
                we = tl.load(w_ptrs, mask=(h < H)[None, :], other=0.0)
            new = new + (accs[e] + xt * we.to(tl.float32),)
        accs = new
    for e in tl.static_range(EG):
        tl.store(out_ptr + t * E + e0 + e, tl.sum(accs[e], axis=1), mask=t_ok & (e0 + e < E))


@triton.jit
def _router_logits_dx_kernel(g_ptr, w_ptr, dx_ptr, T, H, E, stride_gt, stride_ge, stride_we, stride_wh,
                             EG: tl.constexpr, ONE_GROUP: tl.constexpr, EVEN_T: tl.constexpr, EVEN_H: tl.constexpr,
                             CHUNK_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """dx[t, h] = sum_e g[t, e] W[e, h] (fp32 FMAs, stored in dx's dtype) for the rows of chunk program_id(0) and
    the H tile program_id(1). The first EG experts' W tile stays in registers for the whole chunk; experts past EG
    (E > MAX_EG only) are read per row block."""
    c = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    # W's tile as a (BLOCK_T, BLOCK_H) block of identical rows: loaded straight into the layout of the dx tile
    rows0 = tl.zeros((BLOCK_T, 1), dtype=tl.int32)
    ws = ()
    for e in tl.static_range(EG):
        w_ptrs = w_ptr + rows0 + e * stride_we + h[None, :] * stride_wh
        if EVEN_H:
            ws = ws + (tl.load(w_ptrs).to(tl.float32),)
        else:
            ws = ws + (tl.load(w_ptrs, mask=(rows0 == 0) & h_ok[None, :], other=0.0).to(tl.float32),)
    t_first = tl.cast(c, tl.int64) * CHUNK_T
    t_stop = tl.minimum(t_first + CHUNK_T, T)
    for t0 in range(t_first, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_stop
        dx = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for e in tl.static_range(EG):
            if EVEN_T:
                ge = tl.load(g_ptr + t * stride_gt + e * stride_ge)
            else:
                ge = tl.load(g_ptr + t * stride_gt + e * stride_ge, mask=t_ok, other=0.0)
            dx += ge.to(tl.float32)[:, None] * ws[e]
        if not ONE_GROUP:
            for ee in range(EG, E):
                ge = tl.load(g_ptr + t * stride_gt + ee * stride_ge, mask=t_ok, other=0.0)
                we = tl.load(w_ptr + ee * stride_we + h * stride_wh, mask=h_ok, other=0.0)
                dx += ge.to(tl.float32)[:, None] * we.to(tl.float32)[None, :]
        dx_ptrs = dx_ptr + t[:, None] * H + h[None, :]
        if EVEN_T and EVEN_H:
            tl.store(dx_ptrs, round_to(dx, dx_ptr.dtype.element_ty))
        else:
            tl.store(dx_ptrs, round_to(dx, dx_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def _router_logits_dw_partial_kernel(g_ptr, x_ptr, part_ptr, T, H, E, stride_gt, stride_ge, stride_xt, stride_xh,
                                     EG: tl.constexpr, ONE_GROUP: tl.constexpr, EVEN_T: tl.constexpr,
                                     EVEN_H: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_T: tl.constexpr,
                                     BLOCK_H: tl.constexpr):
    """part[c, e, h] = sum_{t in chunk c} g[t, e] x[t, h] (fp32) for the EG experts of group program_id(2) and the
    H tile program_id(1): one (BLOCK_T, BLOCK_H) accumulator per expert along the chunk's row blocks (in order),
    one reduction over the rows at the end."""
    c = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    if ONE_GROUP:
        e0 = 0
    else:
        e0 = tl.program_id(2) * EG
    accs = ()
    for e in tl.static_range(EG):
        accs = accs + (tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32),)
    t_first = tl.cast(c, tl.int64) * CHUNK_T
    t_stop = tl.minimum(t_first + CHUNK_T, T)
    for t0 in range(t_first, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_stop
        x_ptrs = x_ptr + t[:, None] * stride_xt + h[None, :] * stride_xh
        if EVEN_T and EVEN_H:
            xt = tl.load(x_ptrs)
        elif EVEN_H:
            xt = tl.load(x_ptrs, mask=t_ok[:, None], other=0.0)
        else:
            xt = tl.load(x_ptrs, mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        xt = xt.to(tl.float32)
        new = ()
        for e in tl.static_range(EG):
            if ONE_GROUP:
                g_ptrs = g_ptr + t * stride_gt + e * stride_ge
            else:  # experts past E (the last group) read expert E - 1; their partials are not stored
                g_ptrs = g_ptr + t * stride_gt + tl.minimum(e0 + e, E - 1) * stride_ge
            if EVEN_T:
                ge = tl.load(g_ptrs)
            else:
                ge = tl.load(g_ptrs, mask=t_ok, other=0.0)
            new = new + (accs[e] + ge.to(tl.float32)[:, None] * xt,)
        accs = new
    for e in tl.static_range(EG):
        tl.store(part_ptr + (tl.cast(c, tl.int64) * E + e0 + e) * H + h, tl.sum(accs[e], axis=0),
                 mask=h_ok & (e0 + e < E))


@triton.jit
def _router_logits_dw_kernel(part_ptr, dw_ptr, N, n_chunks, BLOCK: tl.constexpr):
    """dW.flat[i] = sum_c part[c].flat[i] over the chunks in order c = 0, 1, ...: the fixed-order sum."""
    i = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(part_ptr + c * N + i, mask=ok, other=0.0)
    tl.store(dw_ptr + i, round_to(acc, dw_ptr.dtype.element_ty), mask=ok)


def router_logits_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton `mixlora::router_logits`: x (T, H) fp32/bf16/fp16, weight (E, H) -> logits (T, E) fp32.

    Grid (cdiv(T, BLOCK_T), cdiv(E, MAX_EG)); each program streams its rows of x once along H."""
    check_router_logits(x, weight)
    check_supported("router_logits", ("x", x), ("weight", weight))
    (T, H), E = x.shape, weight.shape[0]
    out = torch.empty(T, E, dtype=torch.float32, device=x.device)
    if T == 0 or E == 0:
        return out
    if H == 0:
        return out.zero_()
    eg = min(E, MAX_EG)
    _router_logits_fwd_kernel[(triton.cdiv(T, _FWD_BLOCK_T), triton.cdiv(E, eg))](
        x, weight, out, T, H, E, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        EG=eg, ONE_GROUP=eg == E, EVEN_T=T % _FWD_BLOCK_T == 0, EVEN_H=H % _FWD_BLOCK_H == 0,
        BLOCK_T=_FWD_BLOCK_T, BLOCK_H=_FWD_BLOCK_H, maxnreg=_FWD_MAXNREG)
    return out


def router_logits_backward(grad: torch.Tensor, x: torch.Tensor,
                           weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `mixlora::router_logits_backward`: grad (T, E) -> (dx (T, H) in x's dtype, dW (E, H) in weight's).

    Three launches: dx, grid (cdiv(T, CHUNK_T), cdiv(H, BLOCK_H)); the per-chunk dW partials, grid
    (cdiv(T, CHUNK_T), cdiv(H, BLOCK_H), cdiv(E, MAX_EG)); their sum in chunk order, grid cdiv(E * H, _DW_SUM_BLOCK).
    Deterministic, no atomics."""
    check_router_logits(x, weight, grad)
    check_supported("router_logits_backward", ("grad", grad), ("x", x), ("weight", weight))
    (T, H), E = x.shape, weight.shape[0]
    dx = torch.empty(T, H, dtype=x.dtype, device=x.device)
    dw = torch.empty(E, H, dtype=weight.dtype, device=x.device)
    if T == 0 or E == 0 or H == 0:
        return dx.zero_(), dw.zero_()
    assert CHUNK_T % _DX_BLOCK_T == 0 and CHUNK_T % _DW_BLOCK_T == 0  # EVEN_T: every row block of a chunk is full
    n_chunks = triton.cdiv(T, CHUNK_T)
    eg = min(E, MAX_EG)
    _router_logits_dx_kernel[(n_chunks, triton.cdiv(H, _DX_BLOCK_H))](
        grad, weight, dx, T, H, E, grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
        EG=eg, ONE_GROUP=eg == E, EVEN_T=T % _DX_BLOCK_T == 0, EVEN_H=H % _DX_BLOCK_H == 0, CHUNK_T=CHUNK_T,
        BLOCK_T=_DX_BLOCK_T, BLOCK_H=_DX_BLOCK_H)
    part = torch.empty(n_chunks, E, H, dtype=torch.float32, device=x.device)
    _router_logits_dw_partial_kernel[(n_chunks, triton.cdiv(H, _DW_BLOCK_H), triton.cdiv(E, eg))](
        grad, x, part, T, H, E, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        EG=eg, ONE_GROUP=eg == E, EVEN_T=T % _DW_BLOCK_T == 0, EVEN_H=H % _DW_BLOCK_H == 0, CHUNK_T=CHUNK_T,
        BLOCK_T=_DW_BLOCK_T, BLOCK_H=_DW_BLOCK_H)
    _router_logits_dw_kernel[(triton.cdiv(E * H, _DW_SUM_BLOCK),)](part, dw, E * H, n_chunks, BLOCK=_DW_SUM_BLOCK)
    return dx, dw

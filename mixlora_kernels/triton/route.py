"""Triton launchers for `mixlora::route` (softmax, top-k, renormalise, fused) and `mixlora::route_backward`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check_route, check_route_backward
from mixlora_kernels.triton._common import check_supported

# Rows per program: E is small (8-64), so a (64, next_pow2(E)) tile of logits is a few KB of registers. Untuned.
_BLOCK_T = 64


@triton.jit
def _route_fwd_kernel(logits_ptr, w_ptr, e_ptr, T, E, stride_lt, stride_le,
                      K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: p = softmax(logits) in fp32, K rounds of (max, lowest index attaining it, knock out), renormalise."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    col = tl.arange(0, BLOCK_E)
    col_ok = col < E
    x = tl.load(logits_ptr + t[:, None] * stride_lt + col[None, :] * stride_le,
                mask=t_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))  # rows past T stay finite (0): no NaN in dead rows
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    # NaN (a row with a NaN logit) ranks above every probability, ties to the lower id, as in the reference: the
    # key 2.0 (> any probability) selects it and the weight comes back as NaN. Padding columns can never win.
    p = tl.where(col_ok[None, :], tl.where(p != p, 2.0, p), -1.0)
    kcol = tl.arange(0, BLOCK_K)
    sel_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    sel_e = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], col[None, :], BLOCK_E), axis=1)
        sel_w = tl.where(kcol[None, :] == k, tl.where(best > 1.5, float("nan"), best)[:, None], sel_w)
        sel_e = tl.where(kcol[None, :] == k, idx.to(tl.int64)[:, None], sel_e)
        p = tl.where(col[None, :] == idx[:, None], -2.0, p)
    sel_w = sel_w / tl.sum(sel_w, axis=1)[:, None]
    m = t_ok[:, None] & (kcol < K)[None, :]
    tl.store(w_ptr + t[:, None] * K + kcol[None, :], sel_w, mask=m)
    tl.store(e_ptr + t[:, None] * K + kcol[None, :], sel_e, mask=m)


@triton.jit
def _route_bwd_kernel(gw_ptr, w_ptr, e_ptr, out_ptr, T, E, stride_gt, stride_gk, stride_wt, stride_wk,
                      stride_et, stride_ek, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """dlogits[t, e_k] += w_k (g_k - sum_k' w_k' g_k'); other logits 0. Token-major, written once (no atomics)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    col = tl.arange(0, BLOCK_E)
    wg = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(K):
        g = tl.load(gw_ptr + t * stride_gt + k * stride_gk, mask=t_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + t * stride_wt + k * stride_wk, mask=t_ok, other=0.0).to(tl.float32)
        wg += w * g
    out = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(K):
        g = tl.load(gw_ptr + t * stride_gt + k * stride_gk, mask=t_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + t * stride_wt + k * stride_wk, mask=t_ok, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + t * stride_et + k * stride_ek, mask=t_ok, other=-1)
        out += tl.where(col[None, :] == e[:, None], (w * (g - wg))[:, None], 0.0)
    tl.store(out_ptr + t[:, None] * E + col[None, :], out.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (col < E)[None, :])


def route_forward(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `mixlora::route`: logits (T, E) -> (weights (T, K) fp32, experts (T, K) int64), descending probability
    (ties go to the lower expert id). Grid (cdiv(T, BLOCK_T),), the whole E row in one tile."""
    check_route(logits, top_k)
    T, E = logits.shape
    check_supported("route", ("logits", logits))
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        _route_fwd_kernel[(triton.cdiv(T, _BLOCK_T),)](
            logits, weights, experts, T, E, logits.stride(0), logits.stride(1), K=top_k, BLOCK_T=_BLOCK_T,
            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k))
    return weights, experts


def route_backward(grad_weights: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                   num_experts: int) -> torch.Tensor:
    """Triton `mixlora::route_backward`: (T, K) grads of the renormalised weights -> (T, E) logits grad, dtype
    promoted from weights and grad_weights like the reference. Grid (cdiv(T, BLOCK_T),)."""
    op = "route_backward"
    check_route_backward(grad_weights, weights, experts, num_experts)
    check_supported(op, ("grad_weights", grad_weights), ("weights", weights), ("experts", experts))
    T, K = weights.shape
    out = torch.empty(T, num_experts, dtype=torch.result_type(weights, grad_weights), device=weights.device)
    if T:
        _route_bwd_kernel[(triton.cdiv(T, _BLOCK_T),)](
            grad_weights, weights, experts, out, T, num_experts, grad_weights.stride(0), grad_weights.stride(1),
            weights.stride(0), weights.stride(1), experts.stride(0), experts.stride(1),
            K=K, BLOCK_T=_BLOCK_T, BLOCK_E=triton.next_power_of_2(num_experts))
    return out

"""mixlora::expand_act_combine — per-slot gate/up LoRA expand on the shared base, activation, routing-weighted
combine h̄ and the down-LoRA shrink, fused; and its backward (recomputes g, u, h instead of storing them)."""

from __future__ import annotations

from typing import Optional

import torch

from mixlora_kernels import backend
from mixlora_kernels.checks import check_expand_act_combine
from mixlora_kernels.activations import activation, activation_grad
from mixlora_kernels.ops._common import acc_dtype, dropout_scale, reference, segments


def _recompute(G, U, zg, Bg, zu, Bu, e, slots, K, scale, act, acc):
    """g, u, σ(g) of the slots routed to expert e (u is None for an ungated FFN)."""
    tokens = slots // K
    g = G[tokens].to(acc) + scale * (zg[slots].to(acc) @ Bg[e].to(acc).T)
    u = None if U is None else U[tokens].to(acc) + scale * (zu[slots].to(acc) @ Bu[e].to(acc).T)
    return g, u, activation(act, g)


@reference
def expand_act_combine_reference(
        G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor, Bg: torch.Tensor, zu: torch.Tensor,
        Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
        Ad: torch.Tensor, scale: float, activation_name: str, dropout_p: float,
        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert part of a MixLoRA FFN between the dense gate/up GEMMs and the dense down GEMM.

    Per slot j = (token t, expert e, weight w):
        g_j = G_t + s Bg_e zg_j;  u_j = U_t + s Bu_e zu_j;  h_j = σ(g_j) ⊙ u_j  (h_j = σ(g_j) when U is None)
    Args:
        G, U: (T, I) base gate/up projections W1 x, W3 x (U None for an ungated FFN such as Phi's fc1/fc2).
        zg, zu: (S, Rg), (S, Ru) slot-order shrinks from `lora_shrink`; Bg, Bu: (E, I, Rg), (E, I, Ru). Rank 0 means
            that projection has no expert LoRA.
        weights: (T, K) routing weights; experts (T, K), order (S,), offsets (E+1,) from routing.
        Ad: (E, Rd, I) down-projection LoRA A (Rd may be 0). scale: s. activation_name: one of ACTIVATIONS.
        dropout_p, seed: LoRA dropout on the down LoRA input h_j (per slot, regenerated in backward).
    Returns:
        hbar (T, I) in G's dtype: Σ_k w_j h_j;  zd (S, Rd) fp32 (fp64 for fp64 input): Ad_e drop_j(h_j).
    """
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p)
    acc = acc_dtype(G, zg, Bg)
    T, K = experts.shape
    h_slots = G.new_zeros(T * K, G.shape[1], dtype=acc)
    zd = G.new_zeros(T * K, Ad.shape[1], dtype=acc)
    for e, start, end in segments(offsets):
        slots = order[start:end]
        g, u, a = _recompute(G, U, zg, Bg, zu, Bu, e, slots, K, scale, activation_name, acc)
        h = a if u is None else a * u
        h_slots[slots] = h
        if dropout_p:
            h = h * dropout_scale(slots, G.shape[1], dropout_p, seed, acc)
        zd[slots] = h @ Ad[e].to(acc).T
    hbar = (h_slots.view(T, K, -1) * weights.to(acc).unsqueeze(-1)).sum(1)
    return hbar.to(G.dtype), zd


expand_act_combine = torch.library.custom_op(
    "mixlora::expand_act_combine", expand_act_combine_reference, mutates_args=())


@expand_act_combine.register_fake
def _(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, scale, activation_name, dropout_p, seed):
    return torch.empty_like(G), G.new_empty(experts.numel(), Ad.shape[1], dtype=acc_dtype(G, zg, Bg))


@reference
def expand_act_combine_backward_reference(
        grad_hbar: torch.Tensor, grad_zd: torch.Tensor, G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor,
        Bg: torch.Tensor, zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float, activation_name: str,
        dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `expand_act_combine`: (dG, dU, dzg, dBg, dzu, dBu, dweights, dAd), each like its input
    (dU is empty when U is None). g, u, h are recomputed from G, U and the rank-R inputs:
        dh_j = w_j dH̄_t + drop_j(Ad_eᵀ dzd_j);  dw_j = ⟨dH̄_t, h_j⟩;  dg_j = dh_j ⊙ u_j ⊙ σ'(g_j);  du_j = dh_j ⊙ σ(g_j)
    dG, dU sum the K slots of each token (token-major, no atomics); LoRA weight grads are per-expert segment sums.
    """
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p,
                             grad_hbar, grad_zd)
    acc = acc_dtype(G, zg, Bg)
    T, K = experts.shape
    S, I = T * K, G.shape[1]
    dg_slots = G.new_zeros(S, I, dtype=acc)
    du_slots = G.new_zeros(S, I, dtype=acc) if U is not None else None
    dzg, dzu = torch.zeros_like(zg, dtype=acc), torch.zeros_like(zu, dtype=acc)
    dBg, dBu, dAd = (torch.zeros_like(t, dtype=acc) for t in (Bg, Bu, Ad))
    dweights = torch.zeros_like(weights, dtype=acc)
    w_flat, dw_flat = weights.reshape(-1).to(acc), dweights.view(-1)
    for e, start, end in segments(offsets):
        slots = order[start:end]
        tokens = slots // K
        g, u, a = _recompute(G, U, zg, Bg, zu, Bu, e, slots, K, scale, activation_name, acc)
        h = a if u is None else a * u
        gh = grad_hbar[tokens].to(acc)
        gzd = grad_zd[slots].to(acc)
        back_down = gzd @ Ad[e].to(acc)
        if dropout_p:
            mask = dropout_scale(slots, I, dropout_p, seed, acc)
            back_down, h_in = back_down * mask, h * mask
        else:
            h_in = h
        dAd[e] = gzd.T @ h_in
        dw_flat[slots] = (gh * h).sum(-1)
        dh = w_flat[slots].unsqueeze(-1) * gh + back_down
        dg = dh * activation_grad(activation_name, g) * (1 if u is None else u)
        dg_slots[slots] = dg
        dzg[slots] = scale * (dg @ Bg[e].to(acc))
        dBg[e] = scale * (dg.T @ zg[slots].to(acc))
        if u is not None:
            du = dh * a
            du_slots[slots] = du
            dzu[slots] = scale * (du @ Bu[e].to(acc))
            dBu[e] = scale * (du.T @ zu[slots].to(acc))
    dG = dg_slots.view(T, K, I).sum(1).to(G.dtype)
    dU = G.new_empty(0) if U is None else du_slots.view(T, K, I).sum(1).to(U.dtype)
    return (dG, dU, dzg.to(zg.dtype), dBg.to(Bg.dtype), dzu.to(zu.dtype), dBu.to(Bu.dtype),
            dweights.to(weights.dtype), dAd.to(Ad.dtype))


expand_act_combine_backward = torch.library.custom_op(
    "mixlora::expand_act_combine_backward", expand_act_combine_backward_reference, mutates_args=())


@expand_act_combine_backward.register_fake
def _(grad_hbar, grad_zd, G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, scale, activation_name,
      dropout_p, seed):
    dU = G.new_empty(0) if U is None else torch.empty_like(U)
    return (torch.empty_like(G), dU, torch.empty_like(zg), torch.empty_like(Bg), torch.empty_like(zu),
            torch.empty_like(Bu), torch.empty_like(weights), torch.empty_like(Ad))


def _setup_context(ctx, inputs, output):
    G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, scale, act, dropout_p, seed = inputs
    ctx.save_for_backward(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad)
    ctx.args = (scale, act, dropout_p, seed)


def _backward(ctx, grad_hbar, grad_zd):
    G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad = ctx.saved_tensors
    dG, dU, dzg, dBg, dzu, dBu, dw, dAd = expand_act_combine_backward(
        grad_hbar.contiguous(), grad_zd.contiguous(), G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad,
        *ctx.args)
    return dG, (None if U is None else dU), dzg, dBg, dzu, dBu, dw, None, None, None, dAd, None, None, None, None


expand_act_combine.register_autograd(_backward, setup_context=_setup_context)

backend.install(expand_act_combine, "expand_act_combine", expand_act_combine_reference)
backend.install(expand_act_combine_backward, "expand_act_combine_backward", expand_act_combine_backward_reference)

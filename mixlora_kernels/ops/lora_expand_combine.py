"""mixlora::lora_expand_combine — routing-weighted down-LoRA expand y_t = s Σ_k w_j B_e zd_j, and its backward."""

from __future__ import annotations

import torch

from mixlora_kernels import backend
from mixlora_kernels.checks import check_lora_expand_combine
from mixlora_kernels.ops._common import acc_dtype, reference, segments


@reference
def lora_expand_combine_reference(zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                                  order: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """Down-projection LoRA of all slots, combined per token.

    Args:
        zd: (S, R) slot-order down shrinks from `expand_act_combine`; B: (E, H, R) stacked LoRA B.
        weights: (T, K) routing weights; experts (T, K), order (S,), offsets (E+1,) from routing. scale: s.
    Returns:
        (T, H) fp32 (fp64 for fp64 input): s Σ_k w_j B_{e_j} zd_j, to add to the dense W2 h̄.
    """
    check_lora_expand_combine(zd, B, weights, experts, order, offsets)
    acc = acc_dtype(zd, B)
    T, K = experts.shape
    y_slots = zd.new_zeros(T * K, B.shape[1], dtype=acc)
    for e, start, end in segments(offsets):
        slots = order[start:end]
        y_slots[slots] = zd[slots].to(acc) @ B[e].to(acc).T
    return scale * (y_slots.view(T, K, -1) * weights.to(acc).unsqueeze(-1)).sum(1)


lora_expand_combine = torch.library.custom_op(
    "mixlora::lora_expand_combine", lora_expand_combine_reference, mutates_args=())


@lora_expand_combine.register_fake
def _(zd, B, weights, experts, order, offsets, scale):
    return zd.new_empty(experts.shape[0], B.shape[1], dtype=acc_dtype(zd, B))


@reference
def lora_expand_combine_backward_reference(grad_y: torch.Tensor, zd: torch.Tensor, B: torch.Tensor,
                                           weights: torch.Tensor, experts: torch.Tensor, order: torch.Tensor,
                                           offsets: torch.Tensor,
                                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dzd, dB, dweights) of `lora_expand_combine`, each like its input. With q_j = s B_eᵀ dy_t:
    dzd_j = w_j q_j;  dw_j = ⟨q_j, zd_j⟩;  dB_e = s Σ_{j→e} w_j dy_t zd_jᵀ (per expert segment)."""
    check_lora_expand_combine(zd, B, weights, experts, order, offsets, grad_y)
    acc = acc_dtype(zd, B)
    K = experts.shape[1]
    dzd = torch.zeros_like(zd, dtype=acc)
    dB = torch.zeros_like(B, dtype=acc)
    dweights = torch.zeros_like(weights, dtype=acc)
    w_flat, dw_flat = weights.reshape(-1).to(acc), dweights.view(-1)
    for e, start, end in segments(offsets):
        slots = order[start:end]
        gy = grad_y[slots // K].to(acc)
        z = zd[slots].to(acc)
        q = scale * (gy @ B[e].to(acc))
        w = w_flat[slots].unsqueeze(-1)
        dzd[slots] = w * q
        dw_flat[slots] = (q * z).sum(-1)
        dB[e] = scale * ((w * gy).T @ z)
    return dzd.to(zd.dtype), dB.to(B.dtype), dweights.to(weights.dtype)


lora_expand_combine_backward = torch.library.custom_op(
    "mixlora::lora_expand_combine_backward", lora_expand_combine_backward_reference, mutates_args=())


@lora_expand_combine_backward.register_fake
def _(grad_y, zd, B, weights, experts, order, offsets, scale):
    return torch.empty_like(zd), torch.empty_like(B), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    zd, B, weights, experts, order, offsets, scale = inputs
    ctx.save_for_backward(zd, B, weights, experts, order, offsets)
    ctx.scale = scale


def _backward(ctx, grad_y):
    zd, B, weights, experts, order, offsets = ctx.saved_tensors
    dzd, dB, dw = lora_expand_combine_backward(grad_y.contiguous(), zd, B, weights, experts, order, offsets, ctx.scale)
    return dzd, dB, dw, None, None, None, None


lora_expand_combine.register_autograd(_backward, setup_context=_setup_context)

backend.install(lora_expand_combine, "lora_expand_combine", lora_expand_combine_reference)
backend.install(lora_expand_combine_backward, "lora_expand_combine_backward", lora_expand_combine_backward_reference)

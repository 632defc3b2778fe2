"""mixlora::lora_shrink — grouped LoRA shrink z_j = A_e drop_j(x_t) for every routing slot, and its backward."""

from __future__ import annotations

import torch

from mixlora_kernels import backend
from mixlora_kernels.checks import check_lora_shrink
from mixlora_kernels.ops._common import acc_dtype, dropout_scale, reference, segments


@reference
def lora_shrink_reference(x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor, order: torch.Tensor,
                          offsets: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """Per-slot LoRA shrink with the token gather fused in.

    Args:
        x: (T, H) activations. A: (E, R, H) stacked expert LoRA A (gate and up may be concatenated along R).
        experts: (T, K) expert ids; order (S,), offsets (E+1,) from `mixlora::sort_slots`.
        dropout_p, seed: LoRA dropout on x, per slot (mask from `dropout_scale`); p = 0 disables it.
    Returns:
        z (S, R) in slot order j = t·K + k, fp32 (fp64 for fp64 input): z_j = A_{e_j} drop_j(x_t).
    """
    check_lora_shrink(x, A, experts, order, offsets, dropout_p)
    acc = acc_dtype(x, A)
    K = experts.shape[1]
    z = x.new_zeros(experts.numel(), A.shape[1], dtype=acc)
    for e, start, end in segments(offsets):
        slots = order[start:end]
        rows = x[slots // K].to(acc)
        if dropout_p:
            rows = rows * dropout_scale(slots, x.shape[1], dropout_p, seed, acc)
        z[slots] = rows @ A[e].to(acc).T
    return z


lora_shrink = torch.library.custom_op("mixlora::lora_shrink", lora_shrink_reference, mutates_args=())


@lora_shrink.register_fake
def _(x, A, experts, order, offsets, dropout_p, seed):
    return x.new_empty(experts.numel(), A.shape[1], dtype=acc_dtype(x, A))


@reference
def lora_shrink_backward_reference(grad_z: torch.Tensor, x: torch.Tensor, A: torch.Tensor,
                                   experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, dropout_p: float,
                                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx (T, H) like x, dA (E, R, H) like A) of `lora_shrink` from grad_z (S, R).

    dx_t = Σ_k drop_j(A_eᵀ dz_j), summed token-major (no atomics); dA_e = Σ_{j→e} dz_j drop_j(x_t)ᵀ per expert segment.
    """
    check_lora_shrink(x, A, experts, order, offsets, dropout_p, grad_z)
    acc = acc_dtype(x, A)
    T, K = experts.shape
    dx_slots = x.new_zeros(experts.numel(), x.shape[1], dtype=acc)
    dA = torch.zeros_like(A, dtype=acc)
    for e, start, end in segments(offsets):
        slots = order[start:end]
        g = grad_z[slots].to(acc)
        rows = x[slots // K].to(acc)
        d_rows = g @ A[e].to(acc)
        if dropout_p:
            scale = dropout_scale(slots, x.shape[1], dropout_p, seed, acc)
            rows, d_rows = rows * scale, d_rows * scale
        dA[e] = g.T @ rows
        dx_slots[slots] = d_rows
    return dx_slots.view(T, K, -1).sum(1).to(x.dtype), dA.to(A.dtype)


lora_shrink_backward = torch.library.custom_op(
    "mixlora::lora_shrink_backward", lora_shrink_backward_reference, mutates_args=())


@lora_shrink_backward.register_fake
def _(grad_z, x, A, experts, order, offsets, dropout_p, seed):
    return torch.empty_like(x), torch.empty_like(A)


def _setup_context(ctx, inputs, output):
    x, A, experts, order, offsets, dropout_p, seed = inputs
    ctx.save_for_backward(x, A, experts, order, offsets)
    ctx.dropout_p, ctx.seed = dropout_p, seed


def _backward(ctx, grad_z):
    x, A, experts, order, offsets = ctx.saved_tensors
    dx, dA = lora_shrink_backward(grad_z.contiguous(), x, A, experts, order, offsets, ctx.dropout_p, ctx.seed)
    return dx, dA, None, None, None, None, None


lora_shrink.register_autograd(_backward, setup_context=_setup_context)

backend.install(lora_shrink, "lora_shrink", lora_shrink_reference)
backend.install(lora_shrink_backward, "lora_shrink_backward", lora_shrink_backward_reference)

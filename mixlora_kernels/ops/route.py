"""mixlora::route — router softmax, top-k and renormalisation, fused; and its backward."""

from __future__ import annotations

import torch

from mixlora_kernels import backend
from mixlora_kernels.checks import check_route, check_route_backward
from mixlora_kernels.ops._common import acc_dtype, reference


@reference
def route_reference(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of each token.

    Args:
        logits: (T, E) router logits, any float dtype (computed in fp32, fp64 for fp64 input).
        top_k: K, 1 <= K <= E.
    Returns:
        weights (T, K) fp32/fp64: softmax probabilities of the chosen experts renormalised to sum to 1;
        experts (T, K) int64: chosen expert ids, in descending probability (ties: lower id first).
    """
    check_route(logits, top_k)
    probs = torch.softmax(logits.to(acc_dtype(logits)), dim=-1)
    # NaN ranks above every number and ties go to the lower expert id, on every backend: a row with a NaN logit
    # (all-NaN probabilities) gets experts 0..K-1 with NaN weights, never an out-of-range id.
    experts = torch.sort(probs.nan_to_num(nan=float("inf")), dim=-1, descending=True, stable=True).indices
    experts = experts[:, :top_k].contiguous()
    weights = probs.gather(1, experts)
    return weights / weights.sum(dim=-1, keepdim=True), experts


route = torch.library.custom_op("mixlora::route", route_reference, mutates_args=())


@route.register_fake
def _(logits, top_k):
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=acc_dtype(logits)), logits.new_empty(shape, dtype=torch.int64)


@reference
def route_backward_reference(grad_weights: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                             num_experts: int) -> torch.Tensor:
    """Gradient of the logits (T, E) from that of the renormalised weights (T, K).

    The renormalised weights are a softmax over the chosen logits alone, so d logit_{e_k} = w_k (g_k - Σ_k' w_k' g_k')
    and the other logits get zero.
    """
    check_route_backward(grad_weights, weights, experts, num_experts)
    grad_sel = weights * (grad_weights - (weights * grad_weights).sum(dim=-1, keepdim=True))
    out = grad_sel.new_zeros(weights.shape[0], num_experts)
    return out.scatter_add_(1, experts.long(), grad_sel)


route_backward = torch.library.custom_op("mixlora::route_backward", route_backward_reference, mutates_args=())


@route_backward.register_fake
def _(grad_weights, weights, experts, num_experts):
    return weights.new_empty(weights.shape[0], num_experts)


def _setup_context(ctx, inputs, output):
    logits, _ = inputs
    weights, experts = output
    ctx.save_for_backward(weights, experts)
    ctx.num_experts = logits.shape[1]
    ctx.logits_dtype = logits.dtype


def _backward(ctx, grad_weights, _grad_experts):
    weights, experts = ctx.saved_tensors
    grad = route_backward(grad_weights.to(weights.dtype), weights, experts, ctx.num_experts)
    return grad.to(ctx.logits_dtype), None


route.register_autograd(_backward, setup_context=_setup_context)

backend.install(route, "route", route_reference)
backend.install(route_backward, "route_backward", route_backward_reference)

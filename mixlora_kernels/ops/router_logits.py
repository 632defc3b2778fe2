"""mixlora::router_logits — router logits x W_gᵀ in fp32 without saving an fp32 copy of a 16-bit x; and its
backward."""

from __future__ import annotations

import torch

from mixlora_kernels import backend
from mixlora_kernels.checks import check_router_logits
from mixlora_kernels.ops._common import acc_dtype, reference


@reference
def router_logits_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits.

    Args:
        x: (T, H) activations, any float dtype. weight: (E, H) router, fp32 (fp64 in a fp64 model).
    Returns:
        (T, E) in the router's dtype: x W_gᵀ with x upcast. Backward keeps x as it is and upcasts again, so a bf16
        model does not hold a (T, H) fp32 copy of x per layer until backward.
    """
    check_router_logits(x, weight)
    return x.to(acc_dtype(x, weight)) @ weight.to(acc_dtype(x, weight)).T


router_logits = torch.library.custom_op("mixlora::router_logits", router_logits_reference, mutates_args=())


@router_logits.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=acc_dtype(x, weight))


@reference
def router_logits_backward_reference(grad: torch.Tensor, x: torch.Tensor,
                                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx (T, H) like x, dW (E, H) like weight) of `router_logits` from grad (T, E).

    dx = grad W, dW = gradᵀ x, both with x, W and grad upcast to the accumulation dtype (fp32; fp64 in a fp64 model).
    """
    check_router_logits(x, weight, grad)
    acc = acc_dtype(grad, x, weight)
    g = grad.to(acc)
    return (g @ weight.to(acc)).to(x.dtype), (g.T @ x.to(acc)).to(weight.dtype)


router_logits_backward = torch.library.custom_op(
    "mixlora::router_logits_backward", router_logits_backward_reference, mutates_args=())


@router_logits_backward.register_fake
def _(grad, x, weight):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    # One op for both gradients (the router always trains, so both are wanted in practice); an unneeded one is
    # dropped.
    x, weight = ctx.saved_tensors
    dx, dw = router_logits_backward(grad.contiguous(), x, weight)
    return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None)


router_logits.register_autograd(_backward, setup_context=_setup_context)

backend.install(router_logits, "router_logits", router_logits_reference)
backend.install(router_logits_backward, "router_logits_backward", router_logits_backward_reference)

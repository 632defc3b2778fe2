"""mixlora::router_logits — router logits x W_gᵀ in fp32 without saving an fp32 copy of a 16-bit x."""

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


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    acc = grad.dtype
    dx = (grad @ weight.to(acc)).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = (grad.T @ x.to(acc)).to(weight.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw


router_logits.register_autograd(_backward, setup_context=_setup_context)

backend.install(router_logits, "router_logits", router_logits_reference)

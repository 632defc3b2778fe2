"""CPU `mixlora::lora_expand_combine` and its backward, y_t = s Σ_k w_j B_e zd_j (down-projection LoRA): the C++
kernels of csrc/cpu/lora_expand_combine.cpp (`torch.ops.mixlora_cpu`), after the op's input checks.

Forward: per column block of H, every expert tile in sorted order adds w_j B_e zd_j into its tokens' rows. Backward:
q_j = s B_eᵀ dy_t per expert tile (dzd, dweights), dB per column block of H summed over the expert's tiles in sorted
order. Only the slots' GEMMs (S·R·H), no atomics.
"""

from __future__ import annotations

import torch

from mixlora_kernels.checks import check_lora_expand_combine
from mixlora_kernels.cpu import _extension
from mixlora_kernels.cpu._common import no_autocast


@no_autocast
def lora_expand_combine_forward(zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                                order: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """`mixlora::lora_expand_combine` on CPU tensors: (T, H) fp32 = s Σ_k w_j B_{e_j} zd_j."""
    check_lora_expand_combine(zd, B, weights, experts, order, offsets)
    return _extension.ops.lora_expand_combine(zd, B, weights, experts, order, offsets, scale)


@no_autocast
def lora_expand_combine_backward(grad_y: torch.Tensor, zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                                 experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mixlora::lora_expand_combine_backward` on CPU tensors: (dzd, dB, dweights), each like its input."""
    check_lora_expand_combine(zd, B, weights, experts, order, offsets, grad_y)
    return _extension.ops.lora_expand_combine_backward(grad_y, zd, B, weights, experts, order, offsets, scale)

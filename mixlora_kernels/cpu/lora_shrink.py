"""CPU `mixlora::lora_shrink` and its backward, z_j = A_e drop_j(x_t) for every routing slot j = t·K + k: the C++
kernels of csrc/cpu/lora_shrink.cpp (`torch.ops.mixlora_cpu`), after the op's input checks.

Forward: per expert tile of at most 128 slots, its tokens' rows of x gathered (the dropout mask applied in the
gather) and multiplied by A_eᵀ. Backward: per column block of H, every tile in expert-sorted order: dx_t and dA_e of
the block's columns, each written by that block's task only. Only the slots' GEMMs (S·R·H), no atomics.
"""

from __future__ import annotations

import torch

from mixlora_kernels.checks import check_lora_shrink
from mixlora_kernels.cpu import _extension
from mixlora_kernels.cpu._common import no_autocast


@no_autocast
def lora_shrink_forward(x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor, order: torch.Tensor,
                        offsets: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """`mixlora::lora_shrink` on CPU tensors: x (T, H), A (E, R, H) -> z (S, R) fp32."""
    check_lora_shrink(x, A, experts, order, offsets, dropout_p)
    return _extension.ops.lora_shrink(x, A, experts, order, offsets, dropout_p, seed)


@no_autocast
def lora_shrink_backward(grad_z: torch.Tensor, x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor,
                         order: torch.Tensor, offsets: torch.Tensor, dropout_p: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`mixlora::lora_shrink_backward` on CPU tensors: (dx (T, H) like x, dA (E, R, H) like A) from grad_z (S, R)."""
    check_lora_shrink(x, A, experts, order, offsets, dropout_p, grad_z)
    return _extension.ops.lora_shrink_backward(grad_z, x, A, experts, order, offsets, dropout_p, seed)

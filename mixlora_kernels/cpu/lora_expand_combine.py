"""CPU `mixlora::lora_expand_combine` and its backward: y_t = s Σ_k w_j B_e zd_j (down-projection LoRA)."""

from __future__ import annotations

import torch

from mixlora_kernels.checks import check_lora_expand_combine
from mixlora_kernels.cpu._common import acc_dtype, no_autocast


def _weighted_blocks(zd: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, E: int,
                     acc: torch.dtype) -> torch.Tensor:
    """(T, E·R): token t's row holds w_j zd_j of its slots in their experts' blocks, zeros elsewhere."""
    T, K = experts.shape
    R = zd.shape[1]
    values = zd.reshape(T, K, R).to(acc) * weights.to(acc).unsqueeze(-1)
    blocks = values.new_zeros(T, E, R)
    return blocks.scatter_add_(1, experts.long().unsqueeze(-1).expand(T, K, R), values).view(T, E * R)


def _stacked(B: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """B (E, H, R) -> (E·R, H): expert e's rank rows in block e."""
    E, H, R = B.shape
    return B.to(acc).transpose(1, 2).reshape(E * R, H)


@no_autocast
def lora_expand_combine_forward(zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                                order: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """`mixlora::lora_expand_combine` on CPU tensors: (T, H) fp32 (fp64 for fp64 input) = s Σ_k w_j B_{e_j} zd_j.

    The weighted rank-R slot vectors of a token go into its experts' blocks of a (T, E·R) matrix, so the whole
    expand-and-combine is one dense GEMM with the stacked B (E·R, H): no sort, no gather, no per-slot (S, H) rows.
    """
    check_lora_expand_combine(zd, B, weights, experts, order, offsets)
    acc = acc_dtype(zd, B)
    T = experts.shape[0]
    E, H, R = B.shape
    if R == 0 or T == 0:
        return zd.new_zeros(T, H, dtype=acc)
    return (_weighted_blocks(zd, weights, experts, E, acc) @ _stacked(B, acc)).mul_(scale)


@no_autocast
def lora_expand_combine_backward(grad_y: torch.Tensor, zd: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                                 experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mixlora::lora_expand_combine_backward` on CPU tensors: (dzd, dB, dweights), each like its input.

    q = s dy (T, H) @ stacked Bᵀ gives every expert's q for every token; each slot picks its expert's block:
    dzd_j = w_j q_j, dw_j = ⟨q_j, zd_j⟩. dB = s dyᵀ @ the weighted blocks, one GEMM for all experts.
    """
    check_lora_expand_combine(zd, B, weights, experts, order, offsets, grad_y)
    acc = acc_dtype(zd, B)
    T, K = experts.shape
    E, H, R = B.shape
    if R == 0 or T == 0:
        return torch.zeros_like(zd), torch.zeros_like(B), torch.zeros_like(weights)
    gy = grad_y.to(acc)
    q_all = (gy @ _stacked(B, acc).T).mul_(scale)
    q = q_all.view(T, E, R).gather(1, experts.long().unsqueeze(-1).expand(T, K, R))
    w = weights.to(acc)
    z = zd.reshape(T, K, R).to(acc)
    dzd = (q * w.unsqueeze(-1)).view(T * K, R)
    dweights = (q * z).sum(-1)
    dB = (gy.T @ _weighted_blocks(zd, weights, experts, E, acc)).mul_(scale).view(H, E, R).transpose(0, 1)
    return dzd.to(zd.dtype), dB.to(B.dtype).contiguous(), dweights.to(weights.dtype)

"""CPU `mixlora::lora_shrink` and its backward: z_j = A_e drop_j(x_t) for every routing slot j = t·K + k."""

from __future__ import annotations

import torch

from mixlora_kernels.checks import check_lora_shrink
from mixlora_kernels.cpu._common import acc_dtype, bounds, keep_mask, no_autocast, segment_mm, segment_mm_t


def _per_token_blocks(values: torch.Tensor, experts: torch.Tensor, E: int, acc: torch.dtype) -> torch.Tensor:
    """(S, R) slot values -> (T, E·R): token t's row holds slot (t, k)'s values in expert block e_{t,k}, zeros
    elsewhere (a sum where a token names an expert twice)."""
    T, K = experts.shape
    R = values.shape[1]
    blocks = values.new_zeros(T, E, R, dtype=acc)
    index = experts.long().unsqueeze(-1).expand(T, K, R)
    return blocks.scatter_add_(1, index, values.reshape(T, K, R).to(acc)).view(T, E * R)


@no_autocast
def lora_shrink_forward(x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor, order: torch.Tensor,
                        offsets: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """`mixlora::lora_shrink` on CPU tensors: x (T, H), A (E, R, H) -> z (S, R) fp32 (fp64 for fp64 input).

    Without dropout every slot of a token reads the same x_t, so one GEMM x (T, H) @ A (E·R, H)ᵀ computes every
    expert's shrink of every token and each slot picks its expert's block: no gather, no sort, E/K times the slot
    FLOPs at rank R (cheap next to the (T, I) work). With dropout each slot has its own mask: the masked rows are
    gathered in expert-sorted order and shrunk by one grouped GEMM.
    """
    check_lora_shrink(x, A, experts, order, offsets, dropout_p)
    acc = acc_dtype(x, A)
    T, K = experts.shape
    E, R, H = A.shape
    if R == 0 or T == 0:
        return x.new_zeros(T * K, R, dtype=acc)
    if not dropout_p:
        y = x.to(acc) @ A.to(acc).reshape(E * R, H).T
        index = experts.long().unsqueeze(-1).expand(T, K, R)
        return y.view(T, E, R).gather(1, index).view(T * K, R)
    rows = x.index_select(0, order // K).to(acc)
    rows.mul_(keep_mask(order, H, dropout_p, seed))
    z_sorted = segment_mm(rows, A.to(acc).transpose(1, 2), bounds(offsets)).mul_(1.0 / (1.0 - dropout_p))
    z = torch.empty_like(z_sorted, memory_format=torch.contiguous_format)
    z[order] = z_sorted
    return z


@no_autocast
def lora_shrink_backward(grad_z: torch.Tensor, x: torch.Tensor, A: torch.Tensor, experts: torch.Tensor,
                         order: torch.Tensor, offsets: torch.Tensor, dropout_p: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`mixlora::lora_shrink_backward` on CPU tensors: (dx (T, H) like x, dA (E, R, H) like A) from grad_z (S, R).

    Without dropout: dz scattered into per-token expert blocks (T, E·R), then dx = blocks @ A and dA = blocksᵀ @ x,
    two dense GEMMs. With dropout: per-slot rows in expert-sorted order (grouped GEMMs), dx summed per token.
    """
    check_lora_shrink(x, A, experts, order, offsets, dropout_p, grad_z)
    acc = acc_dtype(x, A)
    T, K = experts.shape
    E, R, H = A.shape
    if R == 0 or T == 0:
        return torch.zeros_like(x), torch.zeros_like(A)
    if not dropout_p:
        blocks = _per_token_blocks(grad_z, experts, E, acc)
        dx = blocks @ A.to(acc).reshape(E * R, H)
        dA = (blocks.T @ x.to(acc)).view(E, R, H)
        return dx.to(x.dtype), dA.to(A.dtype)
    seg = bounds(offsets)
    tokens = order // K
    keep = keep_mask(order, H, dropout_p, seed)
    grad_sorted = grad_z.index_select(0, order).to(acc).mul_(1.0 / (1.0 - dropout_p))
    d_rows = segment_mm(grad_sorted, A.to(acc), seg).mul_(keep)
    dx = x.new_zeros(T, H, dtype=acc).index_add_(0, tokens, d_rows)
    rows = x.index_select(0, tokens).to(acc).mul_(keep)
    dA = segment_mm_t(grad_sorted, rows, seg)
    return dx.to(x.dtype), dA.to(A.dtype)

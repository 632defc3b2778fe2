"""CPU `mixlora::expand_act_combine` and its backward: the C++ kernels of csrc/cpu/expand_act_combine.cpp
(`torch.ops.mixlora_cpu`), after the op's input checks. Per-slot gate/up LoRA expand on the shared base, activation,
routing-weighted combine h̄ and the down-LoRA shrink; the backward recomputes g, u, h instead of storing them.

Layout (see the C++ file): expert-sorted tiles of at most 128 slots × column blocks of about 128 of I; one task per
column block owns its columns of h̄, dG, dU and of the weight gradients (summed in sorted order), the rank-R results
are summed over the blocks in block order: no atomics, the same bits for any thread count. The rank-R products are
GEMMs on the tiles (the BLAS torch uses), everything between them one fused loop (compiled for AVX-512, AVX2 and
the baseline).
fp32, bf16 and fp16 inputs (bf16 read as is, fp16 widened to fp32), fp32 arithmetic; fp64 is left to the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from mixlora_kernels.checks import check_expand_act_combine
from mixlora_kernels.cpu import _extension
from mixlora_kernels.cpu._common import no_autocast


@no_autocast
def expand_act_combine_forward(G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor, Bg: torch.Tensor,
                               zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                               order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float,
                               activation_name: str, dropout_p: float,
                               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`mixlora::expand_act_combine` on CPU tensors: (h̄ (T, I) in G's dtype, zd (S, Rd) fp32)."""
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p)
    return _extension.ops.expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, scale,
                                             activation_name, dropout_p, seed)


@no_autocast
def expand_act_combine_backward(
        grad_hbar: torch.Tensor, grad_zd: torch.Tensor, G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor,
        Bg: torch.Tensor, zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float, activation_name: str,
        dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mixlora::expand_act_combine_backward` on CPU tensors: (dG, dU, dzg, dBg, dzu, dBu, dweights, dAd), each like
    its input (dU empty when U is None)."""
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p,
                             grad_hbar, grad_zd)
    return _extension.ops.expand_act_combine_backward(grad_hbar, grad_zd, G, U, zg, Bg, zu, Bu, weights, experts,
                                                      order, offsets, Ad, scale, activation_name, dropout_p, seed)

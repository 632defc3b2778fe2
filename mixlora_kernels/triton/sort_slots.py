"""Triton launcher for `mixlora::sort_slots`: stable counting sort of the S = T*K routing slots by expert.

Three steps, no host synchronisation: per-block expert histograms (kernel), an exclusive scan over blocks and experts
(torch.cumsum on device: (S / BLOCK_S) x E numbers), then each block scatters its slots to
offsets[e] + (earlier blocks' count of e) + (rank among the block's slots of e) (kernel). Stable by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixlora_kernels.checks import check_sort_slots

# Slots per block: the in-block rank is a cumsum over a (BLOCK_S, next_pow2(E)) one-hot tile. Untuned.
_BLOCK_S = 256


@triton.jit
def _sort_slots_count_kernel(experts_ptr, counts_ptr, S, K, E, stride_et, stride_ek,
                             BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[b, e] = number of slots j in block b (j = t*K + k) with experts[t, k] == e."""
    b = tl.program_id(0)
    j = b * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = j < S
    e = tl.load(experts_ptr + (j // K) * stride_et + (j % K) * stride_ek, mask=ok, other=-1)
    col = tl.arange(0, BLOCK_E)
    hits = (e[:, None] == col[None, :]).to(tl.int64)
    tl.store(counts_ptr + b * E + col, tl.sum(hits, axis=0), mask=col < E)


@triton.jit
def _sort_slots_fwd_kernel(experts_ptr, base_ptr, order_ptr, S, K, E, stride_et, stride_ek,
                           BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """order[base[b, e_j] + rank of j among block b's slots of expert e_j] = j."""
    b = tl.program_id(0)
    j = b * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = j < S
    e = tl.load(experts_ptr + (j // K) * stride_et + (j % K) * stride_ek, mask=ok, other=-1)
    col = tl.arange(0, BLOCK_E)
    hit = e[:, None] == col[None, :]
    rank = tl.sum(tl.where(hit, tl.cumsum(hit.to(tl.int32), axis=0), 0), axis=1) - 1
    valid = ok & (e >= 0) & (e < E)
    base = tl.load(base_ptr + b * E + e, mask=valid, other=0)
    tl.store(order_ptr + base + rank, j.to(tl.int64), mask=valid)


def sort_slots_forward(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `mixlora::sort_slots`: experts (T, K) int32/int64 -> (order (S,) int64, offsets (E+1,) int64).

    Out-of-range expert ids are caught by a device-side `torch._assert_async` (the reference reads them on the host;
    a launcher must not synchronise). Grid (cdiv(S, BLOCK_S),) for both kernels.
    """
    check_sort_slots(experts, num_experts)
    T, K = experts.shape
    S, E = T * K, num_experts
    device = experts.device
    order = torch.empty(S, dtype=torch.int64, device=device)
    if S == 0:
        return order, torch.zeros(E + 1, dtype=torch.int64, device=device)
    torch._assert_async(((experts >= 0) & (experts < E)).all(),
                        f"mixlora::sort_slots: expert ids must be in [0, {E})")
    nb = triton.cdiv(S, _BLOCK_S)
    block_e = triton.next_power_of_2(E)
    counts = torch.empty(nb, E, dtype=torch.int64, device=device)
    _sort_slots_count_kernel[(nb,)](experts, counts, S, K, E, experts.stride(0), experts.stride(1),
                                    BLOCK_S=_BLOCK_S, BLOCK_E=block_e)
    totals = counts.sum(0)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    torch.cumsum(totals, 0, out=offsets[1:])
    base = offsets[:-1] + torch.cumsum(counts, 0) - counts  # exclusive scan over blocks, per expert
    _sort_slots_fwd_kernel[(nb,)](experts, base, order, S, K, E, experts.stride(0), experts.stride(1),
                                  BLOCK_S=_BLOCK_S, BLOCK_E=block_e)
    return order, offsets

"""mixlora::sort_slots — token permutation by routed expert: the expert-sorted slot order and expert offsets."""

from __future__ import annotations

import torch

from mixlora_kernels import backend
from mixlora_kernels.checks import check, check_sort_slots
from mixlora_kernels.ops._common import reference


@reference
def sort_slots_reference(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the S = T·K routing slots by expert.

    Slot j = t·K + k is token t's k-th choice.
    Args:
        experts: (T, K) int32/int64 expert ids in [0, E).
        num_experts: E.
    Returns:
        order (S,) int64: order[p] = the slot at expert-sorted position p; stable (token order inside an expert);
        offsets (E+1,) int64: expert e owns positions offsets[e] .. offsets[e+1]-1.
    """
    check_sort_slots(experts, num_experts)
    flat = experts.reshape(-1).long()
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        check(lo >= 0 and hi < num_experts, "sort_slots",
              f"expert ids must be in [0, {num_experts}), got values in [{lo}, {hi}]")
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return torch.argsort(flat, stable=True), offsets


sort_slots = torch.library.custom_op("mixlora::sort_slots", sort_slots_reference, mutates_args=())


@sort_slots.register_fake
def _(experts, num_experts):
    return experts.new_empty(experts.numel(), dtype=torch.int64), experts.new_empty(num_experts + 1, dtype=torch.int64)


backend.install(sort_slots, "sort_slots", sort_slots_reference)

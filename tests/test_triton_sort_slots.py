"""Triton `sort_slots` launcher (interpreter, CPU) against `torch.argsort(experts.flatten(), stable=True)` and the
cumulative slot counts per expert (`backend_checks.stable_sort_slots`): integer outputs, compared exactly."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from backend_checks import stable_sort_slots, tied_experts  # noqa: E402
from test_triton_common import make_routing, requires_interpreter  # noqa: E402

from mixlora_kernels.triton.sort_slots import sort_slots_forward  # noqa: E402

pytestmark = requires_interpreter

CASES = [
    # T, E, K, routing
    (1, 4, 2, "random"),     # T=1
    (300, 5, 2, "empty"),    # S=600 spans three 256-slot blocks (cross-block scan); prime E; an empty expert
    (50, 3, 3, "random"),    # K=E
    (40, 4, 1, "one"),       # K=1, all tokens on one expert
]


@pytest.mark.parametrize("T,E,K,mode", CASES)
@pytest.mark.parametrize("idtype", [torch.int64, torch.int32])
def test_sort_slots(T, E, K, mode, idtype):
    gen = torch.Generator().manual_seed(T + E)
    experts = make_routing(T, E, K, mode, gen)[0].to(idtype)
    order, offsets = sort_slots_forward(experts, E)
    want_order, want_offsets = stable_sort_slots(experts, E)
    assert order.dtype == offsets.dtype == torch.int64
    assert torch.equal(offsets, want_offsets) and torch.equal(order, want_order)


# Fresh random ids (`tied_experts`: each expert's slots tie, tokens may repeat an expert, expert E // 2 has none).
@pytest.mark.parametrize("T,K,E,seed", [(300, 2, 5, 0), (7, 3, 4, 2), (1, 1, 2, 3)])
def test_sort_slots_stable_with_ties(T, K, E, seed):
    experts = tied_experts(T, K, E, seed)
    order, offsets = sort_slots_forward(experts, E)
    want_order, want_offsets = stable_sort_slots(experts, E)
    assert want_offsets[E // 2 + 1] == want_offsets[E // 2]  # the expert without slots
    assert torch.equal(offsets, want_offsets) and torch.equal(order, want_order)


# Non-contiguous experts (a transposed view) and duplicate ids within a token: still the stable order.
def test_sort_slots_noncontiguous_duplicates():
    experts = torch.randint(0, 6, (3, 200), generator=torch.Generator().manual_seed(0)).T
    assert not experts.is_contiguous()
    order, offsets = sort_slots_forward(experts, 7)
    want_order, want_offsets = stable_sort_slots(experts, 7)
    assert torch.equal(offsets, want_offsets) and torch.equal(order, want_order)

"""Every CUDA kernel of csrc/, forward and backward, executed on the CPU by the harness (cuda_cpu_harness.py)
against the float64 reference (mixlora_kernels/ops/<op>.py: <op>_reference, the pure-torch default of
`torch.ops.mixlora.<op>`; called directly, so that no CPU kernel backend stands in for it).

The ops are called as `torch.ops.mixlora_cuda.*` would be (same arguments, same input preparation and launches) and
checked as the GPU tests check them (tests/test_cuda_ops.py::assert_matches: the tolerance rule of
`mixlora_kernels.selftest`, with ref_same as the kernels round their operands). The problems are
tests/test_cuda_ops.py::make_problem's, smaller: every CUDA thread is a fiber here (~20 us per warp-shuffle round of
a block), so T stays in the tens where the reason allows.
"""

from __future__ import annotations

import pytest
import torch

from backend_checks import reference, stable_sort_slots, tied_experts, xfail_at_end
from cuda_cpu_harness import KernelError, have_compiler, load
from test_cuda_ops import ROUTER_SHAPES, _as_tuple, assert_matches, make_problem

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs a host C++ compiler (g++) for the CPU harness")


@pytest.fixture(scope="module")
def cuda_cpu():
    return load()


def check_op(kernels, name, *args):
    """Run op `name` on the harness and check it against its references as tests/test_cuda_ops.py does
    (`assert_matches`); returns its outputs."""
    out = _as_tuple(getattr(kernels, name)(*args))
    assert_matches(name, out, *args)
    return out


def eac_args(P, act="silu", dropout_p=0.0, seed=99):
    return (P["G"], P["U"], P["zg"], P["Bg"], P["zu"], P["Bu"], P["weights"], P["experts"], P["order"],
            P["offsets"], P["Ad"], 0.7, act, dropout_p, seed)


def shrink_args(P, dropout_p):
    return (P["x"], P["A"], P["experts"], P["order"], P["offsets"], dropout_p, 1234)


def expand_args(P):
    return (P["zd"], P["Bd"], P["weights"], P["experts"], P["order"], P["offsets"], 0.7)


# Shapes, each with its reason (make_problem's defaults: H=33, I=45, E=5, K=2, R=16).
SHAPES = [
    pytest.param(dict(T=1, K=2), id="T=1"),
    pytest.param(dict(T=21), id="T-below-one-tile"),  # < the 64-row tiles and < the 256 threads of a block
    pytest.param(dict(T=33, H=97, I=173, E=7), id="odd-H-I-prime-E"),  # H, I: several 64-column tiles, ragged
    pytest.param(dict(T=30, K=1), id="K=1"),
    pytest.param(dict(T=20, E=3, K=3), id="K=E"),
    pytest.param(dict(T=30, E=6, routing="empty"), id="empty-expert"),  # its weight-gradient tiles must be zeros
    pytest.param(dict(T=70, K=1, routing="one"), id="all-slots-one-expert"),  # 2 row tiles of one expert
    pytest.param(dict(T=20, Rg=8, Ru=8, Rd=8), id="R=8"),
    pytest.param(dict(T=12, Rg=64, Ru=64, Rd=64), id="R=64"),  # Rg+Ru = 128: two rank tiles in the shrink
    pytest.param(dict(T=20, Rg=0, Ru=0, Rd=0), id="R=0"),  # projections without expert LoRA
    pytest.param(dict(T=20, Rg=16, Ru=8, Rd=41), id="mixed-ranks"),  # Rg+Ru+Rd = 65: a 1-wide 2nd rank tile
]
# (dtype, dropout_p): p > 0 checks that the kernels regenerate the reference's mask; p = 0 is the unmasked path.
MODES = [pytest.param(torch.float32, 0.0, id="fp32"), pytest.param(torch.float32, 0.3, id="fp32-dropout"),
         pytest.param(torch.bfloat16, 0.3, id="bf16-dropout")]


@pytest.mark.parametrize("dtype, dropout_p", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_shrink(cuda_cpu, shape, dtype, dropout_p):
    P = make_problem(dtype=dtype, **shape)
    check_op(cuda_cpu, "lora_shrink", *shrink_args(P, dropout_p))
    check_op(cuda_cpu, "lora_shrink_backward", P["grad_z"], *shrink_args(P, dropout_p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_expand_combine(cuda_cpu, shape, dtype):
    P = make_problem(dtype=dtype, **shape)
    check_op(cuda_cpu, "lora_expand_combine", *expand_args(P))
    check_op(cuda_cpu, "lora_expand_combine_backward", P["grad_y"], *expand_args(P))


@pytest.mark.parametrize("dtype, dropout_p", MODES)
@pytest.mark.parametrize("shape", [
    # H a multiple of 8 (16-byte rows): the tensor-core kernels stage x / dy and A with 8-element loads, and H = 72
    # leaves an 8-column last chunk; 140 slots on E = 8: several 64-slot tiles per expert, and a 256-row fold
    pytest.param(dict(T=70, H=72, E=8), id="aligned-rows"),
    pytest.param(dict(T=70, H=72, E=8, Rg=40, Ru=24, Rd=72), id="aligned-rows-R64-72"),  # 2 rank tiles, ragged
])
def test_lora_tensor_core_shapes(cuda_cpu, shape, dtype, dropout_p):
    P = make_problem(dtype=dtype, **shape)
    check_op(cuda_cpu, "lora_shrink", *shrink_args(P, dropout_p))
    check_op(cuda_cpu, "lora_shrink_backward", P["grad_z"], *shrink_args(P, dropout_p))
    check_op(cuda_cpu, "lora_expand_combine", *expand_args(P))
    check_op(cuda_cpu, "lora_expand_combine_backward", P["grad_y"], *expand_args(P))


@pytest.mark.parametrize("sm_count, H", [(1, 200), (2, 330)])  # 4 column tiles per block; 3 per block, 2 blocks
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])  # with dropout: one whole fold per pass
def test_token_fold_column_tiles_per_block(cuda_cpu, sm_count, H, dropout_p):
    """token_fold_mma_kernel with its whole fold shared by several 64-column tiles of a block (plan_token_fold sizes
    the grid by the multiprocessors, so a small sm_count gives a small problem several tiles per block); the last
    column tile is ragged."""
    P = make_problem(T=70, H=H, E=8, dtype=torch.bfloat16)
    cuda_cpu.sm_count = sm_count
    try:
        check_op(cuda_cpu, "lora_shrink_backward", P["grad_z"], *shrink_args(P, dropout_p))
        check_op(cuda_cpu, "lora_expand_combine", *expand_args(P))
    finally:
        cuda_cpu.sm_count = 132


@pytest.mark.parametrize("dtype, dropout_p", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@xfail_at_end
def test_expand_act_combine(cuda_cpu, shape, dtype, dropout_p):
    P = make_problem(dtype=dtype, **shape)
    args = eac_args(P, "silu", dropout_p)
    check_op(cuda_cpu, "expand_act_combine", *args)
    check_op(cuda_cpu, "expand_act_combine_backward", P["grad_hbar"], P["grad_zd"], *args)


@pytest.mark.parametrize("shape", [
    # the LLaMA-2-7B expert shape (E 8, R 16) with I a multiple of 8 but not of 64: 16-byte rows in whole chunks of
    # 8, so the bf16 tensor-core kernels take their VEC instantiation (G, U, dH̄ and the weights staged by 16-byte
    # copies; the only tests that run it), and their last 64-column step is ragged; 140 slots: two token tiles of 128
    pytest.param(dict(T=70, H=40, I=200, E=8), id="aligned-rows"),
    pytest.param(dict(T=70, H=40, I=200, E=8, Rg=32, Ru=24, Rd=40), id="aligned-rows-R32-40"),  # NF = 2 and 4
])
@xfail_at_end
def test_expand_act_combine_tensor_core_shapes(cuda_cpu, shape):
    P = make_problem(dtype=torch.bfloat16, **shape)
    args = eac_args(P, "silu", 0.1)
    check_op(cuda_cpu, "expand_act_combine", *args)
    check_op(cuda_cpu, "expand_act_combine_backward", P["grad_hbar"], P["grad_zd"], *args)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])  # silu: test_expand_act_combine
@pytest.mark.parametrize("variant", [
    pytest.param(dict(gated=True), id="gated"),
    pytest.param(dict(gated=False, Rg=16, Rd=8), id="U-None"),  # Phi fc1/fc2: h = act(g), no up LoRA
    pytest.param(dict(gated=True, fused=True), id="fused-views"),  # Bg, Bu: non-contiguous views of one B
])
@xfail_at_end
def test_expand_act_combine_activations(cuda_cpu, act, variant):
    P = make_problem(T=9, I=77, dtype=torch.bfloat16, **variant)
    args = eac_args(P, act, 0.2)
    check_op(cuda_cpu, "expand_act_combine", *args)
    out = check_op(cuda_cpu, "expand_act_combine_backward", P["grad_hbar"], P["grad_zd"], *args)
    if P["U"] is None:
        assert out[1].numel() == 0  # dU is empty for an ungated FFN


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t with the same values in a non-contiguous layout: "rows" keeps a unit inner stride (the kernels read the row
    stride), "columns" does not (api.cpp makes a contiguous copy first)."""
    if layout == "rows":
        wide = torch.full((*t.shape[:-1], t.shape[-1] + 7), float("nan"), dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("layout", ["rows", "columns"])
@xfail_at_end
def test_non_contiguous_inputs(cuda_cpu, layout):
    """Every (T, *) input and every weight in a non-contiguous layout; fp16 covers the Half instantiations."""
    dtype = torch.float16
    P = make_problem(T=13, dtype=dtype)
    for key in ("x", "G", "U", "grad_y", "grad_hbar", "zd", "grad_z", "grad_zd", "A", "Bd", "Ad", "Bg", "Bu"):
        P[key] = _strided(P[key], layout)
        assert not P[key].is_contiguous()
    check_op(cuda_cpu, "lora_shrink", *shrink_args(P, 0.3))
    check_op(cuda_cpu, "lora_shrink_backward", P["grad_z"], *shrink_args(P, 0.3))
    check_op(cuda_cpu, "lora_expand_combine", *expand_args(P))
    check_op(cuda_cpu, "lora_expand_combine_backward", P["grad_y"], *expand_args(P))
    args = eac_args(P, "silu", 0.3)
    check_op(cuda_cpu, "expand_act_combine", *args)
    check_op(cuda_cpu, "expand_act_combine_backward", P["grad_hbar"], P["grad_zd"], *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, H, E", ROUTER_SHAPES)
def test_router_logits(cuda_cpu, T, H, E, dtype):
    P = make_problem(T=T, H=H, E=E, K=min(2, E), dtype=dtype)
    check_op(cuda_cpu, "router_logits", P["x"], P["w_router"])
    check_op(cuda_cpu, "router_logits_backward", P["grad_logits"], P["x"], P["w_router"])


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_router_logits_non_contiguous(cuda_cpu, layout):
    P = make_problem(T=37, H=80, E=8, dtype=torch.bfloat16)
    x, weight, grad = (_strided(P[k], layout) for k in ("x", "w_router", "grad_logits"))
    check_op(cuda_cpu, "router_logits", x, weight)
    check_op(cuda_cpu, "router_logits_backward", grad, x, weight)


def test_router_logits_empty(cuda_cpu):
    """T = 0: no logits, dW all zeros (a sum of no chunks); H = 0: logits all zeros."""
    x, weight, grad = torch.randn(0, 24).bfloat16(), torch.randn(8, 24), torch.randn(0, 8)
    assert cuda_cpu.router_logits(x, weight).shape == (0, 8)
    dx, dw = cuda_cpu.router_logits_backward(grad, x, weight)
    assert dx.shape == (0, 24) and torch.equal(dw, torch.zeros(8, 24))
    assert torch.equal(cuda_cpu.router_logits(torch.randn(5, 0).bfloat16(), torch.randn(8, 0)), torch.zeros(5, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, E, K", [(1, 8, 2), (300, 8, 2), (77, 7, 1), (40, 5, 5), (33, 64, 6)])
def test_route(cuda_cpu, T, E, K, dtype):
    """route (ids identical, weights within the rule) and route_backward. The logits of a row are a permutation of
    0, 1/16, ..., (E-1)/16: exact in bf16/fp16 and distinct, so the top-k order is unique. T=300 > 2 blocks of 128."""
    g = torch.Generator().manual_seed(T + E)
    logits = (torch.argsort(torch.rand(T, E, generator=g), dim=1).double() / 16).to(dtype)
    weights, experts = check_op(cuda_cpu, "route", logits, K)
    grad_w = torch.randn(T, K, generator=g)
    check_op(cuda_cpu, "route_backward", grad_w, weights, experts, E)


def test_route_nan_logits(cuda_cpu):
    """A row with a NaN logit (or +inf, or all -inf: softmax is NaN) gets experts 0..K-1 with NaN weights, the
    reference's rule (NaN ranks above every number, ties go to the lower id); other rows are unaffected, and the
    ids pass sort_slots and the backward without a device assertion."""
    T, E, K = 6, 7, 3
    logits = torch.randn(T, E)
    logits[1, 4] = float("nan")
    logits[2] = float("nan")
    logits[3, 0] = float("inf")
    logits[4] = float("-inf")
    weights, experts = cuda_cpu.route(logits, K)
    bad, good = [1, 2, 3, 4], [0, 5]
    assert torch.equal(experts[bad], torch.arange(K).expand(len(bad), K))
    assert weights[bad].isnan().all()
    ref_w, ref_e = reference("route")(logits.double(), K)
    assert torch.equal(experts, ref_e)
    assert torch.allclose(weights[good].double(), ref_w[good], atol=1e-6) and ref_w[bad].isnan().all()
    order, offsets = cuda_cpu.sort_slots(experts, E)
    assert offsets[-1] == T * K
    grad = cuda_cpu.route_backward(torch.randn(T, K), weights, experts, E)
    assert grad[good].isfinite().all()


@pytest.mark.parametrize("routing", [
    pytest.param(dict(T=1, K=2), id="T=1"),
    pytest.param(dict(T=300, E=7), id="T>block-prime-E"),  # 600 slots: 3 blocks of 256
    pytest.param(dict(T=30, E=6, routing="empty"), id="empty-expert"),
    pytest.param(dict(T=40, E=3, K=3), id="K=E"),
    pytest.param(dict(T=20, K=1, routing="one"), id="all-slots-one-expert"),
])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sort_slots(cuda_cpu, routing, index_dtype):
    P = make_problem(**routing)
    experts = P["experts"].to(index_dtype)
    order, offsets = cuda_cpu.sort_slots(experts, P["E"])
    want_order, want_offsets = stable_sort_slots(experts, P["E"])
    assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets)


# Fresh random ids (backend_checks.tied_experts: each expert's slots tie, tokens may repeat an expert, expert E // 2
# has none) against torch.argsort(stable=True): 600 and 1000 slots span 3 and 4 blocks of 256 (the cross-block scan).
@pytest.mark.parametrize("T, K, E, seed", [(300, 2, 5, 0), (250, 4, 9, 1), (7, 3, 4, 2), (1, 1, 2, 3)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sort_slots_stable_with_ties(cuda_cpu, T, K, E, seed, index_dtype):
    experts = tied_experts(T, K, E, seed).to(index_dtype)
    order, offsets = cuda_cpu.sort_slots(experts, E)
    want_order, want_offsets = stable_sort_slots(experts, E)
    assert want_offsets[E // 2 + 1] == want_offsets[E // 2]  # the expert without slots
    assert torch.equal(offsets, want_offsets)
    assert torch.equal(order, want_order)


def test_sort_slots_no_slots(cuda_cpu):
    order, offsets = cuda_cpu.sort_slots(torch.zeros(0, 2, dtype=torch.int64), 4)
    assert order.numel() == 0 and torch.equal(offsets, torch.zeros(5, dtype=torch.int64))


def test_schedule_does_not_change_results(cuda_cpu):
    """Deterministic kernels (no float atomics, no races): another thread and block schedule gives bit-identical
    outputs."""
    P = make_problem(T=30, H=40, I=70, E=5, dtype=torch.bfloat16)
    R = make_problem(T=300, H=72, E=8, dtype=torch.bfloat16)  # 2 dW chunks
    calls = [("lora_shrink", shrink_args(P, 0.1)), ("lora_shrink_backward", (P["grad_z"], *shrink_args(P, 0.1))),
             ("lora_expand_combine", expand_args(P)), ("lora_expand_combine_backward", (P["grad_y"], *expand_args(P))),
             ("expand_act_combine", eac_args(P, "gelu", 0.1)),
             ("expand_act_combine_backward", (P["grad_hbar"], P["grad_zd"], *eac_args(P, "gelu", 0.1))),
             ("route", (P["logits"], 2)), ("route_backward", (P["grad_weights"], P["weights"], P["experts"], P["E"])),
             ("sort_slots", (P["experts"], P["E"])), ("router_logits", (R["x"], R["w_router"])),
             ("router_logits_backward", (R["grad_logits"], R["x"], R["w_router"]))]
    other = load(schedule_seed=12345)
    for name, args in calls:
        for a, b in zip(_as_tuple(getattr(cuda_cpu, name)(*args)), _as_tuple(getattr(other, name)(*args)),
                        strict=True):
            assert torch.equal(a, b), f"{name}: the result depends on the thread schedule"


@pytest.mark.parametrize("op", ["sort_slots", "lora_shrink_backward", "lora_expand_combine", "expand_act_combine",
                                "expand_act_combine_backward", "route_backward"])
def test_out_of_range_expert_id_is_a_device_assert(cuda_cpu, op):
    """An expert id >= E trips the kernels' CUDA_KERNEL_ASSERT (on a GPU: "device-side assert triggered"). The ops
    whose kernels walk the sorted order only (lora_shrink, lora_expand_combine_backward) take a slot's expert from
    `offsets`, as their references do, and do not read `experts`."""
    P = make_problem(T=5)
    bad = P["experts"].clone()
    bad[3, 1] = P["E"]
    route = (bad, P["order"], P["offsets"])
    args = {
        "sort_slots": (bad, P["E"]),
        "lora_shrink_backward": (P["grad_z"], P["x"], P["A"], *route, 0.0, 0),
        "lora_expand_combine": (P["zd"], P["Bd"], P["weights"], *route, 0.5),
        "expand_act_combine": eac_args(dict(P, experts=bad)),
        "expand_act_combine_backward": (P["grad_hbar"], P["grad_zd"], *eac_args(dict(P, experts=bad))),
        "route_backward": (P["grad_weights"], P["weights"], bad, P["E"]),
    }[op]
    with pytest.raises(KernelError, match=r"device assertion `e >= 0 && e < (num_experts|E)"):
        getattr(cuda_cpu, op)(*args)

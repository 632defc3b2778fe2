"""The mixlora:: op registry: opcheck, float64 gradcheck (dropout included), routing semantics and input errors."""

from __future__ import annotations

import pytest
import torch

from mixlora_kernels import ops
from mixlora_kernels.ops._common import dropout_scale


def _problem(T=6, H=7, I=9, E=5, K=2, R=(3, 3, 4), seed=0, dtype=torch.float64):
    """Random routed problem: odd H/I, prime E, distinct gate/up/down ranks."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    Rg, Ru, Rd = R
    logits = rnd(T, E)
    weights, experts = ops.route(logits, K)
    order, offsets = ops.sort_slots(experts, E)
    return dict(x=rnd(T, H), logits=logits, G=rnd(T, I), U=rnd(T, I), A=rnd(E, Rg + Ru, H), Bg=rnd(E, I, Rg),
                Bu=rnd(E, I, Ru), Ad=rnd(E, Rd, I), Bd=rnd(E, H, Rd), zd=rnd(T * K, Rd), weights=weights,
                experts=experts, order=order, offsets=offsets, Rg=Rg)


def test_route_matches_softmax_topk_renorm():
    logits = torch.randn(9, 6, dtype=torch.float64)
    w, e = ops.route(logits, 3)
    p = torch.softmax(logits, -1)
    top = p.topk(3, -1)
    assert torch.equal(e, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True), rtol=0, atol=1e-15)
    assert ops.route(logits.float(), 3)[0].dtype == torch.float32
    assert ops.route(logits.bfloat16(), 3)[0].dtype == torch.float32  # routing always accumulates in fp32


def test_sort_slots_is_stable_and_counts():
    experts = torch.tensor([[2, 0], [0, 2], [1, 2], [2, 0]])
    order, offsets = ops.sort_slots(experts, 4)
    # slots j = t*K + k: expert 0 gets slots 1, 2, 7; expert 1 gets 4; expert 2 gets 0, 3, 5, 6; expert 3 none.
    assert order.tolist() == [1, 2, 7, 4, 0, 3, 5, 6]
    assert offsets.tolist() == [0, 3, 4, 8, 8]


def test_dropout_mask_is_a_function_of_seed_slot_column():
    slots = torch.arange(50)
    a = dropout_scale(slots, 64, 0.25, 1234, torch.float64)
    assert torch.equal(a, dropout_scale(slots, 64, 0.25, 1234, torch.float64))
    assert torch.equal(a[10:20], dropout_scale(slots[10:20], 64, 0.25, 1234, torch.float64))
    assert not torch.equal(a, dropout_scale(slots, 64, 0.25, 1235, torch.float64))
    assert set(a.unique().tolist()) == {0.0, 1 / 0.75}
    assert abs((a == 0).double().mean().item() - 0.25) < 0.02  # 3200 draws: 4.5 sigma


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_pipeline_gradcheck(dropout_p):
    """Finite differences through route -> shrink -> expand_act_combine -> lora_expand_combine (routing fixed)."""
    P = _problem()
    order, offsets, Rg = P["order"], P["offsets"], P["Rg"]

    def f(x, logits, G, U, A, Bg, Bu, Ad, Bd):
        w, e = ops.route(logits, 2)
        z = ops.lora_shrink(x, A, e, order, offsets, dropout_p, 11)
        zg, zu = z.split([Rg, A.shape[1] - Rg], 1)
        hbar, zd = ops.expand_act_combine(G, U, zg, Bg, zu, Bu, w, e, order, offsets, Ad, 0.7, "silu", dropout_p, 12)
        return hbar, ops.lora_expand_combine(zd, Bd, w, e, order, offsets, 0.7)

    args = [P[k].clone().requires_grad_() for k in ("x", "logits", "G", "U", "A", "Bg", "Bu", "Ad", "Bd")]
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_expand_act_combine_ungated_gradcheck(act):
    """Phi-style FFN: U is None, no up LoRA (rank 0)."""
    P = _problem(R=(3, 0, 2))
    e, order, offsets = P["experts"], P["order"], P["offsets"]
    zg = torch.randn(e.numel(), 3, dtype=torch.float64, requires_grad=True)
    zu = torch.zeros(e.numel(), 0, dtype=torch.float64)

    def f(G, zg, Bg, w, Ad):
        return ops.expand_act_combine(G, None, zg, Bg, zu, P["Bu"], w, e, order, offsets, Ad, 1.3, act, 0.0, 0)

    args = [P["G"].requires_grad_(), zg, P["Bg"].requires_grad_(), P["weights"].requires_grad_(),
            P["Ad"].requires_grad_()]
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def _op_cases():
    P = _problem()
    e, o, off = P["experts"], P["order"], P["offsets"]
    z = ops.lora_shrink(P["x"], P["A"], e, o, off, 0.0, 0)
    zg, zu = z[:, :3].contiguous(), z[:, 3:].contiguous()
    S = e.numel()
    yield ops.route, (P["logits"].requires_grad_(), 2)
    yield ops.router_logits, (P["x"].float().requires_grad_(), torch.randn(5, 7, requires_grad=True))
    yield ops.router_logits, (P["x"].bfloat16().requires_grad_(), torch.randn(5, 7, requires_grad=True))
    yield ops.router_logits_backward, (torch.randn(6, 5), P["x"].bfloat16(), torch.randn(5, 7))
    yield ops.sort_slots, (e, 5)
    yield ops.lora_shrink, (P["x"].requires_grad_(), P["A"].requires_grad_(), e, o, off, 0.2, 3)
    yield ops.lora_shrink_backward, (torch.randn(S, 6, dtype=torch.float64), P["x"], P["A"], e, o, off, 0.2, 3)
    eac = (P["G"], P["U"], zg, P["Bg"], zu, P["Bu"], P["weights"], e, o, off, P["Ad"], 0.5, "gelu_tanh", 0.1, 4)
    yield ops.expand_act_combine, tuple(t.requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
                                        for t in eac)
    yield ops.expand_act_combine_backward, (torch.randn(6, 9, dtype=torch.float64),
                                            torch.randn(S, 4, dtype=torch.float64), *eac)
    yield ops.lora_expand_combine, (P["zd"].requires_grad_(), P["Bd"].requires_grad_(),
                                    P["weights"].requires_grad_(), e, o, off, 0.9)
    yield ops.lora_expand_combine_backward, (torch.randn(6, 7, dtype=torch.float64), P["zd"], P["Bd"], P["weights"],
                                             e, o, off, 0.9)
    yield ops.route_backward, (torch.randn(6, 2, dtype=torch.float64), P["weights"], e, 5)


@pytest.mark.parametrize("op,args", list(_op_cases()), ids=lambda v: getattr(v, "_name", ""))
def test_opcheck(op, args):
    # Backward ops are differentiated once only (no double backward): their autograd tests do not apply.
    backward_op = op._name.endswith("_backward")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor") if backward_op else
                          ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_errors_name_the_tensor_and_expectation():
    P = _problem()
    e, o, off = P["experts"], P["order"], P["offsets"]
    with pytest.raises(ValueError, match=r"mixlora::lora_shrink: A must have shape \(\*, \*, 7\), got \(5, 6, 8\)"):
        ops.lora_shrink(P["x"], torch.randn(5, 6, 8, dtype=torch.float64), e, o, off, 0.0, 0)
    with pytest.raises(ValueError, match=r"experts has 5 rows but x has T=6 tokens"):
        ops.lora_shrink(P["x"], P["A"], e[:5], o, off, 0.0, 0)
    with pytest.raises(ValueError, match=r"offsets must be int64 of shape \(6,\)"):
        ops.lora_shrink(P["x"], P["A"], e, o, off[:-1], 0.0, 0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        ops.lora_shrink(P["x"], P["A"], e, o, off, 1.0, 0)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 5\), got values in \[0, 7\]"):
        ops.sort_slots(torch.tensor([[0, 7]]), 5)
    with pytest.raises(ValueError, match=r"experts must be an int32/int64 \(T, K\) tensor, got torch.float32"):
        ops.sort_slots(torch.zeros(3, 2), 5)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=5\], got 6"):
        ops.route(P["logits"], 6)
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'tanh'"):
        ops.expand_act_combine(P["G"], P["U"], torch.zeros(12, 3, dtype=torch.float64), P["Bg"],
                               torch.zeros(12, 3, dtype=torch.float64), P["Bu"], P["weights"], e, o, off, P["Ad"],
                               1.0, "tanh", 0.0, 0)
    with pytest.raises(ValueError, match=r"Bu must have shape \(5, 9, 3\), got \(5, 8, 3\)"):
        ops.expand_act_combine(P["G"], P["U"], torch.zeros(12, 3, dtype=torch.float64), P["Bg"],
                               torch.zeros(12, 3, dtype=torch.float64), P["Bu"][:, :8], P["weights"], e, o, off,
                               P["Ad"], 1.0, "silu", 0.0, 0)
    with pytest.raises(ValueError, match=r"B must have shape \(\*, \*, 4\), got \(5, 7, 3\)"):
        ops.lora_expand_combine(P["zd"], P["Bd"][..., :3], P["weights"], e, o, off, 1.0)
    with pytest.raises(ValueError, match=r"weights must have shape \(6, 2\), got \(6, 3\)"):
        ops.lora_expand_combine(P["zd"], P["Bd"], torch.ones(6, 3, dtype=torch.float64), e, o, off, 1.0)


def test_route_ties_and_nan_rows():
    """Ties go to the lower expert id; a NaN row routes to experts 0..K-1 with NaN weights (never an invalid id)."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5], [float("nan"), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                          dtype=torch.float64)
    w, e = ops.route(logits, 2)
    assert e.tolist() == [[1, 2], [0, 1], [0, 1]]
    assert torch.isnan(w[1]).all()
    torch.testing.assert_close(w[[0, 2]], torch.full((2, 2), 0.5, dtype=torch.float64), rtol=0, atol=1e-15)

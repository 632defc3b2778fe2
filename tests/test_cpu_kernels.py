"""The CPU kernels (`mixlora_kernels.cpu`) against the float64 reference ops, forward and backward.

Every kernel is called directly (not through the registry). With fp32/bf16 inputs it must meet the backends' one
tolerance rule (`mixlora_kernels.selftest`, asserted by `backend_checks.assert_outputs`), ref_same being the
reference on the same low-precision inputs; a wrong mask, slot or expert is off by O(1) relative. bf16 inputs are
cast as a model passes them: activations (x, G, U, dH̄) in bf16; routing weights and rank-R tensors in fp32; LoRA
weights in fp32 (the training layout, `mixlora.lora.adapter_dtype`) or bf16 (a model loaded in bf16). The kernels
multiply fp32 operands as they are, so ref_same needs no operand rounding.

With float64 inputs the rule does not apply (there is no reference more exact than the kernel: ref_same = ref64 would
leave 2 fp64 ulps of the largest entry, which summing in another order exceeds): the kernels must match the float64
reference to 1e-9 of max(1, its largest entry).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from backend_checks import assert_outputs

from mixlora_kernels import backend, cpu, ops
from mixlora_kernels.cpu._common import keep_mask
from mixlora_kernels.cpu.expand_act_combine import tile_rows
from mixlora_kernels.ops._common import dropout_scale

OPS = ("lora_shrink", "lora_shrink_backward", "expand_act_combine", "expand_act_combine_backward",
       "lora_expand_combine", "lora_expand_combine_backward")


def _routing(T, E, K, gen, case):
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    if case == "empty_expert":
        logits[:, E - 1] = -30.0  # expert E-1 gets no slot
    elif case == "one_expert":
        logits[:, 1] = 30.0  # every token's first choice is expert 1 (with K=1: all slots on one expert)
    weights, experts = ops.route(logits, K)
    order, offsets = ops.sort_slots(experts, E)
    return weights, experts, order, offsets


class Problem:
    """Random float64 inputs of every op for one shape: ranks (Rg, Ru, Rd), `layout` gated | ungated | fused."""

    def __init__(self, T, H, I, E, K, R=(4, 4, 4), p=0.0, case="random", layout="gated", seed=0,
                 noncontiguous=False):
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
        Rg, Ru, Rd = R
        S = T * K
        self.p, self.seed, self.scale, self.act = p, 1234 + seed, 0.7, "silu"
        self.weights, self.experts, self.order, self.offsets = _routing(T, E, K, gen, case)
        self.x = rnd(T, H)
        if noncontiguous:
            self.x = rnd(H, T).T  # column-major x, as a transposed activation would arrive
        self.A = rnd(E, Rg + (Ru if layout == "gated" else 0), H) * 0.3
        z = rnd(S, self.A.shape[1])
        self.G = rnd(T, I)
        if layout == "fused":  # Phi-3 gate_up_proj: one shrink for both halves, B split along its rows
            B = rnd(E, 2 * I, Rg)
            self.zg = self.zu = z
            self.Bg, self.Bu = B[:, :I], B[:, I:]
            self.U = rnd(T, I)
        else:
            self.zg, self.zu = z.split([Rg, z.shape[1] - Rg], dim=1)  # column views, as the model passes them
            self.Bg = rnd(E, I, Rg)
            self.Bu = rnd(E, I, self.zu.shape[1])
            self.U = None if layout == "ungated" else rnd(T, I)
        self.Ad, self.Bd = rnd(E, Rd, I) * 0.3, rnd(E, H, Rd)
        self.zd = rnd(S, Rd)
        self.grad_z, self.grad_hbar, self.grad_zd, self.grad_y = rnd(S, self.A.shape[1]), rnd(T, I), rnd(S, Rd), \
            rnd(T, H)

    def args(self, name):
        route = (self.weights, self.experts, self.order, self.offsets)
        eac = (self.G, self.U, self.zg, self.Bg, self.zu, self.Bu, *route, self.Ad, self.scale, self.act, self.p,
               self.seed)
        shrink = (self.x, self.A, self.experts, self.order, self.offsets, self.p, self.seed)
        return {
            "lora_shrink": shrink,
            "lora_shrink_backward": (self.grad_z, *shrink),
            "expand_act_combine": eac,
            "expand_act_combine_backward": (self.grad_hbar, self.grad_zd, *eac),
            "lora_expand_combine": (self.zd, self.Bd, *route, self.scale),
            "lora_expand_combine_backward": (self.grad_y, self.zd, self.Bd, *route, self.scale),
        }[name]


# Positions of the arguments a model passes in the activation dtype (the rest: fp32 routing/rank-R, LoRA weights).
_ACTIVATION_ARGS = {"lora_shrink": {0}, "lora_shrink_backward": {1}, "expand_act_combine": {0, 1},
                    "expand_act_combine_backward": {0, 2, 3}, "lora_expand_combine": set(),
                    "lora_expand_combine_backward": set()}
_LORA_ARGS = {"lora_shrink": {1}, "lora_shrink_backward": {2}, "expand_act_combine": {3, 5, 10},
              "expand_act_combine_backward": {5, 7, 12}, "lora_expand_combine": {1},
              "lora_expand_combine_backward": {2}}


def cast(name, args, dtype, lora_dtype):
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.to(dtype if i in _ACTIVATION_ARGS[name] else lora_dtype if i in _LORA_ARGS[name]
                     else torch.float32 if dtype != torch.float64 else a.dtype)
        out.append(a)
    return tuple(out)


def reference(name, args):
    with backend.use("torch"):
        return getattr(ops, name)(*args)


def outputs(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


def assert_matches_fp64(name, problem):
    """float64: |out − ref64| ≤ 1e-9·max(1, max|ref64|) (see the module docstring)."""
    args = problem.args(name)
    ref = outputs(reference(name, args))
    got = outputs(cpu.KERNELS[name](*args))
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape and g.dtype == r.dtype, (name, i, g.shape, r.shape, g.dtype, r.dtype)
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = (g - r).abs().max().item() if r.numel() else 0.0
        assert err <= 1e-9 * scale, f"{name} output {i}: max |kernel - reference| = {err:.3g} (scale {scale:.3g})"


def assert_tolerance_rule(name, problem, dtype, lora_dtype):
    args64 = problem.args(name)
    args = cast(name, args64, dtype, lora_dtype)
    ref64 = outputs(reference(name, args64))
    ref_same = outputs(reference(name, args))
    got = outputs(cpu.KERNELS[name](*args))
    assert_outputs(f"{name} ({dtype}, LoRA {lora_dtype})", got, ref_same, ref64)


# fp32 cases that exceed the rule: the kernel sums in another order (dense GEMMs over all E·R expert columns; tiles
# of I) than the reference, and one entry ends up further than 2·|ref_same − ref64| + 2 fp32 ulps of the largest
# entry from ref64 (by the ratio given); no rounding of the kernel's to put into ref_same. Strict: a pass means the
# rule or the kernel changed, and the entry goes.
_FP32_BEYOND_RULE = {
    ("lora_shrink_backward", "R16"): "dx: 1 of 512 entries at 1.10x the allowance (summed over E·R = 128 columns)",
    ("expand_act_combine", "multi_tile"): "zd: 1 of 640 entries at 1.01x the allowance (summed over I = 2048)",
}


# Each shape has a reason (T, H, I, E, K, ranks (Rg, Ru, Rd), dropout p, routing case, layout):
SHAPES = {
    "T1": dict(T=1, H=16, I=24, E=4, K=2),  # a single token
    "empty_expert": dict(T=9, H=16, I=24, E=5, K=2, case="empty_expert"),  # an expert with no slot
    "one_expert_K1": dict(T=8, H=16, I=24, E=4, K=1, case="one_expert"),  # K=1, all slots on one expert
    "K_eq_E": dict(T=6, H=16, I=24, E=3, K=3),  # every token picks every expert
    "prime_E_odd_HI": dict(T=11, H=23, I=37, E=7, K=2, R=(3, 5, 3)),  # odd strides: the mm-loop fallbacks
    "R8": dict(T=16, H=32, I=48, E=8, K=2, R=(8, 8, 8)),  # aligned: torch._grouped_mm
    "R16": dict(T=16, H=32, I=48, E=8, K=2, R=(16, 16, 16)),
    "R64": dict(T=12, H=64, I=96, E=4, K=2, R=(64, 64, 64)),
    "dropout": dict(T=13, H=32, I=40, E=5, K=2, p=0.3),  # masks regenerated in backward
    "noncontiguous_x": dict(T=10, H=24, I=32, E=4, K=2, noncontiguous=True, p=0.2),
    "rank0_up_down": dict(T=10, H=24, I=32, E=4, K=2, R=(4, 0, 0), p=0.2),  # up/down not targeted: rank-0 stand-ins
    "rank0_gate": dict(T=10, H=24, I=32, E=4, K=2, R=(0, 4, 4)),  # gate not targeted
    "ungated": dict(T=10, H=24, I=32, E=4, K=2, R=(4, 0, 4), layout="ungated", p=0.1),  # Phi fc1/fc2: U is None
    "fused_phi3": dict(T=10, H=24, I=32, E=4, K=2, R=(4, 4, 4), layout="fused", p=0.1),  # gate_up_proj halves
    "multi_tile": dict(T=40, H=16, I=2048, E=2, K=2, R=(8, 8, 8), p=0.1),  # segments longer than one tile
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", OPS)
def test_float64_matches_reference(name, shape):
    assert_matches_fp64(name, Problem(**SHAPES[shape]))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("name", ["expand_act_combine", "expand_act_combine_backward"])
def test_activations_float64(name, act):
    problem = Problem(T=12, H=16, I=40, E=5, K=2, p=0.2, seed=3)
    problem.act = act
    assert_matches_fp64(name, problem)


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16_fp32_lora", "bf16_bf16_lora"])
@pytest.mark.parametrize("shape", ["empty_expert", "prime_E_odd_HI", "R16", "dropout", "fused_phi3", "ungated",
                                   "multi_tile"])
@pytest.mark.parametrize("name", OPS)
def test_low_precision_tolerance_rule(request, name, shape, dtype, lora_dtype):
    if dtype == lora_dtype == torch.float32 and (name, shape) in _FP32_BEYOND_RULE:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason=f"fp32 beyond the rule: {_FP32_BEYOND_RULE[name, shape]}"))
    assert_tolerance_rule(name, Problem(**SHAPES[shape], seed=1), dtype, lora_dtype)


def test_multi_tile_shape_spans_tiles():
    """The multi_tile shape really splits an expert segment (else it tests nothing beyond the others)."""
    problem = Problem(**SHAPES["multi_tile"])
    assert int(problem.offsets.diff().max()) > tile_rows(2048)


@pytest.mark.parametrize("cols,p,seed", [(64, 0.05, 7), (1001, 0.3, 2**31 + 5), (2048, 0.5, 2**32 - 1),
                                         (3, 0.9, 0)])
def test_keep_mask_equals_reference_hash(cols, p, seed):
    """Bit for bit the mask of `dropout_scale`, also where slot·cols passes 2**32 (the index wraps) and for seeds
    with the top bit set."""
    slots = torch.cat([torch.arange(300), torch.randint(2**32 // cols - 100, 2**32 // cols + 100, (200,)),
                       torch.tensor([2**40 // cols])])
    assert torch.equal(keep_mask(slots, cols, p, seed), dropout_scale(slots, cols, p, seed, torch.float64) != 0)


@pytest.mark.parametrize("name", OPS)
def test_deterministic(name):
    args = cast(name, Problem(**SHAPES["dropout"], seed=2).args(name), torch.float32, torch.float32)
    first, second = outputs(cpu.KERNELS[name](*args)), outputs(cpu.KERNELS[name](*args))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_kernels_have_the_registered_signatures():
    for name, fn in cpu.KERNELS.items():
        schema = getattr(torch.ops.mixlora, name).default._schema
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments], name


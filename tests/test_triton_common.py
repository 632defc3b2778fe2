"""Shared helpers for the Triton launcher tests, and tests of the pieces in `mixlora_kernels.triton._common`.

The launchers run on CPU tensors through the Triton interpreter (`TRITON_INTERPRET=1`, set before triton is imported),
so shapes stay tiny. References: the registered ops run in float64 on CPU (fp64 is always served by the reference)
and, for ref_same, the pure-torch references called directly (`backend_checks.reference`: on CPU tensors of other
dtypes the registry would serve the CPU kernels).

Outputs are checked with the backends' one tolerance rule (`mixlora_kernels.selftest`, asserted by
`backend_checks.assert_tolerance`): ref_same is the reference op on the kernel's own inputs, and, for an fp32 output
that the kernels compute from 16-bit MMA operands (`_common.mma_dtype`: the fp32 rank-R tensors z, zd, their
gradients and the fp32 intermediates of a 16-bit model are rounded to 16 bits first, as a bf16 LoRA rounds its own),
the reference with its matmul operands rounded the same way (`backend_checks.mma_operands`).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

import mixlora_kernels  # noqa: E402,F401  (registers torch.ops.mixlora.*)
from mixlora_kernels.ops._common import dropout_scale  # noqa: E402
from mixlora_kernels.triton._common import (  # noqa: E402
    dropout_keep, dropout_threshold, expert_block, num_expert_blocks)
from mixlora_kernels.triton.lora_shrink import _lora_shrink_fwd_kernel  # noqa: E402

# triton.jit chooses interpreter or compiler when a function is decorated, triton.language's own helpers included.
# When an earlier test module imported mixlora_kernels (its backend imports triton) before this module set
# TRITON_INTERPRET, the kernels here are compiled-mode and cannot run on CPU tensors: the in-process tests skip and
# `test_triton_suite_in_fresh_process` reruns these files in a fresh interpreter-mode process instead.
INTERPRETED = all(isinstance(f, triton.runtime.interpreter.InterpretedFunction)
                  for f in (triton.language.zeros, _lora_shrink_fwd_kernel))
requires_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1 was set; covered by "
                            "test_triton_suite_in_fresh_process")

tl = triton.language


def make_routing(T: int, E: int, K: int, mode: str = "random", gen: torch.Generator | None = None):
    """experts (T, K) int64 with distinct experts per token, plus (order, offsets) from the reference sort_slots.

    mode: "random"; "empty" (expert E-1 never chosen, needs K < E); "one" (every token picks expert 0 first).
    """
    scores = torch.rand(T, E, generator=gen)
    if mode == "empty":
        scores[:, E - 1] = -1.0
    elif mode == "one":
        scores[:, 0] = 2.0
    experts = scores.topk(K, dim=1).indices
    order, offsets = torch.ops.mixlora.sort_slots(experts, E)
    return experts, order, offsets


@triton.jit
def _keep_kernel(slots_ptr, out_ptr, n_cols, seed, threshold, N: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, N)
    cols = tl.arange(0, C)
    keep = dropout_keep(tl.load(slots_ptr + rows), cols, n_cols, seed, threshold)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], keep.to(tl.int8))


# Slot ids near 2**32 / n_cols exercise the mod-2**32 wrap of (slot * n_cols + col); seeds above 2**31 the XOR.
@requires_interpreter
# n_cols=1 and seed=1: ints Triton specialises into constexprs.
@pytest.mark.parametrize("p,seed,n_cols", [(0.3, 12345, 33), (0.05, 2**32 - 7, 33), (0.9, 0, 33), (0.5, 1, 1)])
def test_dropout_keep_matches_reference_hash(p, seed, n_cols):
    torch.manual_seed(0)
    slots = torch.cat([torch.randint(0, 1000, (12,)), torch.tensor([2**32 // n_cols, 2**32 // n_cols + 1, 2**27, 7])])
    out = torch.empty(16, 64, dtype=torch.int8)
    _keep_kernel[(1,)](slots, out, n_cols, seed & 0xFFFFFFFF, dropout_threshold(p), N=16, C=64)
    # columns c >= n_cols are not in the (S, n_cols) layout; only the first n_cols are compared
    ref = dropout_scale(slots, n_cols, p, seed, torch.float64) > 0
    assert torch.equal(out[:, :n_cols].bool(), ref)


@triton.jit
def _block_kernel(offsets_ptr, expert_ptr, start_ptr, E, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    e, start = expert_block(pid, offsets_ptr, E, BLOCK_M)
    tl.store(expert_ptr + pid, e)
    tl.store(start_ptr + pid, start)


# Expert segments of sizes 0, 1, exactly a block, a block + 1 and a long one; block 4 keeps the grid small.
@requires_interpreter
def test_expert_block_covers_each_segment_once():
    counts = torch.tensor([0, 1, 4, 5, 11, 0])
    E = len(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    nb = num_expert_blocks(int(counts.sum()), E, 4)
    expert, start = torch.empty(nb, dtype=torch.int32), torch.empty(nb, dtype=torch.int64)
    _block_kernel[(nb,)](offsets, expert, start, E, BLOCK_M=4)
    covered = []
    for e, s in zip(expert.tolist(), start.tolist(), strict=True):
        if e < E:
            covered += [(e, p) for p in range(s, min(s + 4, int(offsets[e + 1])))]
    want = [(e, p) for e in range(E) for p in range(int(offsets[e]), int(offsets[e + 1]))]
    assert sorted(covered) == want and len(covered) == len(set(covered))


# The backend installs KERNELS[name] as the CUDA kernel of mixlora::<name>: same argument names in the same order.
def test_kernels_match_op_schemas():
    import inspect

    from mixlora_kernels.triton import KERNELS

    assert set(KERNELS) == {
        "router_logits", "router_logits_backward", "route", "route_backward", "sort_slots", "lora_shrink",
        "lora_shrink_backward", "expand_act_combine", "expand_act_combine_backward", "lora_expand_combine",
        "lora_expand_combine_backward"}
    for name, fn in KERNELS.items():
        schema = getattr(torch.ops.mixlora, name).default._schema
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments], name


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_first_use_self_check_accepts_every_kernel(dtype):
    """What `mixlora_kernels.backend` runs before a Triton kernel serves an op on a GPU: every kernel must pass it in
    every dtype, else a GPU would silently fall back to the reference (this failed for the fp32 outputs of 16-bit
    calls before the rule took eps from the call's dtype)."""
    from mixlora_kernels import backend
    from mixlora_kernels.selftest import check_against_reference
    from mixlora_kernels.triton import KERNELS

    failed = {name: check_against_reference(name, impl, backend._REFERENCES[name], torch.device("cpu"), dtype)
              for name, impl in KERNELS.items()}
    assert not {n: f for n, f in failed.items() if f is not None}


@pytest.mark.skipif(INTERPRETED, reason="the Triton launcher tests already run in this process")
def test_triton_suite_in_fresh_process():
    import glob
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(here, "test_triton_*.py")))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(here),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]

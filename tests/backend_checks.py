"""What the kernel backends' tests (test_cuda_ops.py, cuda_cpu/, test_triton_*.py, test_cpu_kernels.py) check with.

`assert_tolerance`: the one low-precision tolerance rule, `mixlora_kernels.selftest.tolerance_violation` (stated in
that module's docstring; the backends' first-use self-check applies the same rule), asserted with its message;
`assert_outputs` applies it to every output of an op, and reports as xfail the outputs a call site names as known to
exceed it (each with its reason there), so that every other output is still held to the rule (a test marked
`@xfail_at_end` checks all its ops first and then reports them).

`mma_operands`: where a kernel multiplies fp32 operands on 16-bit tensor cores (the fp32 rank-R tensors of a 16-bit
model, fp32 intermediates such as h), its fp32 output is only as exact as those operands. The rule then stays the
rule, with that rounding in its input: ref_same is the reference computed with its matmul operands rounded the way
the kernel rounds them, so that 2·|ref_same − ref64| is the operand rounding's error and no other constant is needed.

`stable_sort_slots`: what every sort_slots kernel must return, computed with `torch.argsort(stable=True)` (not with
the reference op, so that the reference is checked too).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
from typing import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mixlora_kernels.selftest import tolerance_violation

__all__ = ["assert_outputs", "assert_tolerance", "mma_operands", "reference", "rounded_to",
           "stable_sort_slots", "tied_experts", "xfail_at_end"]


def assert_tolerance(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    """`out` meets the rule of `mixlora_kernels.selftest` against float64 `ref64`, with `ref_same` the reference on
    the kernel's own inputs (integer outputs: equal). A kernel must not return another dtype than the reference."""
    problem = _violation(out, ref_same, ref64)
    assert problem is None, f"{what}: {problem}"


def _violation(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor) -> str | None:
    if out.dtype != ref_same.dtype:
        return f"dtype {out.dtype}, the reference gives {ref_same.dtype}"
    return tolerance_violation(out, ref_same, ref64)


def assert_outputs(what: str, outs, refs_same, refs64, beyond_rule: dict[int, str] | None = None,
                   operand_dtype: torch.dtype | None = None) -> None:
    """`assert_tolerance` on every output (all are checked, every violation is reported).

    beyond_rule: {output index: why} for fp32 outputs known to exceed the rule although computed from
    `operand_dtype` MMA operands. Such an output must still meet the rule as an output of that dtype (out and ref_same
    rounded to it: the rule at the operands' precision, so a wrong result still fails); when its fp32 violation is
    all that is wrong, the test is an xfail carrying it (a pass once it meets the rule), and the rule stays the rule
    for every other output."""
    assert len(outs) == len(refs_same) == len(refs64), f"{what}: {len(outs)} outputs, the reference gives {len(refs64)}"
    beyond_rule = beyond_rule or {}
    assert not beyond_rule or operand_dtype is not None, "beyond_rule needs the outputs' operand_dtype"
    unexpected, known = [], []
    for i, (o, s, r) in enumerate(zip(outs, refs_same, refs64, strict=True)):
        problem = _violation(o, s, r)
        if problem is None:
            continue
        if i not in beyond_rule:
            unexpected.append(f"{what} output {i}: {problem}")
            continue
        coarse = tolerance_violation(o.to(operand_dtype), s.to(operand_dtype), r)
        if coarse is not None:
            unexpected.append(f"{what} output {i}, even as {operand_dtype}: {coarse}")
        known.append(f"{what} output {i}: {problem} (known beyond the rule: {beyond_rule[i]})")
    assert not unexpected, "; ".join(unexpected)
    collected = _KNOWN.get()
    if collected is not None:
        collected += known
    elif known:
        pytest.xfail("; ".join(known))


_KNOWN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("beyond_rule", default=None)


def xfail_at_end(test):
    """Test decorator: known violations (`assert_outputs`' beyond_rule) make the test an xfail only after all of it
    ran, so that one op's known violation does not skip the checks of the next."""

    @functools.wraps(test)
    def wrapped(*args, **kwargs):
        known: list[str] = []
        token = _KNOWN.set(known)
        try:
            test(*args, **kwargs)
        finally:
            _KNOWN.reset(token)
        if known:
            pytest.xfail("; ".join(known))

    return wrapped


def reference(name: str) -> Callable:
    """The pure-torch reference of op `name` (mixlora_kernels/ops/<op>.py: <name>_reference), called directly: no
    kernel backend stands in for it, and `mma_operands` sees its matmuls (a custom op would hide them)."""
    module = importlib.import_module(f"mixlora_kernels.ops.{name.removesuffix('_backward')}")
    return getattr(module, f"{name}_reference")


def rounded_to(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """An operand rounded (to nearest even) to `dtype` and widened back: a Triton 16-bit MMA operand."""
    return lambda t: t.to(dtype).to(t.dtype)


_MATMULS = {torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm,
            torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}


class mma_operands(TorchFunctionMode):  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Within this context every fp32 matmul operand is first passed through `rnd` (`rounded_to(dtype)`;
    None: none): run a `reference(name)` inside it for the ref_same of a kernel with such operands."""

    def __init__(self, rnd: Callable[[torch.Tensor], torch.Tensor] | None):
        super().__init__()
        self.rnd = rnd  # None: no rounding (a kernel with fp32 operands)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.rnd is not None and func in _MATMULS:
            args = tuple(self.rnd(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                         for a in args)
        return func(*args, **(kwargs or {}))


def tied_experts(T: int, K: int, E: int, seed: int) -> torch.Tensor:
    """(T, K) int64 expert ids drawn uniformly from [0, E) except E // 2 (an expert with no slots; E >= 2), fresh per
    seed: every expert's slots are ties of the sort, and a token may name an expert twice."""
    ids = torch.randint(0, E - 1, (T, K), generator=torch.Generator().manual_seed(seed))
    return ids + (ids >= E // 2).long()


def stable_sort_slots(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) of sort_slots: the stable argsort of the flat expert ids (ties, i.e. slots of one expert, in
    slot order) and the cumulative slot counts per expert, an expert without slots included."""
    flat = experts.flatten().long().cpu()
    counts = torch.bincount(flat, minlength=num_experts)
    return torch.argsort(flat, stable=True), torch.cat([counts.new_zeros(1), counts.cumsum(0)])

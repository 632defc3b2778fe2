"""First-use self-check of a kernel: one run on small random inputs against the reference on the same device.

`mixlora_kernels.backend` calls `check_against_reference` the first time a kernel backend would serve an op for a
(device, dtype). The inputs are drawn from a private generator (the global RNG is untouched, so training stays
reproducible), shaped like a model's call: an empty expert (E 5 experts for 7 tokens, K 2), odd H and I, LoRA
dropout on. Tolerance rule, used by this check and by every backend's tests:

    |out − ref64| ≤ 2 · |ref_same − ref64| + atol,   atol = 2 · eps(dtype) · max(1, max |ref64|)

where ref64 is the reference in float64 on the CPU and ref_same the reference on the kernel's own inputs (same
device and dtype): a kernel may be as wrong as the reference's own rounding, twice over, plus a few ulps of the
largest entry (a different accumulation order may round an entry to the neighbouring value). `dtype` is the coarser
of the output's dtype and the call's (the coarsest of its floating inputs): an fp32 output of a call with 16-bit
inputs (the rank-R tensors, the routing-weight gradient) is entitled to the 16-bit precision its kernel computes in
(16-bit tensor-core operands), which the reference, computing it in fp32 from the same inputs, does not show; a call
whose inputs are all fp32 (the router's) is held to fp32. Integer outputs must match exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

# The dropout seed has high bits set, as the model's draws do (below 2**31): a hash broken above bit 15 passes
# with a small seed.
_SHAPE = {"T": 7, "H": 24, "I": 40, "E": 5, "K": 2, "R": 4, "p": 0.25, "seed": 0x5E3779B1, "scale": 0.5}


def tolerance_violation(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor,
                        call_dtype: torch.dtype | None = None) -> str | None:
    """None when `out` meets the tolerance rule of the module docstring, else what is wrong (shape, worst element).
    `call_dtype`: the dtype of the call's floating inputs (None: the output's)."""
    if out.shape != ref64.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    if not ref64.is_floating_point():
        if torch.equal(out.cpu(), ref64.cpu()):
            return None
        return f"integer output differs in {int((out.cpu() != ref64.cpu()).sum())} of {out.numel()} entries"
    ref64 = ref64.cpu().double()
    err = (out.detach().cpu().double() - ref64).abs()
    ref_err = (ref_same.detach().cpu().double() - ref64).abs()
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    eps = max(torch.finfo(out.dtype).eps, torch.finfo(call_dtype or out.dtype).eps)
    allowed = 2 * ref_err + 2 * eps * scale
    bad = ~(err <= allowed)  # NaN counts as bad
    if not bad.any():
        return None
    worst = int(torch.nan_to_num((err - allowed), nan=float("inf")).argmax())
    return (f"{int(bad.sum())} of {out.numel()} entries off; worst |out - ref64| = {err.view(-1)[worst].item():.3g} "
            f"allowed {allowed.view(-1)[worst].item():.3g}")


def _routing(T, E, K, gen):
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    logits[:, E - 1] = -30.0  # expert E-1 gets no slot: the empty-expert path
    probs, experts = torch.softmax(logits, -1).topk(K, -1)
    weights = probs / probs.sum(-1, keepdim=True)
    order = torch.argsort(experts.reshape(-1), stable=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(experts.reshape(-1), minlength=E).cumsum(0)])
    return logits, weights, experts, order, offsets


def sample_inputs(name: str, gen: torch.Generator) -> tuple:
    """Float64 CPU inputs of op `name` (cast to the tested dtype by `cast`), like a model's call."""
    T, H, I, E, K, R = (_SHAPE[k] for k in "THIEKR")
    p, seed, scale = _SHAPE["p"], _SHAPE["seed"], _SHAPE["scale"]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    logits, weights, experts, order, offsets = _routing(T, E, K, gen)
    routing = (weights, experts, order, offsets)
    S = T * K
    eac = (rnd(T, I), rnd(T, I), rnd(S, R), rnd(E, I, R), rnd(S, R), rnd(E, I, R), *routing, rnd(E, R, I), scale,
           "silu", p, seed)
    return {
        "router_logits": lambda: (rnd(T, H), rnd(E, H)),
        "router_logits_backward": lambda: (rnd(T, E), rnd(T, H), rnd(E, H)),
        "route": lambda: (logits, K),
        "route_backward": lambda: (rnd(T, K), weights, experts, E),
        "sort_slots": lambda: (experts, E),
        "lora_shrink": lambda: (rnd(T, H), rnd(E, 2 * R, H), experts, order, offsets, p, seed),
        "lora_shrink_backward": lambda: (rnd(S, 2 * R), rnd(T, H), rnd(E, 2 * R, H), experts, order, offsets, p, seed),
        "expand_act_combine": lambda: eac,
        "expand_act_combine_backward": lambda: (rnd(T, I), rnd(S, R), *eac),
        "lora_expand_combine": lambda: (rnd(S, R), rnd(E, H, R), *routing, scale),
        "lora_expand_combine_backward": lambda: (rnd(T, H), rnd(S, R), rnd(E, H, R), *routing, scale),
    }[name]()


# Arguments a model passes in fp32 whatever its dtype: routing weights, router logits (and their gradient) and
# weight, rank-R tensors.
_FP32_ARGS = {
    "router_logits": {1}, "router_logits_backward": {0, 2}, "route": {0}, "route_backward": {0, 1},
    "lora_shrink_backward": {0},
    "expand_act_combine": {2, 4, 6}, "expand_act_combine_backward": {1, 4, 6, 8},
    "lora_expand_combine": {0, 2}, "lora_expand_combine_backward": {0, 1, 3},
}


def cast(name: str, args: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """`args` on `device`, floating tensors in `dtype` (fp32 where a model passes fp32, see `_FP32_ARGS`)."""
    keep32 = _FP32_ARGS.get(name, set())
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.to(device, (torch.float32 if i in keep32 else dtype) if a.is_floating_point() else a.dtype)
        out.append(a)
    return tuple(out)


def check_against_reference(name: str, impl: Callable, reference: Callable, device: torch.device,
                            dtype: torch.dtype) -> str | None:
    """Run `impl` (a kernel of op `name`) once on `sample_inputs` in `dtype` on `device`; None when it meets the
    tolerance rule against `reference`, else the error (an exception's message, or the first output off)."""
    args64 = sample_inputs(name, torch.Generator().manual_seed(0))
    args = cast(name, args64, device, dtype)
    try:
        out = impl(*args)
    except Exception as err:  # noqa: BLE001  (any failure of an untrusted kernel means: do not use it)
        return f"{type(err).__name__}: {err}"
    ref_same, ref64 = reference(*args), reference(*args64)
    call_dtype = max((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                     key=lambda d: torch.finfo(d).eps, default=None)
    outs, refs, refs64 = ((o,) if isinstance(o, torch.Tensor) else tuple(o) for o in (out, ref_same, ref64))
    if len(outs) != len(refs64):
        return f"returned {len(outs)} outputs, expected {len(refs64)}"
    for i, (o, r, r64) in enumerate(zip(outs, refs, refs64, strict=True)):
        if o.numel() == 0 and r64.numel() == 0:
            continue
        if o.device != device or o.dtype != r.dtype:
            return f"output {i} is {o.dtype} on {o.device}, expected {r.dtype} on {device}"
        problem = tolerance_violation(o, r, r64, call_dtype)
        if problem is not None:
            return f"output {i}: {problem}"
    return None

"""Input checks of every `mixlora::` op, one function per op, shared by the reference, the CPU kernels and the Triton
launchers (the CUDA extension mirrors them in csrc/api.cpp).

A leaf module (torch and `mixlora_kernels.activations` only), so any backend can use it while `mixlora_kernels.ops` is still importing.
Each check raises a ValueError that names the op, the tensor and the expected shape/dtype/device. Nothing here reads
a tensor's values (that would synchronise with the device).
"""

from __future__ import annotations

import torch

from mixlora_kernels.activations import ACTIVATIONS


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"mixlora::{op}: {msg}")


def check_float(op: str, name: str, t: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    """`t` is a floating tensor of the given shape (None = any size); the message names it and the expectation."""
    check(t.is_floating_point(), op, f"{name} must be a floating-point tensor, got {t.dtype}")
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    check(ok, op, f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_devices(op: str, first: str, device: torch.device, *named: tuple[str, torch.Tensor | None]) -> None:
    for name, t in named:
        if t is not None:
            check(t.device == device, op, f"{name} is on {t.device} but {first} is on {device}")


def check_routing(op: str, experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, num_experts: int,
                  device) -> None:
    """experts (T, K) int, order (S,) int64, offsets (E+1,) int64, all on `device`."""
    check(experts.dim() == 2 and not experts.is_floating_point(), op,
          f"experts must be an integer tensor (T, K), got {experts.dtype} {tuple(experts.shape)}")
    check(order.dtype == torch.int64 and order.shape == (experts.numel(),), op,
          f"order must be int64 of shape ({experts.numel()},), got {order.dtype} {tuple(order.shape)}")
    check(offsets.dtype == torch.int64 and offsets.shape == (num_experts + 1,), op,
          f"offsets must be int64 of shape ({num_experts + 1},), got {offsets.dtype} {tuple(offsets.shape)}")
    check_devices(op, "the activations", device, ("experts", experts), ("order", order), ("offsets", offsets))


def check_router_logits(x, weight, grad=None) -> None:
    """`router_logits`' inputs; with `grad` (the logits' gradient), those of `router_logits_backward`."""
    op = "router_logits" if grad is None else "router_logits_backward"
    check_float(op, "x", x, (None, None))
    check_float(op, "weight", weight, (None, x.shape[1]))
    check_devices(op, "x", x.device, ("weight", weight), ("grad", grad))
    if grad is not None:
        check_float(op, "grad", grad, (x.shape[0], weight.shape[0]))


def check_route(logits, top_k) -> None:
    check(logits.dim() == 2 and logits.is_floating_point(), "route",
          f"logits must be a floating (T, E) tensor, got {logits.dtype} {tuple(logits.shape)}")
    check(1 <= top_k <= logits.shape[1], "route", f"top_k must be in [1, E={logits.shape[1]}], got {top_k}")


def check_route_backward(grad_weights, weights, experts, num_experts) -> None:
    op = "route_backward"
    check_float(op, "weights", weights, (None, None))
    check_float(op, "grad_weights", grad_weights, tuple(weights.shape))
    check(experts.shape == weights.shape and not experts.is_floating_point(), op,
          f"experts must be an integer tensor of shape {tuple(weights.shape)}, got {experts.dtype} "
          f"{tuple(experts.shape)}")
    check(num_experts >= 1, op, f"num_experts must be >= 1, got {num_experts}")
    check_devices(op, "weights", weights.device, ("grad_weights", grad_weights), ("experts", experts))


def check_sort_slots(experts, num_experts) -> None:
    """Shape and dtype only: the range of the ids is checked where reading them costs nothing (the reference) or on
    the device (kernels)."""
    check(experts.dim() == 2 and experts.dtype in (torch.int32, torch.int64), "sort_slots",
          f"experts must be an int32/int64 (T, K) tensor, got {experts.dtype} {tuple(experts.shape)}")
    check(num_experts >= 1, "sort_slots", f"num_experts must be >= 1, got {num_experts}")


def check_lora_shrink(x, A, experts, order, offsets, dropout_p, grad_z=None) -> None:
    """`lora_shrink`'s inputs; with `grad_z`, those of `lora_shrink_backward`."""
    op = "lora_shrink" if grad_z is None else "lora_shrink_backward"
    check_float(op, "x", x, (None, None))
    check_float(op, "A", A, (None, None, x.shape[1]))
    check(experts.shape[0] == x.shape[0], op, f"experts has {experts.shape[0]} rows but x has T={x.shape[0]} tokens")
    check_devices(op, "x", x.device, ("A", A), ("grad_z", grad_z))
    check_routing(op, experts, order, offsets, A.shape[0], x.device)
    check(0.0 <= dropout_p < 1.0, op, f"dropout_p must be in [0, 1), got {dropout_p}")
    if grad_z is not None:
        check_float(op, "grad_z", grad_z, (experts.numel(), A.shape[1]))


def check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, act, dropout_p,
                             grad_hbar=None, grad_zd=None) -> None:
    """`expand_act_combine`'s inputs; with `grad_hbar`/`grad_zd`, those of `expand_act_combine_backward`."""
    op = "expand_act_combine" if grad_hbar is None else "expand_act_combine_backward"
    check_float(op, "G", G, (None, None))
    T, I = G.shape
    E = Bg.shape[0]
    if U is not None:
        check_float(op, "U", U, (T, I))
    S = experts.numel()
    check(experts.shape[0] == T, op, f"experts has {experts.shape[0]} rows but G has T={T} tokens")
    check_float(op, "zg", zg, (S, None))
    check_float(op, "Bg", Bg, (None, I, zg.shape[1]))
    check_float(op, "zu", zu, (S, None))
    check_float(op, "Bu", Bu, (E, I, zu.shape[1]))
    check(U is not None or zu.shape[1] == 0, op, "an up LoRA (zu, Bu with R > 0) needs U; got U=None")
    check_float(op, "Ad", Ad, (E, None, I))
    check_float(op, "weights", weights, tuple(experts.shape))
    check_routing(op, experts, order, offsets, E, G.device)
    check_devices(op, "G", G.device, ("U", U), ("zg", zg), ("Bg", Bg), ("zu", zu), ("Bu", Bu), ("weights", weights),
                  ("Ad", Ad), ("grad_hbar", grad_hbar), ("grad_zd", grad_zd))
    check(act in ACTIVATIONS, op, f"activation must be one of {ACTIVATIONS}, got {act!r}")
    check(0.0 <= dropout_p < 1.0, op, f"dropout_p must be in [0, 1), got {dropout_p}")
    if grad_hbar is not None:
        check_float(op, "grad_hbar", grad_hbar, (T, I))
        check_float(op, "grad_zd", grad_zd, (S, Ad.shape[1]))


def check_lora_expand_combine(zd, B, weights, experts, order, offsets, grad_y=None) -> None:
    """`lora_expand_combine`'s inputs; with `grad_y`, those of `lora_expand_combine_backward`."""
    op = "lora_expand_combine" if grad_y is None else "lora_expand_combine_backward"
    check_float(op, "zd", zd, (experts.numel(), None))
    check_float(op, "B", B, (None, None, zd.shape[1]))
    check_float(op, "weights", weights, tuple(experts.shape))
    check_routing(op, experts, order, offsets, B.shape[0], zd.device)
    check_devices(op, "zd", zd.device, ("B", B), ("weights", weights), ("grad_y", grad_y))
    if grad_y is not None:
        check_float(op, "grad_y", grad_y, (experts.shape[0], B.shape[1]))

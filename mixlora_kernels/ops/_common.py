"""Pieces shared by the op references: the autocast-off wrapper, the accumulation dtype, the counter-based dropout
mask, expert segments."""

from __future__ import annotations

import functools
import inspect

import torch

_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27, so x * _HASH_MUL stays below 2**63 for 32-bit x: exact in int64, uint32 in kernels


def reference(fn):
    """Run an op reference with autocast off: it computes at the precision it documents (fp32 accumulation), whatever
    autocast region the caller is in; its inputs arrive in whatever dtype autocast gave them."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    # custom_op infers the schema from the signature: hand it the annotations resolved in fn's own module.
    wrapped.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapped


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit inputs, fp64 when any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    return (x >> 16) ^ x


def dropout_scale(slots: torch.Tensor, cols: int, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """LoRA-dropout multiplier for the rows `slots` (N,) int64 of an (S, cols) slot matrix: 0 or 1/(1-p), (N, cols).

    The mask is a pure function of (seed, slot, column): element (j, c) is kept when
    hash32((j * cols + c) mod 2**32 XOR seed) >= floor(p * 2**32). Kernels evaluate the same hash in uint32, so
    the backward regenerates the forward's mask instead of storing an (S, cols) tensor.
    """
    idx = (slots.view(-1, 1) * cols + torch.arange(cols, device=slots.device)) & _M32
    keep = _hash32(idx ^ (seed & _M32)) >= int(p * 2**32)
    return keep.to(dtype) / (1.0 - p)


def segments(offsets: torch.Tensor):
    """(expert, start, end) for each non-empty expert segment of the expert-sorted slot order.

    Reads `offsets` on the host: the reference synchronises here; the kernels do not.
    """
    bounds = offsets.tolist()
    return [(e, s, t) for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])) if t > s]

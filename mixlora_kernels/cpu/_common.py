"""What the CPU kernels' Python wrappers share: the autocast-off wrapper. A leaf module (imports torch only):
`mixlora_kernels.ops` imports the backend, which imports this package."""

from __future__ import annotations

import functools

import torch


def no_autocast(fn):
    """Run a kernel with CPU autocast off, as the references do: it computes at the precision it documents (fp32
    accumulation) whatever autocast region the caller is in."""

    @functools.wraps(fn)
    def wrapped(*args):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)

    return wrapped

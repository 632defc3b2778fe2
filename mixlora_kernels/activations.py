"""The FFN activations the kernels implement, and their derivatives: a leaf module (torch only), shared by the
references, the CPU kernels and the input checks."""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(name: str, g: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(g)
    if name == "gelu":
        return torch.nn.functional.gelu(g)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    if name == "relu":
        return torch.relu(g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_grad(name: str, g: torch.Tensor) -> torch.Tensor:
    """d act(g) / dg, elementwise."""
    if name == "silu":
        sig = torch.sigmoid(g)
        return sig * (1 + g * (1 - sig))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        return cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        inner = c * (g + 0.044715 * g**3)
        th = torch.tanh(inner)
        return 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * c * (1 + 3 * 0.044715 * g * g)
    if name == "relu":
        return (g > 0).to(g.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")

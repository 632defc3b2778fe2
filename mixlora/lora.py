"""Attention LoRA: a frozen linear layer with LoRA (optionally rsLoRA / DoRA) adapters, one per adapter name."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixlora.rows import AdapterRows


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter parameters are created in: fp32 over a 16-bit base (the trainable parameters and their
    optimizer states keep fp32 precision while the frozen base runs its GEMMs in bf16, as PEFT's
    `autocast_adapter_dtype`) and over a quantized one (its packed integer weight promotes to fp32), otherwise the
    base's own dtype (fp32, or fp64 in a fp64 model)."""
    return torch.promote_types(base_dtype, torch.float32)


def init_lora_A(A: torch.Tensor, lora_init: str) -> None:
    """Initialise a LoRA A in place ((R, in), or stacked (E, R, in) with each expert drawn independently)."""
    for a in A.view(-1, *A.shape[-2:]):
        if lora_init == "original":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(a, std=1.0 / A.shape[-2])


def dora_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, without forming the (out, in) sum; batched over leading expert dims.

    ‖W + sBA‖²_row = ‖W‖²_row + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B A Aᵀ) ⊙ B): O(out·in·R) instead of an
    (out, in) temporary per expert. W (out, in), A (..., R, in), B (..., out, R) -> (..., out), detached (DoRA treats
    the norm as a constant in backward).
    """
    with torch.no_grad():
        acc = torch.promote_types(W.dtype, torch.float32)
        W, A, B = W.to(acc), A.to(acc), B.to(acc)
        sq = W.pow(2).sum(-1) + 2 * scale * (B * (W @ A.transpose(-1, -2))).sum(-1) \
            + scale**2 * ((B @ (A @ A.transpose(-1, -2))) * B).sum(-1)
        return sq.clamp_min(0).sqrt()


class LoraAdapter(nn.Module):
    """One adapter's LoRA on a frozen projection it does not own (`LoraLinear` holds one per adapter name):
    `lora_A.weight` (R, in), `lora_B.weight` (out, R), DoRA `lora_magnitude_vector` (out,)."""

    def __init__(self, base: nn.Linear, settings) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = settings.scaling
        self.dropout = nn.Dropout(settings.lora_dropout) if settings.lora_dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        self.lora_A = nn.Linear(self.in_features, settings.r, bias=False, **factory)
        self.lora_B = nn.Linear(settings.r, self.out_features, bias=False, **factory)
        init_lora_A(self.lora_A.weight.data, settings.lora_init)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if settings.use_dora:
            norm = dora_row_norm(base.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(norm.to(**factory))

    def adapt(self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """x (..., in) and its frozen projection base = W x (..., out), no bias -> the adapted output (..., out) in
        base's dtype: `base + b + s·B A drop(x)`, DoRA `m/‖W + sBA‖ ⊙ (base + s·B A drop(x)) + b` (norm detached).
        The adapter runs in its own dtype (fp32 over a 16-bit base, `adapter_dtype`); the sum is rounded once."""
        delta = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))) * self.scaling
        if self.lora_magnitude_vector is not None:
            norm = dora_row_norm(weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
            out = (self.lora_magnitude_vector / norm.to(delta.dtype)) * (base + delta)
        else:
            out = base + delta
        out = out.to(base.dtype)
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, scaling={self.scaling:g}"


class LoraLinear(nn.Module):
    """A frozen linear layer (`base_layer`: an nn.Linear, or a quantized one) with a LoRA adapter for each adapter
    name that targets it.

    `y = W x + b + s·B A drop(x)`; DoRA: `y = m/‖W + sBA‖ ⊙ (W x + s·B A drop(x)) + b` (norm detached).
    `adapters[name]` is a `LoraAdapter`. Forward: x (rows, ..., in) -> (rows, ..., out): W x once for all rows, then
    each adapter's delta on the rows `rows` (`mixlora.rows.AdapterRows`) gives it; the base layer alone while the
    adapters are disabled. `mixlora.unload_mixlora` puts `base_layer` back in its place.
    """

    def __init__(self, base: nn.Module, settings: Mapping[str, object], rows: AdapterRows) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        self.adapters = nn.ModuleDict({name: LoraAdapter(base, s) for name, s in settings.items()})
        self._rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def unwrap(self) -> nn.Module:
        return self.base_layer

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias: F.linear for an nn.Linear; a quantized layer (bitsandbytes) runs its own forward,
        less its bias."""
        if type(self.base_layer) is nn.Linear:
            return F.linear(x, self.weight)
        out = self.base_layer(x)
        return out if self.bias is None else out - self.bias.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows.disabled:
            return self.base_layer(x)
        base = self._project(x)
        outs = []
        for name, start, end in self._rows.slices(x.shape[0], "LoraLinear"):
            if name in self.adapters:
                outs.append(self.adapters[name].adapt(x[start:end], base[start:end], self.weight, self.bias))
            else:
                outs.append(base[start:end] if self.bias is None else base[start:end] + self.bias)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

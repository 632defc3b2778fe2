"""Optimizer parameter groups of MixLoRA adapters, LoRA+ included (Hayou et al. 2024, arXiv 2402.12354).

LoRA+ trains every LoRA B at a larger learning rate than A: with `loraplus_lr_ratio` λ (the adapter config's field,
as MoE-PEFT's), B — the attention adapters' `lora_B.weight` and the experts' `lora_B` — takes lr·λ; A, the router
and DoRA magnitudes take lr.
"""

from __future__ import annotations

from torch import nn

from mixlora.model import adapter_name, adapter_state_dict


def _is_lora_b(name: str) -> bool:
    return "lora_B" in name.split(".")


def adapter_param_groups(model: nn.Module, lr: float, adapter: str | None = None,
                         loraplus_lr_ratio: float | None = None) -> list[dict]:
    """One adapter's parameters (default: the model's only adapter) as optimizer parameter groups.

    Args:
        lr: the adapter's learning rate.
        loraplus_lr_ratio: LoRA+'s λ; None takes the adapter config's `loraplus_lr_ratio`.
    Returns:
        without LoRA+: [{"params": every parameter, "lr": lr}]; with it: [{... A, router, magnitudes, "lr": lr},
        {... every LoRA B, "lr": lr·λ}]. Each group also carries "adapter" (the name) and "lora_plus_b" (whether
        it is the B group), so that a scheduler's or a log's reader can tell them apart.
    """
    name = adapter_name(model, adapter)
    ratio = loraplus_lr_ratio if loraplus_lr_ratio is not None else model.mixlora_configs[name].loraplus_lr_ratio
    params = adapter_state_dict(model, name)
    if ratio is None:
        return [{"params": list(params.values()), "lr": lr, "adapter": name, "lora_plus_b": False}]
    if not ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {ratio!r}")
    rest = [p for n, p in params.items() if not _is_lora_b(n)]
    b = [p for n, p in params.items() if _is_lora_b(n)]
    return [{"params": rest, "lr": lr, "adapter": name, "lora_plus_b": False},
            {"params": b, "lr": lr * ratio, "adapter": name, "lora_plus_b": True}]

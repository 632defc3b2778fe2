"""Injection of MixLoRA into Hugging Face decoder models, the aux loss, saving and loading adapters."""

from __future__ import annotations

import functools
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixlora.checkpoint import from_published_state_dict, load_adapter, save_adapter, to_published_state_dict
from mixlora.config import MixLoraConfig
from mixlora.lora import LoraLinear
from mixlora.moe import FFN_KINDS, SUPPORTED_ARCHITECTURES, MixLoraSparseMoe, require_ffn_kind

ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector", "moe_gate")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the first ModuleList whose every element has `self_attn` and `mlp`."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and \
                all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in module):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder layers with `self_attn` and `mlp` submodules; "
                     f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


def moe_layers(model: nn.Module) -> list[MixLoraSparseMoe]:
    """The MixLoRA MoE modules of `model`, in layer order."""
    return [m for m in model.modules() if isinstance(m, MixLoraSparseMoe)]


def model_activation(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if name is None:
        raise ValueError("the model config names no FFN activation (hidden_act / hidden_activation): set "
                         "MixLoraConfig.act_fn")
    return name


def check_targets(model: nn.Module, config: MixLoraConfig) -> nn.ModuleList:
    """The decoder layers, after checking that every FFN is supported and every target names a projection."""
    layers = decoder_layers(model)
    ffn_names = {n for layer in layers for n in FFN_KINDS[require_ffn_kind(layer.mlp)]}
    attn_names = {n for layer in layers for n, m in layer.self_attn.named_children() if isinstance(m, nn.Linear)}
    unknown = [t for t in config.target_modules if t not in ffn_names | attn_names]
    if unknown:
        raise ValueError(f"MixLoraConfig.target_modules {unknown} match no projection of {type(model).__name__}; "
                         f"attention projections: {sorted(attn_names)}, FFN projections: {sorted(ffn_names)}")
    return layers


def _inject(model: nn.Module, config: MixLoraConfig) -> None:
    layers = check_targets(model, config)
    act = config.act_fn or model_activation(model)
    for p in model.parameters():
        p.requires_grad_(False)
    attention = config.attention_config()
    for layer in layers:
        for name in config.target_modules:
            base = getattr(layer.self_attn, name, None)
            if isinstance(base, nn.Linear):
                setattr(layer.self_attn, name, LoraLinear(base, attention))
        layer.mlp = MixLoraSparseMoe(layer.mlp, config, act)
    model.train(model.training)  # the new modules take the model's mode: an eval model (from_pretrained) has no dropout
    model.mixlora_config = config
    model.save_mixlora = functools.partial(save_mixlora, model)
    _AuxLossHooks(model)


def get_mixlora_model(model: nn.Module, config: MixLoraConfig) -> nn.Module:
    """Turn a Hugging Face decoder model into a MixLoRA model, in place, and return it.

    Freezes every base parameter; wraps each attention projection named in `config.target_modules` in a LoRA adapter
    and replaces every decoder layer's FFN by a `MixLoraSparseMoe` with experts on the targeted FFN projections.
    Adapters start as LoRA does (A kaiming-uniform or gaussian, B zero), the router N(0, router_init_range) in fp32,
    so the model's output is unchanged until training moves B. When the model is trained with labels, the returned
    `loss` includes the router aux loss; every output carries `aux_loss`.
    """
    if getattr(model, "mixlora_config", None) is not None or getattr(model, "mixlora_configs", None) is not None:
        raise ValueError("this model already has a MixLoRA adapter")
    _inject(model, config)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter of `model` under its module name (router, attention and expert LoRA, DoRA)."""
    return {n: p for n, p in model.named_parameters() if any(part in n.split(".") for part in ADAPTER_PARAMETER_NAMES)}


def inject_adapter_in_model(model: nn.Module, config: MixLoraConfig, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """`get_mixlora_model` followed by loading `weights` (published or legacy key layout; every key must match)."""
    get_mixlora_model(model, config)
    ours = adapter_state_dict(model)
    loaded = from_published_state_dict(dict(weights), ours)
    with torch.no_grad():
        for name, tensor in loaded.items():
            ours[name].copy_(tensor)
    return model


def save_mixlora(model: nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True) -> None:
    """Write `adapter_config.json` and the adapter weights (published key names) to `save_directory`, atomically."""
    config = getattr(model, "mixlora_config", None)
    if config is None:
        raise ValueError("save_mixlora: the model has no MixLoRA adapter (call get_mixlora_model first)")
    published = to_published_state_dict({n: p.detach() for n, p in adapter_state_dict(model).items()})
    save_adapter(save_directory, config, published, safe_serialization=safe_serialization)


class MixLoraModelForCausalLM:
    """Loader with the published package's interface."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, *model_args, **kwargs):
        """Load the base model named in the adapter's config and the adapter from `name_or_path`.

        `model_args`/`kwargs` (e.g. `dtype`/`torch_dtype`, `device_map`) go to the base model's `from_pretrained`;
        `base_model_name_or_path=...` overrides the config's base. Returns (model, config). The adapter takes the
        dtype the base was loaded in (the router stays fp32): a model loaded in bf16 for inference is bf16 throughout,
        while `get_mixlora_model` on a 16-bit base creates fp32 adapters for training (`mixlora.lora.adapter_dtype`).
        """
        from transformers import AutoModelForCausalLM

        config, weights = load_adapter(name_or_path)
        base = kwargs.pop("base_model_name_or_path", None) or config.base_model_name_or_path
        if not base:
            raise ValueError(f"{name_or_path}: adapter_config.json has no base_model_name_or_path; pass "
                             "base_model_name_or_path=... to from_pretrained")
        model = AutoModelForCausalLM.from_pretrained(base, *model_args, **kwargs)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        inject_adapter_in_model(model, config, weights)
        with torch.no_grad():
            for name, p in adapter_state_dict(model).items():
                if "moe_gate" not in name.split("."):
                    p.data = p.data.to(dtype)
        return model, config


def router_aux_loss(router_logits: list[torch.Tensor], top_k: int, coef: float, z_coef: float = 0.0,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Load-balance loss over the concatenated router logits of all MoE layers (docs/algorithm.md §1).

    Args:
        router_logits: per layer (T, E) logits, T = batch·seq in row-major order.
        attention_mask: (batch, seq), 0 for padding; padding rows are excluded. Ignored if it does not have T entries.
    Returns:
        coef · E · Σ_k Σ_e f_{k,e} P_e (+ z_coef · mean logsumexp²), a scalar.
    """
    logits = torch.cat([l.to(torch.promote_types(l.dtype, torch.float32)) for l in router_logits])
    if attention_mask is not None and attention_mask.numel() == router_logits[0].shape[0]:
        keep = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.bool).repeat(len(router_logits))
        logits = logits[keep]
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, E).to(probs.dtype)
    loss = coef * E * (chosen.mean(0) * probs.mean(0)).sum()
    if z_coef:
        loss = loss + z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return loss


class _AuxLossHooks:
    """Forward hooks on the top-level model: remember the attention mask, then add the aux loss to `loss`.

    The aux loss is computed from the router logits each MoE layer kept during this forward. Under gradient
    checkpointing those logits only carry gradients with the non-reentrant implementation.
    """

    def __init__(self, model: nn.Module) -> None:
        self.moes = moe_layers(model)
        self.attention_mask = None
        model.register_forward_pre_hook(self.before, with_kwargs=True)
        model.register_forward_hook(self.after, with_kwargs=True)

    def before(self, model, args, kwargs):
        self.attention_mask = kwargs.get("attention_mask")
        for moe in self.moes:
            moe.router_logits = None

    def after(self, model, args, kwargs, output):
        layers = self.moes
        logits = [m.router_logits for m in layers if m.router_logits is not None]
        if not logits or not hasattr(output, "keys"):
            return output
        config = model.mixlora_config
        aux = router_aux_loss(logits, config.top_k, config.router_aux_loss_coef, config.router_z_loss_coef,
                              self.attention_mask)
        output["aux_loss"] = aux
        if model.training and config.router_loss and output.get("loss") is not None:
            if torch.is_grad_enabled() and not aux.requires_grad and any(m.moe_gate.weight.requires_grad
                                                                         for m in layers):
                raise RuntimeError("MixLoRA's router aux loss lost its gradient: with gradient checkpointing use "
                                   "gradient_checkpointing_kwargs={'use_reentrant': False}")
            output["loss"] = output["loss"] + aux.to(output["loss"].dtype)
        return output

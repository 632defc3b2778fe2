"""Injection of MixLoRA adapters into Hugging Face decoder models, undoing it, and the adapters' weights.

A model holds one or more named adapters (`get_mixlora_model`: one, named "default"; `get_multi_mixlora_model`:
several, each with its own `MixLoraConfig`). Every attention projection an adapter targets becomes a
`mixlora.lora.LoraLinear` and every FFN a `mixlora.moe.MixLoraSparseMoe`, each holding one adapter per name; one
`mixlora.rows.AdapterRows` tells them which adapter owns which batch rows, and `mixlora.losses.LossHooks` add each
adapter's losses to the output. Parameter names: `...self_attn.{P}.adapters.{name}.lora_A.weight`,
`...mlp.adapters.{name}.moe_gate.weight`, `...mlp.adapters.{name}.experts.{P}.lora_A`; `adapter_state_dict` gives one
adapter's parameters without `adapters.{name}.`, the names `mixlora.checkpoint` maps to the published keys.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mixlora.checkpoint import from_published_state_dict, read_adapter, to_published_state_dict, write_adapter
from mixlora.config import MixLoraConfig, close_matches
from mixlora.lora import LoraLinear
from mixlora.losses import LossHooks
from mixlora.moe import FFN_KINDS, SUPPORTED_ARCHITECTURES, MixLoraSparseMoe, require_ffn_kind
from mixlora.rows import AdapterRows

DEFAULT_ADAPTER_NAME = "default"


@dataclass
class _Injection:
    """What `_inject` changed in a model, for `unload_mixlora`: the (parent, attribute) of every module it put in,
    the base parameters' `requires_grad` by name, the hook handles, the quantized layers' CPU packing flags
    (`_keep_quantized_layers_trainable`); and the rows object its modules share."""

    rows: AdapterRows
    replaced: list[tuple[nn.Module, str]]
    requires_grad: dict[str, bool]
    handles: list
    cpu_packing: list[tuple[nn.Module, bool]]


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


def _attention_projections(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.self_attn.named_children() if isinstance(m, nn.Linear)]


def check_targets(model: nn.Module, config: MixLoraConfig) -> nn.ModuleList:
    """The decoder layers, after checking that every FFN is supported and every target names a projection."""
    layers = decoder_layers(model)
    ffn_names = {n for layer in layers for n in FFN_KINDS[require_ffn_kind(layer.mlp)]}
    attn_names = {n for layer in layers for n in _attention_projections(layer)}
    known = sorted(ffn_names | attn_names)
    unknown = [t for t in config.target_modules if t not in known]
    if unknown:
        hints = [f"{t!r}: did you mean {' or '.join(map(repr, close))}?" for t in unknown
                 if (close := close_matches(t, known))]
        raise ValueError(f"MixLoraConfig.target_modules {unknown} match no projection of {type(model).__name__}"
                         + (f" ({'; '.join(hints)})" if hints else "")
                         + f"; attention projections: {sorted(attn_names)}, FFN projections: {sorted(ffn_names)}")
    return layers


def _check_dora(layers: nn.ModuleList, config: MixLoraConfig) -> None:
    """DoRA needs the frozen weights' row norms (and DoRA experts run every FFN projection as W x): refuse it over
    quantized layers, whose weights are packed integers."""
    ffn = {n: m for layer in layers for n, m in layer.mlp.named_children() if isinstance(m, nn.Linear)}
    attention = {n: m for layer in layers for n, m in layer.self_attn.named_children() if isinstance(m, nn.Linear)}
    used = ({n: m for n, m in attention.items() if n in config.target_modules} if config.use_dora else {}) | \
        (ffn if config.expert_config().use_dora else {})
    quantized = sorted({n for n, m in used.items() if not m.weight.is_floating_point()})
    if quantized:
        raise ValueError(f"MixLoraConfig.use_dora: DoRA needs the frozen weights' row norms, and {quantized} are "
                         f"quantized ({type(used[quantized[0]]).__name__}); use LoRA or rsLoRA adapters on a "
                         "quantized base, or load the base unquantized")


def _check_configs(model: nn.Module, configs: Mapping[str, MixLoraConfig]) -> nn.ModuleList:
    if hasattr(model, "mixlora_configs"):
        raise ValueError("this model already has a MixLoRA adapter (mixlora.unload_mixlora removes it)")
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("get_multi_mixlora_model: configs must be a non-empty dict adapter name -> MixLoraConfig")
    layers = decoder_layers(model)
    for name, config in configs.items():
        if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ModuleDict, name):
            raise ValueError(f"adapter name {name!r} must be a Python identifier and not an nn.ModuleDict attribute "
                             "(it becomes a module name)")
        if not isinstance(config, MixLoraConfig):
            raise ValueError(f"adapter {name!r}: expected a MixLoraConfig, got {type(config).__name__}")
        try:
            check_targets(model, config)
            _check_dora(layers, config)
        except ValueError as error:
            raise ValueError(error if list(configs) == [DEFAULT_ADAPTER_NAME] else f"adapter {name!r}: {error}") \
                from None
    return layers


def _keep_quantized_layers_trainable(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """On a CPU with AVX512-BF16, a bitsandbytes 4-bit layer converts its weight to a packed inference format the
    first time it runs in eval mode without gradients; that format has no backward, so a later training step would
    lose the gradient through the layer without an error (bitsandbytes only warns). Turn the conversion off for the
    life of the adapters; warn about a layer converted already. Returns (layer, previous flag) for unloading."""
    flags = []
    for name, layer in model.named_modules():
        if not hasattr(layer, "support_avx512bf16_for_cpu"):
            continue
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            warnings.warn(f"{name} ran in eval mode without gradients on the CPU before MixLoRA was injected, and "
                          "bitsandbytes converted it to its inference-only format: training this model would not "
                          "backpropagate through it; load the base again and inject first to train", stacklevel=3)
        flags.append((layer, layer.support_avx512bf16_for_cpu))
        layer.support_avx512bf16_for_cpu = False
    return flags


def _inject(model: nn.Module, configs: Mapping[str, MixLoraConfig]) -> nn.Module:
    layers = _check_configs(model, configs)
    configs = dict(configs)
    activation = "" if all(c.act_fn for c in configs.values()) else model_activation(model)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    rows = AdapterRows(list(configs))
    replaced = []
    for layer in layers:
        for proj in _attention_projections(layer):
            settings = {name: c.attention_config() for name, c in configs.items() if proj in c.target_modules}
            if settings:
                setattr(layer.self_attn, proj, LoraLinear(getattr(layer.self_attn, proj), settings, rows))
                replaced.append((layer.self_attn, proj))
        layer.mlp = MixLoraSparseMoe(layer.mlp, configs, activation, rows)
        replaced.append((layer, "mlp"))
    model.train(model.training)  # the new modules take the model's mode: an eval model (from_pretrained) has no dropout
    hooks = LossHooks(model, moe_layers(model), configs, rows)
    model.mixlora_configs = configs
    model._mixlora = _Injection(rows, replaced, requires_grad, hooks.handles, _keep_quantized_layers_trainable(model))
    return model


def get_mixlora_model(model: nn.Module, config: MixLoraConfig, adapter_name: str = DEFAULT_ADAPTER_NAME) -> nn.Module:
    """Turn a Hugging Face decoder model into a MixLoRA model, in place, and return it.

    Freezes every base parameter; wraps each attention projection named in `config.target_modules` in a LoRA adapter
    and replaces every decoder layer's FFN by a `MixLoraSparseMoe` with experts on the targeted FFN projections.
    Adapters start as LoRA does (A kaiming-uniform or gaussian, B zero), the router N(0, router_init_range) in fp32,
    so the model's output is unchanged until training moves B. When the model is trained with labels, the returned
    `loss` includes the router aux loss; every output carries `aux_loss`. `model.mixlora_configs` is
    {adapter_name: config}; `unload_mixlora` undoes all of it.
    """
    return _inject(model, {adapter_name: config})


def get_multi_mixlora_model(model: nn.Module, configs: Mapping[str, MixLoraConfig]) -> nn.Module:
    """Turn a Hugging Face decoder model into a model with several MixLoRA adapters, in place, and return it.

    Args:
        model: the base model (its parameters are frozen).
        configs: adapter name (a Python identifier) -> its MixLoraConfig.
    Returns:
        `model`, with `mixlora_configs` (name -> config). Each adapter is initialised as `get_mixlora_model` would
        (B zero, router N(0, router_init_range) fp32), adapters in the order of `configs`. Run it inside
        `batch_adapters`. With labels, `loss` is Σ over the adapters in the batch of (mean LM loss over their rows +
        their aux loss when training with router_loss); outputs carry `adapter_losses` (name -> LM loss),
        `adapter_aux_losses` (name -> aux loss) and `aux_loss` (their sum).
    """
    return _inject(model, configs)


def _injection(model: nn.Module) -> _Injection:
    state = getattr(model, "_mixlora", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no MixLoRA adapter (call mixlora.get_mixlora_model first)")
    return state


def unload_mixlora(model: nn.Module) -> nn.Module:
    """Remove every MixLoRA adapter from `model`, in place, and return it: the original attention projections and
    FFN modules go back (with the base weights as they are now), the hooks are removed and every base parameter's
    `requires_grad` is what it was before injection. The adapters' weights are dropped: save them first."""
    state = _injection(model)
    for handle in state.handles:
        handle.remove()
    for layer, flag in state.cpu_packing:
        layer.support_avx512bf16_for_cpu = flag
    for parent, attribute in reversed(state.replaced):
        setattr(parent, attribute, getattr(parent, attribute).unwrap())
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    del model.mixlora_configs, model._mixlora
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block: every MixLoRA module computes the module it replaced, no aux loss."""
    rows = _injection(model).rows
    before, rows.disabled = rows.disabled, True
    try:
        yield
    finally:
        rows.disabled = before


@contextlib.contextmanager
def batch_adapters(model: nn.Module, rows: str | Sequence[str]) -> Iterator[list[tuple[str, int, int]]]:
    """Run the forwards inside the block with batch row i belonging to adapter `rows[i]`.

    Args:
        rows: one adapter name per batch row, grouped by adapter (each adapter's rows contiguous), or one name for
            every row of any batch size (generation with a single adapter).
    Yields:
        the spans (name, first row, end row).
    Raises:
        ValueError: an unknown name, rows not grouped by adapter (sort the batch by adapter first; a stable sort
            keeps each adapter's row order), or a block nested in another.
    """
    plan = _injection(model).rows
    if plan.spans is not None:
        raise ValueError("batch_adapters blocks cannot be nested")
    names = [rows] if isinstance(rows, str) else list(rows)
    if not names:
        raise ValueError("batch_adapters: no rows given")
    unknown = sorted({n for n in names if n not in plan.names})
    if unknown:
        raise ValueError(f"batch_adapters: unknown adapter(s) {unknown}; this model has {plan.names}")
    spans: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], i + 1)
            continue
        earlier = next((s for s in spans if s[0] == name), None)
        if earlier is not None:
            raise ValueError(f"batch_adapters: rows must be grouped by adapter (contiguous), but adapter {name!r} "
                             f"has rows {earlier[1]}..{earlier[2] - 1} and again row {i}; sort the batch rows by "
                             "adapter first (a stable sort keeps each adapter's row order)")
        spans.append((name, i, i + 1))
    # One name: one span over all rows of any batch size.
    plan.num_rows = 1 if isinstance(rows, str) else len(names)
    plan.spans = spans
    try:
        yield list(spans)
    finally:
        plan.spans, plan.num_rows = None, 0


def adapter_name(model: nn.Module, adapter: str | None = None) -> str:
    """`adapter` after checking `model` has it; None: the model's only adapter."""
    names = _injection(model).rows.names
    if adapter is None:
        if len(names) > 1:
            raise ValueError(f"the model has the adapters {names}: name one (adapter=...)")
        return names[0]
    if adapter not in names:
        raise ValueError(f"unknown adapter {adapter!r}; this model has {names}")
    return adapter


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, nn.Parameter]:
    """The parameters of one adapter (default: the model's only one; router, attention and expert LoRA, DoRA),
    under their module names with `adapters.{name}.` removed: `...self_attn.q_proj.lora_A.weight`,
    `...mlp.moe_gate.weight`, `...mlp.experts.gate_proj.lora_A`, ... (the names `mixlora.checkpoint` maps)."""
    marker = f".adapters.{adapter_name(model, adapter)}."
    return {n.replace(marker, ".", 1): p for n, p in model.named_parameters() if marker in n}


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """One adapter's parameters, e.g. for its own optimizer param group (its own learning rate and state)."""
    return list(adapter_state_dict(model, adapter).values())


def set_adapter_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], adapter: str | None = None) -> None:
    """Copy `weights` (published or legacy key layout; every key must match) into one adapter of `model`."""
    ours = adapter_state_dict(model, adapter)
    loaded = from_published_state_dict(dict(weights), ours)
    with torch.no_grad():
        for name, tensor in loaded.items():
            ours[name].copy_(tensor)


def inject_adapter_in_model(model: nn.Module, config: MixLoraConfig, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """`get_mixlora_model` followed by loading `weights` (published or legacy key layout; every key must match)."""
    get_mixlora_model(model, config)
    set_adapter_weights(model, weights)
    return model


def save_mixlora(model: nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True, *,
                 adapter: str | None = None) -> str:
    """Write one adapter (default: the model's only one) to `save_directory` in the published format
    (`adapter_config.json` + weights), atomically; return the weights file's path."""
    name = adapter_name(model, adapter)
    published = to_published_state_dict({n: p.detach() for n, p in adapter_state_dict(model, name).items()})
    return write_adapter(save_directory, model.mixlora_configs[name], published, safe_serialization=safe_serialization)


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

        config, weights = read_adapter(name_or_path)
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

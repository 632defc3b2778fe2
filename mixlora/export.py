"""Export a MixLoRA model as a standard Hugging Face sparse-MoE checkpoint, for MoE serving engines.

A top-k MixLoRA FFN (docs/algorithm.md §1) is a sparse MoE block whose expert e is the frozen FFN with expert e's
LoRA merged into its own copy of the weights:

    W_e = W + s·B_e·A_e                                   (LoRA, rsLoRA: s = α/R or α/√R)
    W_e = m_e / ‖W + s·B_e·A_e‖_row ⊙ (W + s·B_e·A_e)     (DoRA: exact, the norm is per output row)

for every FFN projection (an untargeted projection is W itself, copied E times). Attention LoRA is merged the same
way (biases are kept as they are: ours adds them after the DoRA rescale too). The router is copied. The result is
written with the `save_pretrained` of the target class, so any engine that serves that class serves it.

Targets (`format="auto"` picks from the base's `model_type`):

    llama, mistral -> MixtralForCausalLM      (num_local_experts E, num_experts_per_tok K, sliding_window as the base)
    qwen3          -> Qwen3MoeForCausalLM     (norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                               moe_intermediate_size I; the same q/k RMSNorm attention)
    qwen2          -> Qwen2MoeForCausalLM     (norm_topk_prob=True, q/k/v biases; its always-present shared expert
                                               is given width 0, so it adds exactly 0)

The other bases MixLoRA trains have no transformers MoE class with their layers (`NO_TARGET` says why for each) and
are refused, as are bases with biases, activations or sliding-window layouts the target lacks, and adapters routed
by top-p ("mixlora-dynamic") or switch ("mixlora-switch"), which no target's top-k router represents
(`check_exportable`).

Semantics, checked against transformers 5.24 (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`, `Qwen2MoeTopKRouter`,
`*Experts.forward`):

- Router. Target: logits = F.linear(h, W_g) with W_g in the *model's* dtype; softmax in fp32; torch.topk;
  renormalise (Mixtral always, Qwen with norm_topk_prob=True); the fp32 weights multiply each expert's output,
  which is cast back to the model dtype before the per-token sum. Ours: W_g kept in fp32 and h upcast, softmax fp32,
  top-k, renormalise. In an fp32 export the two are the same computation (tests/test_export.py: logits ≤ 1e-5
  relative, identical greedy tokens). Differences:
  * 16-bit exports: W_g and the logits are rounded to bf16/fp16 in the target (it has no fp32 router), so a token
    whose top-K probabilities are within that rounding (~1e-2 relative in bf16) of the next expert's can be routed
    differently, and the routing weights differ at bf16 precision. An fp32 export has no such difference.
  * fp64: the target's softmax is fp32 even in an fp64 model (ours is fp64): routing weights differ by ~1e-7.
  * Ties: ours picks the lower expert id (stable sort); torch.topk's order among equal values is unspecified.
- Experts: act(x W1_eᵀ) ⊙ (x W3_eᵀ) → W2_e, gate rows first in `gate_up_proj`, as ours. Mixtral's experts apply
  `hidden_act`, but serving engines implement Mixtral/Qwen-MoE experts as SiLU-gated only, so only SiLU FFNs export.
- Training-only settings are dropped and reported: LoRA dropout (merged away), jitter (the targets' jitter is
  training-only too and is set to 0), router z-loss (no equivalent). router_aux_loss_coef is copied (the targets'
  load-balance loss has the same form and is only computed when training with output_router_logits).
- transformers' default experts implementation on CPU (grouped_mm) needs H and I times the element size to be
  multiples of 16 bytes and refuses fp64; other shapes load with `experts_implementation="eager"`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field

import torch
from torch import nn

FORMATS = ("mixtral", "qwen3_moe", "qwen2_moe")
# Serving dtypes (the command's --dtype choices); the function also takes torch.float64, for exactness tests.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Largest shard; safetensors shards of a few GB are what the Hub and the engines' loaders expect.
MAX_SHARD_SIZE = "5GB"

# base model_type -> export format.
AUTO_FORMAT = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
# Why the other bases MixLoRA supports have no exact target class.
NO_TARGET = {
    "gemma": "its FFN is GELU-gated, its RMSNorm scales by (1 + w) and its embeddings by √H; no transformers MoE "
             "class has these layers",
    "gemma2": "its FFN is GELU-gated, it has four norms per layer and soft-caps attention and output logits; no "
              "transformers MoE class has these layers",
    "gemma3_text": "its FFN is GELU-gated, it has (1 + w) q/k norms, four norms per layer and local/global RoPE; no "
                   "transformers MoE class has these layers",
    "phi": "it runs attention and FFN in parallel with LayerNorm, biases and partial RoPE; no transformers MoE class "
           "has these layers",
    "phi3": "the only Phi MoE class (phimoe) routes with sparsemixer instead of softmax top-k and uses LayerNorm with "
            "biases",
}
_CLASSES = {  # format -> (config class, model class, display name)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "Mixtral"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3-MoE"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2-MoE"),
}
# The attention layout of each source and target; a base exports only to the target with its own layout.
_SOURCE_ATTENTION = {"llama": "plain", "mistral": "plain", "qwen3": "qk_norm", "qwen2": "qkv_bias"}
_TARGET_ATTENTION = {"mixtral": "plain", "qwen3_moe": "qk_norm", "qwen2_moe": "qkv_bias"}
_ATTENTION_WORDS = {
    "plain": "q/k/v/o projections without biases or q/k norms",
    "qk_norm": "per-head RMSNorm on q and k (q_norm/k_norm)",
    "qkv_bias": "biases on the q/k/v projections",
}


@dataclass
class ExportSummary:
    """What `export_moe` wrote; `str(summary)` is the report the `mixlora export` command prints."""

    output_dir: str
    format: str
    architecture: str
    dtype: str
    num_experts: int
    top_k: int
    num_parameters: int
    num_bytes: int
    base_parameters: int
    base_bytes: int
    base_dtype: str
    shards: list[tuple[str, int]]
    dropped: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def serve_command(self) -> str:
        return f"vllm serve {self.output_dir}"

    def __str__(self) -> str:
        lines = [
            f"wrote {self.output_dir}: {self.architecture} ({self.format}), {self.dtype}, E {self.num_experts}, "
            f"K {self.top_k}",
            f"parameters {self.num_parameters:,} ({_size(self.num_bytes)}) against the base's "
            f"{self.base_parameters:,} ({_size(self.base_bytes)}, {self.base_dtype}): "
            f"{self.num_parameters / self.base_parameters:.2f}x, the FFN is stored {self.num_experts} times",
        ]
        lines += [f"  {name}  {_size(size)}" for name, size in self.shards]
        if self.dropped:
            lines.append(f"dropped (training only): {', '.join(self.dropped)}")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"serve: {self.serve_command}")
        return "\n".join(lines)


def check_exportable(base_config, config, format: str = "auto") -> str:
    """The export format for a base model config (transformers) and a `MixLoraConfig`, or a ValueError naming what
    the target class cannot represent exactly and why."""
    from mixlora.moe import ACTIVATION_ALIASES

    _refuse_routing_strategy(config.routing_strategy)
    if format not in ("auto", *FORMATS):
        raise ValueError(f"export: format must be one of auto, {', '.join(FORMATS)}, got {format!r}")
    text = getattr(base_config, "text_config", None) or base_config
    model_type = text.model_type
    if model_type not in AUTO_FORMAT:
        why = NO_TARGET.get(model_type, "it is not a base MixLoRA exports")
        raise ValueError(f"export: a {model_type} base has no exact sparse-MoE target: {why}; exportable bases: "
                         + ", ".join(f"{k} -> {v}" for k, v in AUTO_FORMAT.items()))
    target = AUTO_FORMAT[model_type] if format == "auto" else format
    name = _CLASSES[target][2]
    source_layout, target_layout = _SOURCE_ATTENTION[model_type], _TARGET_ATTENTION[target]
    if source_layout != target_layout:
        raise ValueError(f"export: {name} cannot hold a {model_type} base: its attention has "
                         f"{_ATTENTION_WORDS[target_layout]}, the base's has {_ATTENTION_WORDS[source_layout]}; "
                         f"export it as {AUTO_FORMAT[model_type]}")
    if getattr(text, "attention_bias", False) and target != "qwen3_moe":
        raise ValueError(f"export: the base's attention projections have biases (attention_bias=True), which "
                         f"{name}'s attention cannot hold")
    if getattr(text, "mlp_bias", False):
        raise ValueError(f"export: the base's FFN projections have biases (mlp_bias=True), which {name}'s experts "
                         "cannot hold")
    activation = config.act_fn or getattr(text, "hidden_act", None)
    if ACTIVATION_ALIASES.get(activation) != "silu":
        raise ValueError(f"export: the experts' activation is {activation!r}, but {name} experts are SiLU-gated "
                         "(silu(gate)·up -> down, the only form serving engines implement for this class); a "
                         "non-SiLU FFN cannot be exported exactly")
    layer_types = getattr(text, "layer_types", None) or []
    if target == "qwen3_moe" and len(set(layer_types)) > 1:
        raise ValueError("export: the base mixes sliding-window and full-attention layers (layer_types), but "
                         "Qwen3-MoE applies one sliding_window to every layer")
    return target


def target_config(base_config, config, format: str, dtype: torch.dtype):
    """The transformers config of the export: the base's attention, RoPE, norm and vocabulary settings copied
    exactly, the FFN as E experts of the base's width, top-K softmax routing with renormalisation."""
    import transformers

    text = getattr(base_config, "text_config", None) or base_config
    copied = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
              "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_dropout")
    values = {key: getattr(text, key) for key in copied if hasattr(text, key)}
    values.update(
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        hidden_act="silu", intermediate_size=text.intermediate_size, num_experts_per_tok=config.top_k,
        router_aux_loss_coef=float(config.router_aux_loss_coef), output_router_logits=False, dtype=dtype,
    )
    if format == "mixtral":
        values.update(num_local_experts=config.num_experts, router_jitter_noise=0.0,
                      sliding_window=getattr(text, "sliding_window", None))
    else:
        values.update(num_experts=config.num_experts, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      moe_intermediate_size=text.intermediate_size, use_sliding_window=text.use_sliding_window,
                      sliding_window=text.sliding_window if "sliding_attention" in (text.layer_types or []) else None)
        if format == "qwen3_moe":
            values.update(attention_bias=text.attention_bias)
        else:
            values.update(shared_expert_intermediate_size=0, qkv_bias=True, layer_types=list(text.layer_types),
                          max_window_layers=text.max_window_layers)
    return getattr(transformers, _CLASSES[format][0])(**values)


def merged_weight(weight: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """One projection with its LoRA merged, in float64: W (out, in), A (R, in), B (out, R), DoRA magnitude (out,).

    Returns W + s·B·A, or with DoRA m / ‖W + s·B·A‖_row ⊙ (W + s·B·A); W itself (as float64) when A is None.
    """
    W = weight.detach().to(torch.float64)  # no copy when the caller passes W in float64 already
    if A is None:
        return W
    W = torch.addmm(W, B.detach().to(torch.float64), A.detach().to(torch.float64), alpha=scaling)
    if magnitude is not None:
        W = W.mul_((magnitude.detach().to(torch.float64) / W.norm(dim=1)).unsqueeze(1))
    return W


def _fill_experts(ffn, experts, name: str, out: torch.Tensor) -> None:
    """Write projection `name` of each of the E experts (`experts`, a `MoeExperts` of the `MixLoraSparseMoe` `ffn`),
    merged, into out (E, rows, in)."""
    base = getattr(ffn, name).weight.detach()
    if name not in experts.experts:
        out.copy_(base.expand_as(out))
        return
    lora, W = experts.experts[name], base.to(torch.float64)
    magnitude = lora.lora_magnitude_vector
    for e in range(experts.num_experts):
        out[e] = merged_weight(W, lora.lora_A[e], lora.lora_B[e], experts.scaling,
                               None if magnitude is None else magnitude[e])


def merged_state_dict(model: nn.Module, format: str, dtype: torch.dtype, progress: bool = False) -> dict:
    """The state dict of the export (the target class's own parameter names) from a MixLoRA model (its only
    adapter).

    Per decoder layer: attention LoRA merged into q/k/v/o, the router as `mlp.gate.weight` (E, H), the experts as
    `mlp.experts.gate_up_proj` (E, 2I, H) (gate rows first) and `mlp.experts.down_proj` (E, H, I). Every other base
    tensor (embeddings, norms, q/k norms, biases, lm_head) is copied under its own name. All in `dtype`, on the CPU.
    """
    from tqdm.auto import tqdm

    from mixlora.lora import LoraLinear
    from mixlora.model import adapter_name, decoder_layers

    adapter = adapter_name(model)
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    # A wrapped attention projection's own tensors sit under `base_layer.` (LoraLinear): the target's names drop it.
    source = {key.replace(".base_layer.", "."): value for key, value in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(layers, desc="merge", unit="layer", disable=not progress, dynamic_ncols=True)):
        p = f"{prefix}.{i}."
        for name, child in layer.self_attn.named_children():
            if isinstance(child, LoraLinear) and adapter in child.adapters:
                lora = child.adapters[adapter]
                out[f"{p}self_attn.{name}.weight"] = merged_weight(
                    child.weight, lora.lora_A.weight, lora.lora_B.weight, lora.scaling,
                    lora.lora_magnitude_vector).to("cpu", dtype)
        ffn, experts = layer.mlp, layer.mlp.adapters[adapter]
        I, H = ffn.gate_proj.weight.shape
        gate_up = torch.empty(experts.num_experts, 2 * I, H, dtype=dtype)
        down = torch.empty(experts.num_experts, H, I, dtype=dtype)
        _fill_experts(ffn, experts, "gate_proj", gate_up[:, :I])
        _fill_experts(ffn, experts, "up_proj", gate_up[:, I:])
        _fill_experts(ffn, experts, "down_proj", down)
        out[f"{p}mlp.experts.gate_up_proj"], out[f"{p}mlp.experts.down_proj"] = gate_up, down
        out[f"{p}mlp.gate.weight"] = experts.moe_gate.weight.detach().to("cpu", dtype)
        if format == "qwen2_moe":
            out.update({f"{p}mlp.shared_expert.gate_proj.weight": torch.zeros(0, H, dtype=dtype),
                        f"{p}mlp.shared_expert.up_proj.weight": torch.zeros(0, H, dtype=dtype),
                        f"{p}mlp.shared_expert.down_proj.weight": torch.zeros(H, 0, dtype=dtype),
                        f"{p}mlp.shared_expert_gate.weight": torch.zeros(1, H, dtype=dtype)})
    layer_prefix, module_part = f"{prefix}.", prefix.count(".") + 2  # prefix.{i}.<module>...
    for key, tensor in source.items():
        parts = key.split(".")
        if key in out or _is_adapter(key):
            continue
        if key.startswith(layer_prefix) and len(parts) > module_part and parts[module_part] == "mlp":
            continue  # the dense FFN weights, now inside every expert
        out[key] = tensor.detach().to("cpu", dtype)
    return out


def _build_target(tconfig, format: str, state: dict[str, torch.Tensor]):
    """The target model on the meta device with `state` assigned; every key and shape checked."""
    import transformers

    with torch.device("meta"):
        target = getattr(transformers, _CLASSES[format][1])(tconfig)
    expected = target.state_dict()
    tied = {key for key in expected if tconfig.tie_word_embeddings and key == "lm_head.weight"}
    state = {key: value for key, value in state.items() if key not in tied}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    name = _CLASSES[format][2]
    if unexpected:
        raise ValueError(f"export: {name} has no place for the base's tensors {_some(unexpected)} (a layout the "
                         "target class does not have)")
    if missing:
        raise ValueError(f"export: no source for {name}'s tensors {_some(missing)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"export: {key} has shape {tuple(value.shape)}, {name} expects "
                             f"{tuple(expected[key].shape)}")
    target.load_state_dict(state, strict=False, assign=True)
    if tied:
        target.tie_weights()
    return target


def export_moe(adapter_dir_or_model, output_dir: str | os.PathLike, format: str = "auto", dtype=None, *,
               base_model_name_or_path: str | None = None, overwrite: bool = False,
               max_shard_size: str | int = MAX_SHARD_SIZE, progress: bool = False) -> ExportSummary:
    """Write a MixLoRA model as a standard sharded safetensors checkpoint of a transformers MoE class.

    Args:
        adapter_dir_or_model: an adapter directory (its adapter_config.json names the base: a model directory, a
            hub id or a .gguf file, resolved as `mixlora train` does), or a model returned by `get_mixlora_model` /
            `MixLoraModelForCausalLM.from_pretrained`.
        output_dir: written atomically (a temporary directory next to it, then renamed); an existing non-empty
            directory is refused unless `overwrite`.
        format: "mixtral", "qwen3_moe", "qwen2_moe", or "auto" (from the base architecture).
        dtype: "bfloat16", "float16", "float32" or one of those torch dtypes (or torch.float64); None keeps the
            base's stored dtype.
        base_model_name_or_path: overrides the base the adapter records.
        max_shard_size: largest safetensors shard (`save_pretrained`).
        progress: a progress bar over the layers on stderr.
    Returns:
        An `ExportSummary` (parameters and bytes against the base, shard files, dropped training-only settings).
    Raises:
        ValueError: what the target class cannot represent exactly (`check_exportable`), a bad format or dtype, an
            existing output directory.
    """
    from mixlora.config import MixLoraConfig

    output_dir = os.path.abspath(os.fspath(output_dir))
    _check_output_dir(output_dir, overwrite)
    export_dtype = _parse_dtype(dtype)
    model = tokenizer_source = None
    if isinstance(adapter_dir_or_model, nn.Module):
        model = adapter_dir_or_model
        from mixlora.model import adapter_name

        if not hasattr(model, "mixlora_configs"):
            raise ValueError("export: the model has no MixLoRA adapter (get_mixlora_model or "
                             "MixLoraModelForCausalLM.from_pretrained first)")
        config = model.mixlora_configs[adapter_name(model)]
        base_config = model.config
        tokenizer_source = base_model_name_or_path or config.base_model_name_or_path
    else:
        from mixlora.base_models import resolve_base_model

        adapter_dir = os.fspath(adapter_dir_or_model)
        check_routing_strategy(adapter_dir)
        config = MixLoraConfig.from_pretrained(adapter_dir)
        base = base_model_name_or_path or config.base_model_name_or_path
        if not base:
            raise ValueError(f"{adapter_dir}: adapter_config.json has no base_model_name_or_path; pass the base model")
        tokenizer_source = resolve_base_model(base) if os.path.exists(os.path.expanduser(base)) else base
        from transformers import AutoConfig

        base_config = AutoConfig.from_pretrained(tokenizer_source)
    fmt = check_exportable(base_config, config, format)
    if model is None:
        from mixlora.model import MixLoraModelForCausalLM

        # The base's stored dtype: the merge runs in float64 from the stored weights, then rounds once.
        model, config = MixLoraModelForCausalLM.from_pretrained(adapter_dir, base_model_name_or_path=tokenizer_source,
                                                                dtype="auto")
    base_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    export_dtype = export_dtype or base_dtype
    base_parameters = sum(p.numel() for n, p in model.named_parameters() if not _is_adapter(n))
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not _is_adapter(n))

    tconfig = target_config(base_config, config, fmt, export_dtype)
    with torch.no_grad():
        state = merged_state_dict(model, fmt, export_dtype, progress=progress)
    target = _build_target(tconfig, fmt, state)
    del state
    target.generation_config = _generation_config(model, tokenizer_source, tconfig)
    tokenizer = _tokenizer(tokenizer_source)

    parent, leaf = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{leaf}.{uuid.uuid4().hex}.tmp")
    try:
        target.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _publish(tmp, output_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    shards = sorted((f, os.path.getsize(os.path.join(output_dir, f))) for f in os.listdir(output_dir)
                    if f.endswith(".safetensors"))
    settings = config.expert_config()
    dropped = [f"lora_dropout {config.lora_dropout:g}" + (f" (experts {settings.lora_dropout:g})"
                                                          if settings.lora_dropout != config.lora_dropout else ""),
               f"jitter_noise {config.jitter_noise:g}", f"router_z_loss_coef {config.router_z_loss_coef:g}"]
    notes = [] if tokenizer is not None else [f"no tokenizer found at {tokenizer_source}; none written"]
    H, I = tconfig.hidden_size, tconfig.intermediate_size
    if (H * export_dtype.itemsize) % 16 or (I * export_dtype.itemsize) % 16:
        notes.append(f"H {H} / I {I} are not 16-byte multiples: transformers' default grouped_mm experts refuse "
                     "them; load with experts_implementation='eager'")
    return ExportSummary(
        output_dir=output_dir, format=fmt, architecture=_CLASSES[fmt][1], dtype=_dtype_name(export_dtype),
        num_experts=config.num_experts, top_k=config.top_k,
        num_parameters=sum(p.numel() for p in target.parameters()),
        num_bytes=sum(p.numel() * p.element_size() for p in target.parameters()),
        base_parameters=base_parameters, base_bytes=base_bytes, base_dtype=_dtype_name(base_dtype), shards=shards,
        dropped=dropped, notes=notes)


# Why each non-top-k routing strategy has no exact equivalent in the export targets.
_UNEXPORTABLE_ROUTING = {
    "mixlora-dynamic": "top-p routing gives each token a varying number of experts with unrenormalised weights",
    "mixlora-switch": "switch routing drops the tokens past an expert's per-sequence capacity (their output is "
                      "p_max times their input) and weights the expert's output by p_max",
}


def _refuse_routing_strategy(strategy) -> None:
    if strategy in ("mixlora", "mixtral"):  # "mixtral": the legacy name of the same top-k router
        return
    why = _UNEXPORTABLE_ROUTING.get(strategy, "it is not a top-k router")
    raise ValueError(f"export: routing_strategy {strategy!r} has no equivalent in the MoE classes of transformers "
                     f"(softmax top-k routers, renormalised): {why}; only 'mixlora' (top-k) exports")


def check_routing_strategy(adapter_dir: str) -> None:
    """Refuse a non-top-k routing strategy with the export's reason, from the adapter's config alone (before the
    base model is resolved or loaded); an unreadable config is left to MixLoraConfig.from_pretrained to report."""
    import json

    from mixlora.config import CONFIG_NAME

    try:
        with open(os.path.join(adapter_dir, CONFIG_NAME), encoding="utf-8") as f:
            strategy = json.load(f).get("routing_strategy", "mixlora")
    except (OSError, ValueError, AttributeError):
        return
    _refuse_routing_strategy(strategy)


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"export: {output_dir} is a file; --output must be a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"export: output directory {output_dir} is not empty: pass --overwrite to replace it, or "
                         "another --output")


def _publish(tmp: str, output_dir: str, overwrite: bool) -> None:
    """Move the finished `tmp` to `output_dir`; an old output is replaced only once the new one is complete."""
    if os.path.isdir(output_dir) and not os.listdir(output_dir):
        os.rmdir(output_dir)
    if not os.path.exists(output_dir):
        os.rename(tmp, output_dir)
        return
    _check_output_dir(output_dir, overwrite)  # something appeared meanwhile
    old = f"{tmp}.old"
    os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    shutil.rmtree(old, ignore_errors=True)


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype in (*DTYPES.values(), torch.float64):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"export: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict key of a MixLoRA model belongs to an adapter (`...adapters.{name}...`)."""
    return "adapters" in name.split(".")


def _generation_config(model, source: str | None, tconfig):
    """The base's generation config (its generation_config.json), else the model's, else one from the config."""
    from transformers import GenerationConfig

    if source:
        with contextlib.suppress(OSError, ValueError):
            return GenerationConfig.from_pretrained(source)
    return getattr(model, "generation_config", None) or GenerationConfig.from_model_config(tconfig)


def _tokenizer(source: str | None):
    """The base's tokenizer, or None when the base has none (tiny test models)."""
    from transformers import AutoTokenizer

    if not source:
        return None
    if os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, f)) for f in
                   ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        return AutoTokenizer.from_pretrained(source)
    try:  # a hub id: unreachable offline; the export is still complete without it (reported in the notes)
        return AutoTokenizer.from_pretrained(source)
    except OSError:
        return None


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1000
    raise AssertionError


def _some(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")

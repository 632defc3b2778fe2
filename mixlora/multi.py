"""Several MixLoRA adapters trained at once on one frozen base model (arXiv 2404.15159, multi-adapter training).

One model holds N named adapters, each with its own `MixLoraConfig` (E, K, R, target modules, router settings may
all differ). A batch mixes rows of several adapters, grouped by adapter (contiguous rows):

    model = get_multi_mixlora_model(base, {"math": cfg_a, "code": cfg_b})
    opt = torch.optim.AdamW([{"params": adapter_parameters(model, n), "lr": lr[n]} for n in model.mixlora_configs])
    with batch_adapters(model, ["math", "math", "code"]):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()        # Σ_adapters (LM loss over its rows + its aux loss): each adapter's gradient is
                               # exactly the one it gets when trained alone on its rows
    out.adapter_losses["math"], out.adapter_aux_losses["math"]
    save_adapter(model, "math", "out/math")   # published format, loadable by MixLoraModelForCausalLM

The frozen GEMMs run once for all rows: an attention projection computes W x for the whole batch and adds each
adapter's LoRA delta on its row slice (no delta for adapters that do not target it); an MoE layer computes the dense
gate/up GEMMs once, routes each adapter's token slice among that adapter's experts (`mixlora::` ops on contiguous
views), assembles h̄ for all tokens and runs the dense down GEMM once, plus each adapter's down-LoRA expand.

Parameter names: `...self_attn.{P}.adapters.{name}.lora_A.weight`, `...mlp.adapters.{name}.moe_gate.weight`,
`...mlp.adapters.{name}.experts.{P}.lora_A`; without `adapters.{name}.` they are a single-adapter model's names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixlora import checkpoint
from mixlora.config import MixLoraConfig
from mixlora.lora import LoraAdapter
from mixlora.model import check_targets, decoder_layers, model_activation, router_aux_loss
from mixlora.moe import FFN_KINDS, MoeExperts, dense_in, ffn_kind

__all__ = ["MultiLoraLinear", "MultiMixLoraMoe", "adapter_named_parameters", "adapter_parameters", "batch_adapters",
           "get_multi_mixlora_model", "save_adapter"]


class _BatchPlan:
    """Which adapter owns which rows of the batch being run: (name, first row, end row) spans, set by
    `batch_adapters`. One object shared by every multi-adapter module of a model."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, int, int]] | None = None
        self.num_rows = 0

    def slices(self, n: int, where: str) -> list[tuple[str, int, int]]:
        """Spans over a leading dimension of n = rows × (tokens per row): (name, start, end) in that dimension."""
        if self.spans is None:
            raise ValueError(f"{where}: a multi-adapter MixLoRA model runs only inside "
                             "`with mixlora.multi.batch_adapters(model, names):` (one adapter name per batch row)")
        if n % self.num_rows:
            raise ValueError(f"{where}: leading dimension {n} is not a multiple of the {self.num_rows} rows given "
                             "to batch_adapters")
        per_row = n // self.num_rows
        return [(name, start * per_row, end * per_row) for name, start, end in self.spans]


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear with one LoRA adapter per named adapter that targets it.

    Keeps `weight` and `bias` (base state-dict keys unchanged); `adapters[name]` is a `LoraAdapter`. Forward:
    x (rows, ..., in) -> (rows, ..., out): W x once for all rows, then each adapter's delta on its rows.
    """

    def __init__(self, base: nn.Linear, settings: Mapping[str, object], plan: _BatchPlan) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapters = nn.ModuleDict({name: LoraAdapter(base, s) for name, s in settings.items()})
        self._plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight)
        outs = []
        for name, start, end in self._plan.slices(x.shape[0], "MultiLoraLinear"):
            if name in self.adapters:
                outs.append(self.adapters[name].adapt(x[start:end], base[start:end], self.weight, self.bias))
            else:
                outs.append(base[start:end] if self.bias is None else base[start:end] + self.bias)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class MultiMixLoraMoe(nn.Module):
    """A decoder FFN shared by several MixLoRA adapters: the FFN's projections as children under their own names,
    `adapters[name]` a `MoeExperts` (that adapter's router and experts). Forward: (..., H) -> (..., H), the rows of
    the batch split among adapters by `batch_adapters`."""

    def __init__(self, mlp: nn.Module, configs: Mapping[str, MixLoraConfig], activations: Mapping[str, str],
                 plan: _BatchPlan) -> None:
        super().__init__()
        self.kind = ffn_kind(mlp)
        self.projections = FFN_KINDS[self.kind]
        for name in self.projections:
            setattr(self, name, getattr(mlp, name))
        self.adapters = nn.ModuleDict({name: MoeExperts(self, config, activations[name])
                                       for name, config in configs.items()})
        self._plan = plan

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        parts = [(self.adapters[name], start, end)
                 for name, start, end in self._plan.slices(x.shape[0], "MultiMixLoraMoe")]
        if any(a.training and a.jitter_noise > 0 for a, _, _ in parts):
            # Jitter scales the FFN input too, so it has to happen before the shared GEMMs.
            x = torch.cat([a.jitter(x[start:end]) for a, start, end in parts])
        G, U = dense_in(self, x)
        hbars, deltas = [], []
        for a, start, end in parts:
            xs, Gs, Us = x[start:end], G[start:end], None if U is None else U[start:end]
            hbar, delta = a.expert_in(self, xs, Gs, Us, *a.route(xs))
            hbars.append(hbar)
            deltas.append(delta)
        y = getattr(self, self.projections[-1])(hbars[0] if len(hbars) == 1 else torch.cat(hbars))
        if any(d is not None for d in deltas):
            y = torch.cat([y[start:end] if d is None else y[start:end] + d.to(y.dtype)
                           for (_, start, end), d in zip(parts, deltas)])
        return y.reshape(shape)


def _check_configs(model: nn.Module, configs: Mapping[str, MixLoraConfig]) -> list[nn.Module]:
    if getattr(model, "mixlora_config", None) is not None or getattr(model, "mixlora_configs", None) is not None:
        raise ValueError("this model already has a MixLoRA adapter")
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("get_multi_mixlora_model: configs must be a non-empty dict adapter name -> MixLoraConfig")
    layers = decoder_layers(model)
    for name, config in configs.items():
        if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ModuleDict, name):
            raise ValueError(f"adapter name {name!r} must be a Python identifier and not an nn.ModuleDict attribute "
                             "(it becomes a module name)")
        if not isinstance(config, MixLoraConfig):
            raise ValueError(f"adapter {name!r}: expected a MixLoraConfig, got {type(config).__name__}")
        if config.expert_config().use_dora:
            raise ValueError(f"adapter {name!r}: DoRA experts rescale the shared base projection per expert, so "
                             "they cannot share the dense FFN GEMMs; multi-adapter models support LoRA/rsLoRA "
                             "experts only (DoRA attention adapters are fine: set expert_lora={'use_dora': False})")
        try:
            check_targets(model, config)
        except ValueError as error:
            raise ValueError(f"adapter {name!r}: {error}") from None
    return layers


def get_multi_mixlora_model(model: nn.Module, configs: Mapping[str, MixLoraConfig]) -> nn.Module:
    """Turn a Hugging Face decoder model into a multi-adapter MixLoRA model, in place, and return it.

    Args:
        model: the base model (its parameters are frozen).
        configs: adapter name (a Python identifier) -> its MixLoraConfig. LoRA / rsLoRA experts only.
    Returns:
        `model`, with `mixlora_configs` (name -> config). Every attention projection targeted by some adapter
        becomes a `MultiLoraLinear`, every FFN a `MultiMixLoraMoe`. Each adapter is initialised as
        `get_mixlora_model` would (B zero, router N(0, router_init_range) fp32), adapters in the order of `configs`.
        Run it inside `batch_adapters`. With labels, `loss` is Σ over the adapters in the batch of (mean LM loss over
        their rows + their aux loss when training with router_loss); outputs carry `adapter_losses` (name -> LM loss)
        and `adapter_aux_losses` (name -> aux loss), and `aux_loss` (their sum).
    """
    layers = _check_configs(model, configs)
    configs = dict(configs)
    acts = {name: config.act_fn or model_activation(model) for name, config in configs.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    plan = _BatchPlan()
    for layer in layers:
        projections = [n for n, m in layer.self_attn.named_children() if isinstance(m, nn.Linear)]
        for proj in projections:
            settings = {name: config.attention_config() for name, config in configs.items()
                        if proj in config.target_modules}
            if settings:
                setattr(layer.self_attn, proj, MultiLoraLinear(getattr(layer.self_attn, proj), settings, plan))
        layer.mlp = MultiMixLoraMoe(layer.mlp, configs, acts, plan)
    model.train(model.training)  # the new modules take the model's mode
    model.mixlora_configs = configs
    model._mixlora_plan = plan
    _MultiLossHooks(model)
    return model


def _plan_of(model: nn.Module) -> _BatchPlan:
    plan = getattr(model, "_mixlora_plan", None)
    if plan is None:
        raise ValueError("the model has no multi-adapter MixLoRA (call mixlora.multi.get_multi_mixlora_model first)")
    return plan


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
    plan = _plan_of(model)
    if plan.spans is not None:
        raise ValueError("batch_adapters blocks cannot be nested")
    names = [rows] if isinstance(rows, str) else list(rows)
    if not names:
        raise ValueError("batch_adapters: no rows given")
    unknown = sorted({n for n in names if n not in model.mixlora_configs})
    if unknown:
        raise ValueError(f"batch_adapters: unknown adapter(s) {unknown}; this model has {list(model.mixlora_configs)}")
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
    # One name: one span over all rows of any batch size (slices() scales rows to the dimension it is given).
    plan.num_rows = 1 if isinstance(rows, str) else len(names)
    plan.spans = spans
    try:
        yield list(spans)
    finally:
        plan.spans, plan.num_rows = None, 0


def _adapter_prefix(model: nn.Module, name: str) -> str:
    configs = getattr(model, "mixlora_configs", None)
    if configs is None:
        raise ValueError("the model has no multi-adapter MixLoRA (call mixlora.multi.get_multi_mixlora_model first)")
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(configs)}")
    return f".adapters.{name}."


def adapter_named_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters under the names a single-adapter model (`get_mixlora_model`) gives them, i.e.
    with `adapters.{name}.` removed: `...self_attn.q_proj.lora_A.weight`, `...mlp.moe_gate.weight`,
    `...mlp.experts.gate_proj.lora_A`, ..."""
    marker = _adapter_prefix(model, name)
    return {n.replace(marker, ".", 1): p for n, p in model.named_parameters() if marker in n}


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s parameters, for its own optimizer param group (its own learning rate and state)."""
    return list(adapter_named_parameters(model, name).values())


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike, safe_serialization: bool = True) -> str:
    """Write adapter `name` to `directory` in the published format (`adapter_config.json` + weights), exactly as a
    single-adapter model with the same config and weights writes it; return the weights file's path."""
    params = adapter_named_parameters(model, name)
    published = checkpoint.to_published_state_dict({n: p.detach() for n, p in params.items()})
    return checkpoint.save_adapter(directory, model.mixlora_configs[name], published,
                                   safe_serialization=safe_serialization)


class _MultiLossHooks:
    """Forward hooks on the top-level model: reset the router logits, then compute each adapter's LM and aux loss
    over its own rows (padding excluded from the aux loss) and replace `loss` by their sum."""

    def __init__(self, model: nn.Module) -> None:
        self.moes = [m for m in model.modules() if isinstance(m, MultiMixLoraMoe)]
        self.labels = None
        model.register_forward_pre_hook(self.before, with_kwargs=True)
        model.register_forward_hook(self.after, with_kwargs=True)

    def before(self, model, args, kwargs):
        for moe in self.moes:
            for experts in moe.adapters.values():
                experts.router_logits = None
        # The model's own loss (a mean over all rows) would be thrown away: take the labels so it is not computed.
        self.labels = kwargs.pop("labels", None)
        return args, kwargs

    def after(self, model, args, kwargs, output):
        labels, self.labels = self.labels, None
        spans = model._mixlora_plan.spans
        if spans is None or not hasattr(output, "keys"):
            return output
        mask = kwargs.get("attention_mask")
        whole = model._mixlora_plan.num_rows == 1  # one span over the whole batch, whatever its row count
        aux, lm = {}, {}
        total = None
        for name, start, end in spans:
            if whole:
                start, end = 0, None
            config = model.mixlora_configs[name]
            logits = [m.adapters[name].router_logits for m in self.moes if m.adapters[name].router_logits is not None]
            if logits:
                aux[name] = router_aux_loss(logits, config.top_k, config.router_aux_loss_coef,
                                            config.router_z_loss_coef, None if mask is None else mask[start:end])
            if labels is not None and output.get("logits") is not None:
                lm[name] = model.loss_function(logits=output["logits"][start:end], labels=labels[start:end],
                                               vocab_size=model.config.vocab_size)
                loss = lm[name]
                if model.training and config.router_loss and name in aux:
                    loss = loss + aux[name].to(loss.dtype)
                total = loss if total is None else total + loss
        if aux:
            output["adapter_aux_losses"] = aux
            output["aux_loss"] = sum(aux.values())
        if lm:
            output["adapter_losses"] = lm
            output["loss"] = total
        return output

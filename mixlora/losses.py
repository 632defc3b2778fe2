"""The router losses (docs/algorithm.md §1) and the forward hooks that add them, per adapter, to a model's loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixlora.routing import top_p_selection
from mixlora.rows import AdapterRows


def _rows(router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The router logits of all layers concatenated (N, E), in at least fp32, padding rows removed."""
    logits = torch.cat([l.to(torch.promote_types(l.dtype, torch.float32)) for l in router_logits])
    if attention_mask is not None and attention_mask.numel() == router_logits[0].shape[0]:
        keep = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.bool).repeat(len(router_logits))
        logits = logits[keep]
    return logits


def _z_loss(logits: torch.Tensor, z_coef: float) -> torch.Tensor | float:
    return z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean() if z_coef else 0.0


def router_aux_loss(router_logits: list[torch.Tensor], top_k: int, coef: float, z_coef: float = 0.0,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Load-balance loss of top-k routing ("mixlora") over the concatenated router logits of all MoE layers
    (docs/algorithm.md §1).

    Args:
        router_logits: per layer (T, E) logits, T = batch·seq in row-major order.
        attention_mask: (batch, seq), 0 for padding; padding rows are excluded. Ignored if it does not have T entries.
    Returns:
        coef · E · Σ_k Σ_e f_{k,e} P_e (+ z_coef · mean logsumexp²), a scalar.
    """
    logits = _rows(router_logits, attention_mask)
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, E).to(probs.dtype)
    return coef * E * (chosen.mean(0) * probs.mean(0)).sum() + _z_loss(logits, z_coef)


def dynamic_router_aux_loss(router_logits: list[torch.Tensor], top_p: float, temperature: float, coef: float,
                            z_coef: float = 0.0, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Load-balance loss of top-p routing ("mixlora-dynamic"): the top-k form with the sorted positions as k and
    only the kept experts counted (docs/algorithm.md §1), padding rows excluded (MoE-PEFT keeps them):
    coef · E · Σ_k Σ_e f_{k,e} P_e (+ z_coef · mean logsumexp²), f_{k,e} the share of rows whose k-th expert in
    descending probability is e and kept."""
    logits = _rows(router_logits, attention_mask)
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    with torch.no_grad():
        _, experts, kept = top_p_selection(probs, top_p, temperature)
        chosen = F.one_hot(experts, E).to(probs.dtype) * kept.unsqueeze(-1)
    return coef * E * (chosen.mean(0) * probs.mean(0)).sum() + _z_loss(logits, z_coef)


def switch_router_loss(router_logits: list[torch.Tensor], coef: float, z_coef: float,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Losses of switch routing ("mixlora-switch"; docs/algorithm.md §1), padding rows excluded:
    z_coef · mean logsumexp² + coef · E² · mean_e (f_e P_e), f_e the share of rows whose argmax is e (before the
    capacity drops), P_e the mean probability."""
    logits = _rows(router_logits, attention_mask)
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(probs.argmax(dim=-1), E).to(probs.dtype)
    return coef * E**2 * (chosen.mean(0) * probs.mean(0)).mean() + _z_loss(logits, z_coef)


def router_loss(router_logits: list[torch.Tensor], config, attention_mask: torch.Tensor | None = None):
    """The router loss of one adapter for its `MixLoraConfig.routing_strategy`, with its coefficients."""
    if config.routing_strategy == "mixlora-dynamic":
        return dynamic_router_aux_loss(router_logits, config.top_p, config.temperature, config.router_aux_loss_coef,
                                       config.router_z_loss_coef, attention_mask)
    if config.routing_strategy == "mixlora-switch":
        return switch_router_loss(router_logits, config.router_aux_loss_coef, config.router_z_loss_coef,
                                  attention_mask)
    return router_aux_loss(router_logits, config.top_k, config.router_aux_loss_coef, config.router_z_loss_coef,
                           attention_mask)


class LossHooks:
    """Forward hooks on the top-level model that give each adapter its own losses.

    Before the forward: forget the router logits of the last one; with several adapters in the batch, take the
    labels (the model's own loss, a mean over all rows, would be thrown away). After it: each adapter's aux loss
    (`router_loss`: that of its routing strategy) over its own rows (padding excluded) and its LM loss (the
    model's own with one adapter, else over its rows); `loss` = Σ_adapters (LM loss + aux loss when training with
    `router_loss`). Outputs carry `adapter_losses`,
    `adapter_aux_losses` (name -> loss) and `aux_loss` (their sum). `handles` remove the hooks.

    Under gradient checkpointing the router logits only carry gradients with the non-reentrant implementation; a
    training loss whose aux loss lost its gradient raises.
    """

    def __init__(self, model: nn.Module, moes: list[nn.Module], configs: Mapping[str, object],
                 rows: AdapterRows) -> None:
        self.moes, self.configs, self.rows = moes, configs, rows
        self.labels = None
        self.handles = [model.register_forward_pre_hook(self.before, with_kwargs=True),
                        model.register_forward_hook(self.after, with_kwargs=True)]

    def before(self, model, args, kwargs):
        for moe in self.moes:
            for experts in moe.adapters.values():
                experts.router_logits = None
        self.labels = None
        if not self.rows.disabled and len(self.rows.current(type(model).__name__)) > 1:
            self.labels = kwargs.pop("labels", None)
        return args, kwargs

    def after(self, model, args, kwargs, output):
        labels, self.labels = self.labels, None
        if self.rows.disabled or not hasattr(output, "keys"):
            return output
        spans = self.rows.current(type(model).__name__)
        mask = kwargs.get("attention_mask")
        aux, lm, total = {}, {}, None
        for name, start, end in spans:
            config = self.configs[name]
            logits = [m.adapters[name].router_logits for m in self.moes if m.adapters[name].router_logits is not None]
            if logits:
                aux[name] = router_loss(logits, config, None if mask is None else mask[start:end])
            if labels is not None and output.get("logits") is not None:
                lm[name] = model.loss_function(logits=output["logits"][start:end], labels=labels[start:end],
                                               vocab_size=model.config.vocab_size)
            elif len(spans) == 1 and output.get("loss") is not None:
                lm[name] = output["loss"]
            if name not in lm:
                continue
            loss = lm[name]
            if model.training and config.router_loss and name in aux:
                self._check_gradient(name, aux[name])
                loss = loss + aux[name].to(loss.dtype)
            total = loss if total is None else total + loss
        if aux:
            output["adapter_aux_losses"] = aux
            output["aux_loss"] = sum(aux.values())
        if lm:
            output["adapter_losses"] = lm
            output["loss"] = total
        return output

    def _check_gradient(self, name: str, aux: torch.Tensor) -> None:
        if torch.is_grad_enabled() and not aux.requires_grad and \
                any(m.adapters[name].moe_gate.weight.requires_grad for m in self.moes):
            raise RuntimeError("MixLoRA's router aux loss lost its gradient: with gradient checkpointing use "
                               "gradient_checkpointing_kwargs={'use_reentrant': False}")

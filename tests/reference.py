"""Loop-simple oracles, written independently of the code under test (the published MixLoRA algorithm).

Per expert: gather its tokens, run the full LoRA FFN (base down-projection included), weight, index_add. Used by the
tests (in float64) and by the benchmarks as the `naive` provider, so the two never drift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


def reference_lora_linear(layer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """Adapter `adapter` of a `mixlora.lora.LoraLinear` without dropout: W x + b + s B A x, or DoRA
    m/‖W + sBA‖ ⊙ (W x + s B A x) + b."""
    lora = layer.adapters[adapter]
    W, A, B, s = layer.weight, lora.lora_A.weight, lora.lora_B.weight, lora.scaling
    out = x @ W.T + s * (x @ A.T) @ B.T
    if lora.lora_magnitude_vector is not None:
        norm = (W + s * B @ A).norm(dim=1).detach()
        out = lora.lora_magnitude_vector / norm * out
    return out if layer.bias is None else out + layer.bias


def _expert_projection(ffn, experts, name: str, e: int, rows: torch.Tensor) -> torch.Tensor:
    base = getattr(ffn, name)
    out = rows @ base.weight.T
    if name in experts.experts:
        lora = experts.experts[name]
        A, B = lora.lora_A[e], lora.lora_B[e]
        out = out + experts.scaling * (rows @ A.T) @ B.T
        if lora.lora_magnitude_vector is not None:
            norm = (base.weight + experts.scaling * B @ A).norm(dim=1).detach()
            out = lora.lora_magnitude_vector[e] / norm * out
    return out if base.bias is None else out + base.bias


def reference_moe_forward(moe, hidden_states: torch.Tensor, act: str,
                          adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """The published MixLoRA FFN on the parameters of adapter `adapter` of a `MixLoraSparseMoe` (no dropout, no
    jitter).

    `act` is the Hugging Face activation name (ACT2FN). Returns (output like hidden_states, router logits (T, E)).
    """
    experts = moe.adapters[adapter]
    act_fn = ACT2FN[act]
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = x.to(experts.moe_gate.weight.dtype) @ experts.moe_gate.weight.T
    probs = torch.softmax(logits, dim=-1)
    weights, chosen = torch.topk(probs, experts.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    y = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tokens, k = torch.where(chosen == e)
        if tokens.numel() == 0:
            continue
        rows = x[tokens]
        names = moe.projections
        if names == ("gate_proj", "up_proj", "down_proj"):
            h = act_fn(_expert_projection(moe, experts, "gate_proj", e, rows)) \
                * _expert_projection(moe, experts, "up_proj", e, rows)
        elif names == ("gate_up_proj", "down_proj"):
            gate, up = _expert_projection(moe, experts, "gate_up_proj", e, rows).chunk(2, dim=-1)
            h = up * act_fn(gate)
        else:
            h = act_fn(_expert_projection(moe, experts, "fc1", e, rows))
        out = _expert_projection(moe, experts, names[-1], e, h)
        y = y.index_add(0, tokens, weights[tokens, k].unsqueeze(-1).to(out.dtype) * out)
    return y.reshape(shape), logits


def reference_aux_loss(logits: list[torch.Tensor], top_k: int, coef: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Mixtral-style load balance over all layers' router logits, padding rows removed."""
    rows = torch.cat(logits)
    if mask is not None:
        rows = rows[mask.reshape(-1).bool().repeat(len(logits))]
    E = rows.shape[1]
    probs = torch.softmax(rows, dim=-1)
    mask_k = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, E).to(rows.dtype)
    return coef * E * (mask_k.mean(0) * probs.mean(0).unsqueeze(0)).sum()

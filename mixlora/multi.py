"""Several MixLoRA adapters trained at once on one frozen base model (arXiv 2404.15159, multi-adapter training).

One model holds N named adapters, each with its own `MixLoraConfig` (E, K, R, target modules, router settings and
expert kind may all differ). A batch mixes rows of several adapters, grouped by adapter (contiguous rows):

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
gate/up GEMMs once over the rows of its LoRA/rsLoRA adapters, routes each adapter's token slice among that adapter's
experts, assembles h̄ for those tokens and runs the dense down GEMM once, plus each adapter's down-LoRA expand (a DoRA
adapter's rows run its per-expert loop). A single-adapter model is the same model with one adapter name.
"""

from __future__ import annotations

import os

from torch import nn

from mixlora.model import adapter_parameters, adapter_state_dict, batch_adapters, get_multi_mixlora_model, save_mixlora

__all__ = ["adapter_parameters", "adapter_state_dict", "batch_adapters", "get_multi_mixlora_model", "save_adapter"]


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike, safe_serialization: bool = True) -> str:
    """`save_mixlora(model, directory, safe_serialization, adapter=name)`: adapter `name` in the published format,
    exactly as a single-adapter model with the same config and weights writes it; the weights file's path."""
    return save_mixlora(model, directory, safe_serialization, adapter=name)

"""MixLoRA: sparse mixtures of LoRA experts on a frozen dense LLM, on fused kernels (arXiv 2404.15159).

The public names are loaded on first use (PEP 562), so that `import mixlora.cli` (the `mixlora` command) does not
import torch and transformers before it knows what it has to do: `mixlora --help` answers in a fraction of a second.
"""

import importlib

_EXPORTS = {
    "MixLoraConfig": "mixlora.config",
    "MixLoraModelForCausalLM": "mixlora.model",
    "MixLoraSparseMoe": "mixlora.moe",
    "adapter_parameters": "mixlora.model",
    "adapter_state_dict": "mixlora.model",
    "batch_adapters": "mixlora.model",
    "disable_adapter": "mixlora.model",
    "get_mixlora_model": "mixlora.model",
    "get_multi_mixlora_model": "mixlora.model",
    "inject_adapter_in_model": "mixlora.model",
    "moe_layers": "mixlora.model",
    "router_aux_loss": "mixlora.losses",
    "save_mixlora": "mixlora.model",
    "set_adapter_weights": "mixlora.model",
    "unload_mixlora": "mixlora.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mixlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

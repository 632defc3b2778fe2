"""MixLoRA: sparse mixtures of LoRA experts on a frozen dense LLM, on fused kernels (arXiv 2404.15159)."""

from mixlora.config import MixLoraConfig
from mixlora.model import (MixLoraModelForCausalLM, adapter_state_dict, get_mixlora_model, inject_adapter_in_model,
                           moe_layers, router_aux_loss, save_mixlora)
from mixlora.moe import MixLoraSparseMoe

__all__ = ["MixLoraConfig", "MixLoraModelForCausalLM", "MixLoraSparseMoe", "adapter_state_dict", "get_mixlora_model",
           "inject_adapter_in_model", "moe_layers", "router_aux_loss", "save_mixlora"]

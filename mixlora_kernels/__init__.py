"""Fused MixLoRA kernels behind one op registry (`torch.ops.mixlora.*`)."""

from mixlora_kernels import ops
from mixlora_kernels.backend import selected as selected_backends

__all__ = ["ops", "selected_backends"]

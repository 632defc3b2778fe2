"""CPU implementations of the `mixlora::` ops: one module per op, functions with the registered op's signature.

`KERNELS` maps op name -> implementation; `mixlora_kernels.backend` installs them for CPU tensors of fp32/bf16/fp16
(fp64 stays on the reference, the oracle). Ops missing here (routing, sorting, router logits: already vectorised in
their references) keep the reference. Everything is pure torch: dense or grouped GEMMs (`torch._grouped_mm` over the
expert-sorted slots) instead of a Python loop over experts, token-major elementwise work, and the LoRA-dropout hash in
int32.
"""

from mixlora_kernels.cpu.expand_act_combine import expand_act_combine_backward, expand_act_combine_forward
from mixlora_kernels.cpu.lora_expand_combine import lora_expand_combine_backward, lora_expand_combine_forward
from mixlora_kernels.cpu.lora_shrink import lora_shrink_backward, lora_shrink_forward

KERNELS = {
    "lora_shrink": lora_shrink_forward,
    "lora_shrink_backward": lora_shrink_backward,
    "expand_act_combine": expand_act_combine_forward,
    "expand_act_combine_backward": expand_act_combine_backward,
    "lora_expand_combine": lora_expand_combine_forward,
    "lora_expand_combine_backward": lora_expand_combine_backward,
}

__all__ = ["KERNELS"]

"""Triton implementations of the `mixlora::` ops: one module per op, launchers with the registered op's signature.

`KERNELS` maps op name -> launcher; `mixlora_kernels.backend` installs them for CUDA tensors (ops missing here fall
back to the torch reference). The launchers also run on CPU tensors under `TRITON_INTERPRET=1` (tests).
"""

from mixlora_kernels.triton.expand_act_combine import expand_act_combine_backward, expand_act_combine_forward
from mixlora_kernels.triton.lora_expand_combine import lora_expand_combine_backward, lora_expand_combine_forward
from mixlora_kernels.triton.lora_shrink import lora_shrink_backward, lora_shrink_forward
from mixlora_kernels.triton.route import route_backward, route_forward
from mixlora_kernels.triton.router_logits import router_logits_backward, router_logits_forward
from mixlora_kernels.triton.sort_slots import sort_slots_forward

KERNELS = {
    "router_logits": router_logits_forward,
    "router_logits_backward": router_logits_backward,
    "route": route_forward,
    "route_backward": route_backward,
    "sort_slots": sort_slots_forward,
    "lora_shrink": lora_shrink_forward,
    "lora_shrink_backward": lora_shrink_backward,
    "expand_act_combine": expand_act_combine_forward,
    "expand_act_combine_backward": expand_act_combine_backward,
    "lora_expand_combine": lora_expand_combine_forward,
    "lora_expand_combine_backward": lora_expand_combine_backward,
}

__all__ = ["KERNELS"]

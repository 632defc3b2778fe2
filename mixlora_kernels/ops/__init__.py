"""The `mixlora::` op registry: the shared-base MixLoRA FFN as registered torch.library custom ops.

Pipeline for one MoE FFN (T tokens, E experts, K slots per token, S = T·K):
    router_logits -> route -> sort_slots -> lora_shrink -> [dense W1 x, W3 x] -> expand_act_combine
    -> [dense W2 h̄] + lora_expand_combine
Each op's default implementation is its pure-torch reference; `mixlora_kernels.backend` installs faster ones.
"""

from mixlora_kernels.ops.expand_act_combine import expand_act_combine, expand_act_combine_backward
from mixlora_kernels.ops.lora_expand_combine import lora_expand_combine, lora_expand_combine_backward
from mixlora_kernels.ops.lora_shrink import lora_shrink, lora_shrink_backward
from mixlora_kernels.ops.route import route, route_backward
from mixlora_kernels.ops.router_logits import router_logits, router_logits_backward
from mixlora_kernels.ops.sort_slots import sort_slots

__all__ = [
    "expand_act_combine", "expand_act_combine_backward", "lora_expand_combine", "lora_expand_combine_backward",
    "lora_shrink", "lora_shrink_backward", "route", "route_backward", "router_logits", "router_logits_backward",
    "sort_slots",
]

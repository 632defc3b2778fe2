"""CPU implementations of the `mixlora::` ops: one module per op, functions with the registered op's signature.

`KERNELS` maps op name -> implementation; `mixlora_kernels.backend` installs them for CPU tensors of fp32/bf16/fp16
(fp64 stays on the reference, the oracle). Ops missing here (routing, sorting, router logits: already vectorised in
their references) keep the reference.

    expand_act_combine (+ backward)   C++ (csrc/cpu/, the extension `mixlora_kernels._cpu`): fused loops between
                                      ATen GEMMs on expert-sorted tiles; where the extension is not built the
                                      reference serves them (`EXTENSION_ERROR` says why, and the backend reports it)
    lora_shrink, lora_expand_combine  pure torch: dense or grouped GEMMs (`torch._grouped_mm` over the expert-sorted
    (+ backward)                      slots), the LoRA-dropout hash in int32
"""

from mixlora_kernels.cpu import _extension
from mixlora_kernels.cpu.lora_expand_combine import lora_expand_combine_backward, lora_expand_combine_forward
from mixlora_kernels.cpu.lora_shrink import lora_shrink_backward, lora_shrink_forward

EXTENSION_ERROR = _extension.ERROR  # None when the C++ kernels loaded

KERNELS = {
    "lora_shrink": lora_shrink_forward,
    "lora_shrink_backward": lora_shrink_backward,
    "lora_expand_combine": lora_expand_combine_forward,
    "lora_expand_combine_backward": lora_expand_combine_backward,
}
if EXTENSION_ERROR is None:
    from mixlora_kernels.cpu.expand_act_combine import expand_act_combine_backward, expand_act_combine_forward

    KERNELS["expand_act_combine"] = expand_act_combine_forward
    KERNELS["expand_act_combine_backward"] = expand_act_combine_backward

__all__ = ["EXTENSION_ERROR", "KERNELS"]

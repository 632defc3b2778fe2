"""CPU implementations of the `mixlora::` ops: the C++ kernels of csrc/cpu/ (the extension `mixlora_kernels._cpu`),
one module per op with functions of the registered op's signature that run the op's input checks and call them.

`KERNELS` maps op name -> implementation; `mixlora_kernels.backend` installs them for CPU tensors of fp32/bf16/fp16
(fp64 stays on the reference, the oracle). Ops missing here (routing, sorting, router logits: already vectorised in
their references) keep the reference. Where the extension did not load, `EXTENSION_ERROR` says why, `KERNELS` is
empty and the backend reports the cpu backend as not loaded: every op keeps its reference.

Measured on this project's 2-core CPU (bench_cpu training step, 2026-12-02): the pure-torch CPU kernels these
replace were 1.5-1.8x slower than the C++ ones, and without the C++ kernels the pure-torch lora_shrink /
lora_expand_combine were no faster than the references (they are deleted; so is the pure-torch expand_act_combine).
"""

from mixlora_kernels.cpu import _extension

EXTENSION_ERROR = _extension.ERROR  # None when the C++ kernels loaded

KERNELS = {}
if EXTENSION_ERROR is None:
    from mixlora_kernels.cpu.expand_act_combine import expand_act_combine_backward, expand_act_combine_forward
    from mixlora_kernels.cpu.lora_expand_combine import lora_expand_combine_backward, lora_expand_combine_forward
    from mixlora_kernels.cpu.lora_shrink import lora_shrink_backward, lora_shrink_forward

    KERNELS.update({
        "lora_shrink": lora_shrink_forward,
        "lora_shrink_backward": lora_shrink_backward,
        "expand_act_combine": expand_act_combine_forward,
        "expand_act_combine_backward": expand_act_combine_backward,
        "lora_expand_combine": lora_expand_combine_forward,
        "lora_expand_combine_backward": lora_expand_combine_backward,
    })

__all__ = ["EXTENSION_ERROR", "KERNELS"]

"""Every Triton kernel compiles to PTX for the H200 (sm_90) without a GPU: catches what the interpreter cannot
(loop-carried or branch type changes, dot shape/dtype rules, ints specialised to constexpr 1).

Compilation runs in a fresh process without TRITON_INTERPRET (the other test_triton_* modules set it, and
triton.jit decides interpreter vs compiler at decoration). Needs Triton's bundled ptxas, not a GPU.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def compile_all() -> None:
    """Compile one representative configuration per kernel (bf16 data, dropout on, odd ints specialised to 1)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mixlora_kernels.triton import expand_act_combine as eac
    from mixlora_kernels.triton import lora_expand_combine as lec
    from mixlora_kernels.triton import lora_shrink as ls
    from mixlora_kernels.triton import route as rt
    from mixlora_kernels.triton import sort_slots as ss

    ptr = {"order_ptr": "i64", "offsets_ptr": "i64", "experts_ptr": "i64", "e_ptr": "i64", "base_ptr": "i64",
           "counts_ptr": "i64", "w_ptr": "fp32", "z_ptr": "fp32", "zd_ptr": "fp32", "y_ptr": "fp32",
           "gz_ptr": "fp32", "gy_ptr": "fp32", "gw_ptr": "fp32", "out_ptr": "fp32", "dw_ptr": "fp32"}
    eac_meta = dict(ACT="gelu_tanh", HAS_U=True, HAS_RG=True, HAS_RU=True, HAS_RD=True, HAS_DROPOUT=True,
                    DT=tl.bfloat16, BLOCK_T=32, KP=2, BLOCK_I=32, BLOCK_RG=16, EPC_G=8, NC_G=1, BLOCK_RU=16, EPC_U=8,
                    NC_U=1, BLOCK_RD=16, EPC_D=8, NC_D=1)
    # R 64 at E 8: a fold in 4 chunks of 2 experts (the unrolled chunk path), fp32 operands (tf32x3)
    eac_chunks = dict(eac_meta, DT=tl.float32, BLOCK_I=16, BLOCK_RG=64, EPC_G=2, NC_G=4, BLOCK_RD=64, EPC_D=2, NC_D=4)
    eac_weight = dict(ACT="silu", HAS_U=True, HAS_RG=True, HAS_RU=True, HAS_RD=True, HAS_DROPOUT=True,
                      DT=tl.bfloat16, BLOCK_I=64, BLOCK_M=32, BLOCK_RG=16, BLOCK_RU=16, BLOCK_RD=16)
    cases = [
        (ls._lora_shrink_fwd_kernel, dict(HAS_DROPOUT=True, DOT_DTYPE=tl.bfloat16, BLOCK_M=64, BLOCK_R=16,
                                          BLOCK_H=64), ("seed",)),
        (ls._lora_shrink_bwd_kernel, dict(HAS_DROPOUT=True, DOT_DTYPE=tl.bfloat16, BLOCK_M=64, BLOCK_R=16,
                                          BLOCK_H=64, FOLD_R=16, EPC=2, N_CHUNKS=4), ("K",)),
        (ls._lora_shrink_bwd_kernel, dict(HAS_DROPOUT=False, DOT_DTYPE=tl.float32, BLOCK_M=64, BLOCK_R=16,
                                          BLOCK_H=64, FOLD_R=8, EPC=4, N_CHUNKS=1), ()),
        (lec._lora_expand_combine_fwd_kernel, dict(DT=tl.bfloat16, BLOCK_M=64, BLOCK_H=64, BLOCK_R=16, EPC=8,
                                                   N_CHUNKS=1), ("E",)),
        (lec._lora_expand_combine_fwd_kernel, dict(DT=tl.float32, BLOCK_M=64, BLOCK_H=64, BLOCK_R=64, EPC=2,
                                                   N_CHUNKS=2), ()),
        (lec._lora_expand_combine_bwd_kernel, dict(GB_DOT=tl.bfloat16, BLOCK_M=64, BLOCK_R=16, BLOCK_H=64), ()),
        (eac._expand_act_combine_fwd_kernel, eac_meta, ("Rd",)),
        (eac._expand_act_combine_fwd_kernel, eac_chunks, ()),
        (eac._expand_act_combine_bwd_kernel, dict(eac_meta, ACT="silu"), ("T",)),
        (eac._expand_act_combine_bwd_kernel, eac_chunks, ()),
        (eac._expand_act_combine_bwd_weight_kernel, eac_weight, ("K",)),
        (rt._route_fwd_kernel, dict(K=2, BLOCK_T=64, BLOCK_E=8, BLOCK_K=2), ()),
        (rt._route_bwd_kernel, dict(K=2, BLOCK_T=64, BLOCK_E=8), ()),
        (ss._sort_slots_count_kernel, dict(BLOCK_S=256, BLOCK_E=8), ()),
        (ss._sort_slots_fwd_kernel, dict(BLOCK_S=256, BLOCK_E=8), ()),
    ]
    for fn, consts, ones in cases:
        consts = {**consts, **{name: 1 for name in ones}}
        signature = {}
        for name in fn.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + ptr.get(name, "bf16")
            elif name in ("scale", "keep_scale"):
                signature[name] = "fp32"
            elif name in ("seed", "threshold"):
                signature[name] = "i64"
            else:
                signature[name] = "i32"
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path.insert(0, {here!r}); import test_triton_compile as m; m.compile_all()"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(here), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

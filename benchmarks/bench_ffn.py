"""One MixLoRA FFN layer: time (fwd, fwd+bwd), saved-for-backward bytes and CUDA peak memory per provider.

Providers:
    dense      the frozen LlamaMLP alone (input requires grad, so backward runs): the floor.
    peft_lora  PEFT LoRA r R on gate/up/down of that MLP.
    naive      the published MixLoRA algorithm (`tests.reference.reference_moe_forward`, the tests' oracle) on the
               parameters of a MixLoraSparseMoe: full FFN per expert in a loop over experts.
    torch      our MixLoraSparseMoe on the pure-torch op references (on CPU every op is the reference).
    triton, cuda  our MixLoraSparseMoe with the ops on that kernel backend; only where the registry reports it.
Every provider's forward is checked against the float64 oracle on the same parameters before it is timed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from benchmarks.common import (DEVICE, MIB, check_close, environment, kernel_backends, peak_memory, registry_backend,
                               saved_bytes, synchronize)
from mixlora import MixLoraConfig, MixLoraSparseMoe
from tests.reference import reference_moe_forward

FFN_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class FfnShape:
    name: str
    T: int
    H: int
    I: int
    E: int
    K: int
    R: int
    dtype: torch.dtype


if DEVICE.type == "cuda":
    SHAPES = [
        FfnShape("llama2-7b-T4096", 4096, 4096, 11008, 8, 2, 16, torch.bfloat16),  # LLaMA-2-7B FFN, 2x2048 tokens
        FfnShape("llama2-7b-T16384", 16384, 4096, 11008, 8, 2, 16, torch.bfloat16),  # LLaMA-2-7B FFN, 8x2048 tokens
    ]
    ROUNDS = 20  # the anchor numbers in docs/cost-model.md are medians of 20
else:
    # LLaMA-2-7B FFN scaled down 16x (I/H = 688/256 keeps LLaMA's ratio), fp32: the CPU suite runs in seconds.
    SHAPES = [FfnShape("cpu-small-T512", 512, 256, 688, 8, 2, 16, torch.float32)]
    ROUNDS = 5

PROVIDERS = ("dense", "peft_lora", "naive", "torch", "triton", "cuda")
KERNEL_PROVIDERS = ("triton", "cuda")
MODES = ("fwd", "fwd_bwd")
# Relative (Frobenius) error of the forward against the float64 oracle. fp32: a few ulps summed over H and I.
# bf16: the output rounding alone is ~4e-3 relative and G, U, h̄ are rounded on the way.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GUARD_TOKENS = 1024  # tokens compared with the oracle (tokens are independent; the fp64 loop on all T is slow)
B_STD = 0.02  # random LoRA B: the LoRA delta is ~10% of the base projection with A's kaiming init and s = 2


@dataclass
class FfnCase:
    forward: Callable[[torch.Tensor], torch.Tensor]  # (T, H) -> (T, H), the timed computation
    module: nn.Module  # owns every parameter: frozen base and trainable adapters
    oracle: Callable[[torch.Tensor], torch.Tensor]  # float64 forward on a copy of the same parameters


def base_mlp(shape: FfnShape, seed: int = 0) -> LlamaMLP:
    """The frozen LLaMA FFN every provider starts from (same seed: same base weights everywhere)."""
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        mlp = LlamaMLP(LlamaConfig(hidden_size=shape.H, intermediate_size=shape.I, hidden_act="silu"))
    return mlp.to(shape.dtype).requires_grad_(False)


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(B_STD * torch.randn(p.shape, generator=gen))


def mixlora_moe(shape: FfnShape, seed: int = 0) -> MixLoraSparseMoe:
    """Our MoE on the base MLP: E experts, top-K, LoRA r R (alpha 2R) on gate/up/down, random non-zero B."""
    config = MixLoraConfig(r=shape.R, lora_alpha=2 * shape.R, num_experts=shape.E, top_k=shape.K, lora_dropout=0.0,
                           target_modules=FFN_PROJECTIONS)
    moe = MixLoraSparseMoe(base_mlp(shape, seed), {"default": config}, "silu")
    _randomize([moe.adapters.default.experts[n].lora_B for n in FFN_PROJECTIONS], seed + 1)
    return moe


def peft_mlp(shape: FfnShape, seed: int = 0) -> nn.Module:
    """PEFT LoRA r R (alpha 2R) on gate/up/down of the base MLP (held by a small module, as PEFT injects into
    children), random non-zero B."""
    holder = nn.Module()
    holder.mlp = base_mlp(shape, seed)
    inject_adapter_in_model(LoraConfig(r=shape.R, lora_alpha=2 * shape.R, lora_dropout=0.0,
                                       target_modules=FFN_PROJECTIONS), holder)
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
    _randomize([p for n, p in holder.named_parameters() if "lora_B" in n], seed + 1)
    return holder


def build_ffn(provider: str, shape: FfnShape, seed: int = 0) -> FfnCase:
    """The setup factory shared by the speed benchmark, the memory ratios and tests/test_benchmark_memory.py."""
    if provider == "dense":
        mlp = base_mlp(shape, seed)
        return FfnCase(mlp, mlp, copy.deepcopy(mlp).double())
    if provider == "peft_lora":
        holder = peft_mlp(shape, seed)
        return FfnCase(holder.mlp, holder, copy.deepcopy(holder).double().mlp)
    moe = mixlora_moe(shape, seed)
    moe64 = copy.deepcopy(moe).double()
    oracle = lambda x: reference_moe_forward(moe64, x, "silu")[0]  # noqa: E731
    if provider == "naive":
        return FfnCase(lambda x: reference_moe_forward(moe, x, "silu")[0], moe, oracle)
    return FfnCase(moe, moe, oracle)


def inputs(shape: FfnShape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H) requiring grad (as inside a model being trained) and the upstream gradient dy (T, H)."""
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(shape.T, shape.H, generator=gen).to(DEVICE, shape.dtype).requires_grad_(True)
    dy = torch.randn(shape.T, shape.H, generator=gen).to(DEVICE, shape.dtype)
    return x, dy


def fwd_bwd_saved_bytes(case: FfnCase, x: torch.Tensor) -> int:
    """Bytes autograd saves for the backward of one forward (parameters excluded; see common.saved_tensors)."""
    return saved_bytes(lambda: case.forward(x), [case.module])


@functools.cache
def baseline_saved_bytes(shape: FfnShape) -> dict[str, int]:
    """Saved-for-backward bytes of dense, peft_lora and naive at `shape`, for the ratios (one forward each)."""
    x, _ = inputs(shape)
    return {p: fwd_bwd_saved_bytes(build_ffn(p, shape), x) for p in ("dense", "peft_lora", "naive")}


def dense_ffn_flops(shape: FfnShape, mode: str) -> int:
    """FLOPs counted for TFLOP/s: the three dense FFN GEMMs only (2·T·H·I each), the same count for every provider.
    fwd_bwd is 2x fwd: the frozen base needs input gradients only, no weight-gradient GEMMs. LoRA work (~0.5%),
    elementwise work and the naive provider's extra K-fold down-projections are not counted."""
    fwd = 3 * 2 * shape.T * shape.H * shape.I
    return fwd if mode == "fwd" else 2 * fwd


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ffn(benchmark, provider: str, mode: str, shape: FfnShape) -> None:
    if provider in KERNEL_PROVIDERS and provider not in kernel_backends():
        pytest.skip(f"{provider}: the backend is not loaded on this machine ({DEVICE.type}); it serves CUDA tensors "
                    "only")
    benchmark.group = f"ffn {shape.name} {mode}"
    case = build_ffn(provider, shape)
    x, dy = inputs(shape)
    ours = provider in ("torch",) + KERNEL_PROVIDERS
    with registry_backend(provider) if ours else contextlib.nullcontext() as ops_used:
        with torch.no_grad():
            n = min(GUARD_TOKENS, shape.T)
            err = check_close(f"{provider} {shape.name}", case.forward(x)[:n], case.oracle(x[:n].double()),
                              TOLERANCE[shape.dtype])

        def reset_grads():
            x.grad = None
            for p in case.module.parameters():
                p.grad = None

        def step():
            y = case.forward(x)
            if mode == "fwd_bwd":
                y.backward(dy)
            synchronize()

        saved = fwd_bwd_saved_bytes(case, x)
        reset_grads()
        step()  # warm-up before the peak-memory run (allocator, lazy initialisation)
        reset_grads()
        peak = peak_memory(step)
        benchmark.pedantic(step, setup=reset_grads, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    base = baseline_saved_bytes(shape)
    flops = dense_ffn_flops(shape, mode)
    info = benchmark.extra_info
    info.update(environment())
    info.update(provider=provider, mode=mode, shape={k: v for k, v in vars(shape).items() if k != "dtype"},
                dtype=str(shape.dtype).removeprefix("torch."), guard_rel_error=err,
                saved_bytes=saved, saved_mib=saved / MIB, peak_bytes=peak,
                peak_mib=None if peak is None else peak / MIB,
                ratio_to_dense=saved / base["dense"], ratio_to_peft_lora=saved / base["peft_lora"],
                ratio_to_naive=saved / base["naive"], flops=flops,
                flops_counted="3 dense FFN GEMMs, 2*T*H*I each; fwd_bwd = 2x fwd (frozen base: input grads only)")
    if ops_used is not None:
        info["ops_backend"] = ops_used
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        info["tflops"] = flops / stats.median / 1e12
        info["tokens_per_s"] = shape.T / stats.median

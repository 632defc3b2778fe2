"""Whole-model training step (forward + backward of the loss, no optimizer) on a random LLaMA-shaped model.

Providers (2.9% trainable parameters each on LLaMA-2-7B):
    peft_lora      PEFT LoRA r 80 on q, k, v, o, gate, up, down.
    naive_mixlora  our MixLoRA model with every MoE's forward replaced by the published loop
                   (`tests.reference.reference_moe_forward`), router logits kept for the aux loss.
    mixlora        our MixLoRA model: E 8, K 2, expert LoRA r 16, attention LoRA r 16 on q, k, v, o.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import DEVICE, MIB, check_close, environment, peak_memory, saved_bytes, synchronize
from mixlora import MixLoraConfig, get_mixlora_model, moe_layers
from tests.reference import reference_moe_forward

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    H: int
    I: int
    heads: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype


if DEVICE.type == "cuda":
    SHAPES = [
        ModelShape("llama2-7b-2x1024", 32, 4096, 11008, 32, 32000, 2, 1024, torch.bfloat16),  # LLaMA-2-7B
        ModelShape("llama2-7b-8x1024", 32, 4096, 11008, 32, 32000, 8, 1024, torch.bfloat16),  # LLaMA-2-7B
    ]
    ROUNDS = 10
else:
    # A 2-layer LLaMA with the CPU FFN shape of bench_ffn (H 256, I 688), fp32.
    SHAPES = [ModelShape("tiny-llama-2x64", 2, 256, 688, 4, 512, 2, 64, torch.float32)]
    ROUNDS = 3

PROVIDERS = ("peft_lora", "naive_mixlora", "mixlora")
# Relative error of the logits against the float64 oracle. bf16: rounding compounds over 32 layers (set from the
# FFN's 2e-2; to be confirmed on the GPU).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
GUARD_TOKENS = 256  # causal model: the first positions of the first sequence, checked in float64
B_STD = 0.02


def base_model(shape: ModelShape, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.H, intermediate_size=shape.I,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=max(shape.seq, 128),
                         hidden_act="silu")
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=shape.dtype)
    return model.train()


def _randomize_lora_B(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(B_STD * torch.randn(p.shape, generator=gen))


def _naive_moe_forward(moe, hidden_states: torch.Tensor) -> torch.Tensor:
    y, logits = reference_moe_forward(moe, hidden_states, "silu")
    moe.adapters.default.router_logits = logits  # the aux-loss hook reads it, as it does for our forward
    return y


def use_naive_moe(model: nn.Module) -> nn.Module:
    """Replace the forward of every MixLoraSparseMoe instance by the published loop (the tests' oracle)."""
    for moe in moe_layers(model):
        moe.forward = functools.partial(_naive_moe_forward, moe)
    return model


def build_model(provider: str, shape: ModelShape, seed: int = 0, targets: list[str] = TARGETS,
                peft_r: int = 80) -> nn.Module:
    """The model of `provider`: PEFT LoRA r `peft_r` on `targets`, or MixLoRA E 8, K 2, R 16 on `targets` (with the
    published loop for `naive`/`naive_mixlora`); LoRA B random so the adapters matter."""
    model = base_model(shape, seed)
    if provider == "peft_lora":
        model = get_peft_model(model, LoraConfig(r=peft_r, lora_alpha=2 * peft_r, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    else:
        get_mixlora_model(model, MixLoraConfig(r=16, lora_alpha=32, num_experts=8, top_k=2, lora_dropout=0.0,
                                               target_modules=targets))
    _randomize_lora_B(model, seed + 1)
    return use_naive_moe(model) if provider in ("naive", "naive_mixlora") else model


def oracle64(provider: str, model: nn.Module) -> nn.Module:
    """A float64 copy of `model` with the published MoE loop in every MixLoRA layer."""
    copy64 = copy.deepcopy(model).double()
    return copy64 if provider == "peft_lora" else use_naive_moe(copy64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_model_train_step(benchmark, provider: str, shape: ModelShape) -> None:
    benchmark.group = f"model {shape.name} fwd_bwd"
    model = build_model(provider, shape)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(DEVICE)

    n = min(GUARD_TOKENS, shape.seq)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:1, :n]
        ref_model = oracle64(provider, model)
        ref = ref_model(input_ids=ids[:1, :n]).logits
        del ref_model
    err = check_close(f"{provider} {shape.name} logits", logits, ref, TOLERANCE[shape.dtype])
    del logits, ref

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        synchronize()

    def reset_grads():
        model.zero_grad(set_to_none=True)

    saved = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, [model])
    step()  # warm-up before the peak-memory run
    reset_grads()
    peak = peak_memory(step)
    benchmark.pedantic(step, setup=reset_grads, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info = benchmark.extra_info
    info.update(environment())
    info.update(provider=provider, mode="fwd_bwd", shape={k: v for k, v in vars(shape).items() if k != "dtype"},
                dtype=str(shape.dtype).removeprefix("torch."), guard_rel_error=err,
                trainable_params=trainable, trainable_percent=100 * trainable / total,
                saved_bytes=saved, saved_mib=saved / MIB, peak_bytes=peak,
                peak_mib=None if peak is None else peak / MIB)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        info["tokens_per_s"] = shape.batch * shape.seq / stats.median

"""CPU training step (forward + backward of the loss, no optimizer) of the model of issue 11, per provider.

A 2-layer LLaMA-shaped model (H 256, I 688, 4 heads, vocab 512), batch 4 × 128 tokens, fp32, adapters on the FFN
projections gate/up/down only:
    cpu        our MixLoRA model (E 8, K 2, R 16) on the `mixlora_kernels.cpu` kernels.
    torch      the same model on the pure-torch reference ops (the loop-simple oracle implementations).
    naive      the same model with every MoE's forward replaced by the published loop over experts
               (`tests.reference.reference_moe_forward`, via bench_model.use_naive_moe).
    peft_lora  PEFT LoRA r 16 on the same projections of the same base.
Every provider's logits are checked against the float64 oracle before it is timed (bench_model.oracle64).
Run: `python -m pytest --benchmark-only benchmarks/bench_cpu.py`; CPU only (the GPU has bench_model/bench_ffn).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.bench_model import ModelShape, build_model, oracle64
from benchmarks.common import DEVICE, MIB, check_close, environment, saved_bytes
from mixlora_kernels import backend

FFN_TARGETS = ["gate_proj", "up_proj", "down_proj"]
SHAPE = ModelShape("issue11-llama-2x256", 2, 256, 688, 4, 512, 4, 128, torch.float32)  # issue 11's CPU model
PROVIDERS = ("cpu", "torch", "naive", "peft_lora")
ROUNDS = 7
TOLERANCE = 1e-4  # relative error of the logits, fp32 (bench_model's fp32 tolerance)

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU benchmark: on a GPU use bench_model/bench_ffn")


def build(provider: str, shape: ModelShape = SHAPE, seed: int = 0) -> torch.nn.Module:
    """bench_model's factory on the FFN projections only, PEFT LoRA at the experts' rank 16 (issue shape)."""
    return build_model(provider, shape, seed, targets=FFN_TARGETS, peft_r=16)


def ops_backend(provider: str):
    """The op backend a provider runs on: `cpu` kernels, the `torch` references; the others call no op that matters
    (naive, PEFT) and keep the default."""
    if provider in ("cpu", "torch"):
        return backend.use(provider)
    return contextlib.nullcontext()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_train_step(benchmark, provider: str) -> None:
    if provider == "cpu" and "cpu" not in backend.loaded():
        pytest.skip(f"the cpu backend is not loaded: {backend.load_errors().get('cpu', 'not requested')}")
    shape = SHAPE
    benchmark.group = f"cpu model {shape.name} fwd_bwd"
    model = build(provider)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    with ops_backend(provider) as used:
        with torch.no_grad():
            logits = model(input_ids=ids[:1]).logits
            ref = oracle64(provider, model)(input_ids=ids[:1]).logits
        err = check_close(f"{provider} {shape.name} logits", logits, ref, TOLERANCE)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()

        def reset_grads():
            model.zero_grad(set_to_none=True)

        saved = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, [model])
        benchmark.pedantic(step, setup=reset_grads, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    info = benchmark.extra_info
    info.update(environment())
    info.update(provider=provider, mode="fwd_bwd", shape={k: v for k, v in vars(shape).items() if k != "dtype"},
                dtype="float32", guard_rel_error=err, saved_bytes=saved, saved_mib=saved / MIB,
                threads=torch.get_num_threads(), ops_backend=used)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        info["tokens_per_s"] = shape.batch * shape.seq / stats.median

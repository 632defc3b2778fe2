"""N MixLoRA adapters trained at once on one frozen base vs one training job per adapter (the paper's comparison).

Providers (N = 2 adapters, each E 8, K 2, expert LoRA r 16, attention LoRA r 16 on q, k, v, o, each with its own
`batch` rows):
    separate  N single-adapter models, each with its own copy of the base (N jobs); one step = each job's forward +
              backward on its own rows, one after the other, so time, saved bytes, peak memory and parameter bytes
              are the sums over the jobs.
    together  one `mixlora.multi` model holding the N adapters over one base; one step = one forward + backward on
              the N·batch rows (frozen GEMMs once for all rows, each adapter's LoRA/experts on its row slice).
Both hold the same adapter weights; the logits of `together` are checked against those of `separate` first.
extra_info: saved-for-backward bytes, CUDA peak memory, parameter bytes (base copies count), and the
together/separate ratios (`time_ratio` on the second provider, once both have run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from benchmarks.bench_model import TARGETS, ModelShape, base_model
from benchmarks.common import DEVICE, MIB, check_close, environment, peak_memory, saved_bytes, synchronize
from mixlora import MixLoraConfig, adapter_state_dict, get_mixlora_model
from mixlora.multi import batch_adapters, get_multi_mixlora_model

N_ADAPTERS = 2
if DEVICE.type == "cuda":
    SHAPES = [ModelShape("llama2-7b-2x1024", 32, 4096, 11008, 32, 32000, 2, 1024, torch.bfloat16)]  # LLaMA-2-7B
    ROUNDS = 10
else:
    # bench_model's CPU shape: a 2-layer LLaMA with H 256, I 688, fp32; `batch` rows per adapter.
    SHAPES = [ModelShape("tiny-llama-2x64", 2, 256, 688, 4, 512, 2, 64, torch.float32)]
    ROUNDS = 3

PROVIDERS = ("separate", "together")  # separate first: together reports the time ratio
# Relative error of together's logits against separate's (same weights, same rows): only the GEMM row blocking
# differs. bf16: rounding compounds over 32 layers (bench_model's bound).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
B_STD = 0.02
NAMES = [f"adapter{i}" for i in range(N_ADAPTERS)]
_MEDIANS: dict[tuple[str, str], float] = {}  # (shape, provider) -> median step seconds, for the time ratio


def _config() -> MixLoraConfig:
    return MixLoraConfig(r=16, lora_alpha=32, num_experts=8, top_k=2, lora_dropout=0.0, target_modules=TARGETS)


def _randomize(params: dict[str, torch.Tensor], seed: int) -> None:
    """Every adapter parameter drawn from `seed` by its single-adapter name, so both providers hold the same adapters:
    B ~ N(0, B_STD²) (nonzero, so the adapters change the output), A and the router ~ N(0, 1/in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(params.items()):
            std = B_STD if "lora_B" in name else p.shape[-1] ** -0.5
            p.copy_(std * torch.randn(p.shape, generator=gen))


@dataclass
class Case:
    models: list[nn.Module]
    jobs: list[Callable[..., object]]  # one per training job: (**kwargs) -> model output on that job's rows
    logits: Callable[[], torch.Tensor]  # all N·batch rows, in adapter order

    def step(self) -> None:
        for job in self.jobs:
            job(labels=True).loss.backward()


def _inputs(shape: ModelShape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, shape.vocab, (N_ADAPTERS * shape.batch, shape.seq), generator=gen).to(DEVICE)


def _job(model: nn.Module, ids: torch.Tensor, rows: list[str] | None = None):
    def run(labels: bool = False):
        kwargs = {"labels": ids} if labels else {}
        if rows is None:
            return model(input_ids=ids, **kwargs)
        with batch_adapters(model, rows):
            return model(input_ids=ids, **kwargs)
    return run


def build(provider: str, shape: ModelShape) -> Case:
    ids = _inputs(shape)
    if provider == "together":
        model = get_multi_mixlora_model(base_model(shape), {name: _config() for name in NAMES})
        for i, name in enumerate(NAMES):
            _randomize(adapter_state_dict(model, name), seed=1 + i)
        job = _job(model, ids, [name for name in NAMES for _ in range(shape.batch)])
        return Case([model], [job], lambda: job().logits)
    models, jobs = [], []
    for i in range(N_ADAPTERS):
        model = get_mixlora_model(base_model(shape), _config())  # same base seed: the same frozen weights
        _randomize(adapter_state_dict(model), seed=1 + i)
        models.append(model)
        jobs.append(_job(model, ids[i * shape.batch:(i + 1) * shape.batch]))
    return Case(models, jobs, lambda: torch.cat([job().logits for job in jobs]))


def _param_bytes(models: list[nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def _peak_sum(case: Case) -> int | None:
    """Sum over the jobs of each job's own peak (separate jobs run on their own devices, or one after the other)."""
    peaks = [peak_memory(lambda job=job: job(labels=True).loss.backward()) for job in case.jobs]
    return None if None in peaks else sum(peaks)


@functools.lru_cache(maxsize=None)
def memory(shape: ModelShape) -> dict[str, dict[str, int | None]]:
    """Saved bytes, CUDA peak and parameter bytes of both providers (sums over jobs), so each row can report the
    together/separate ratio."""
    out = {}
    for provider in PROVIDERS:
        case = build(provider, shape)
        case.step()  # warm-up before the peak-memory run
        for m in case.models:
            m.zero_grad(set_to_none=True)
        out[provider] = {
            # one job's graph at a time, as separate jobs hold it
            "saved_bytes": sum(saved_bytes(lambda job=job: job(labels=True).loss, case.models) for job in case.jobs),
            "peak_bytes": _peak_sum(case),
            "param_bytes": _param_bytes(case.models),
        }
        del case
    return out


def _ratio(a, b):
    return None if a is None or not b else a / b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_multi_adapter_train_step(benchmark, provider: str, shape: ModelShape) -> None:
    benchmark.group = f"multi-adapter N{N_ADAPTERS} {shape.name} fwd_bwd"
    mem = memory(shape)
    case = build(provider, shape)
    with torch.no_grad():
        logits = case.logits()
        other = build("separate" if provider == "together" else "together", shape)
        ref = other.logits()
        del other
    err = check_close(f"{provider} {shape.name} logits vs the other provider", logits, ref, TOLERANCE[shape.dtype])
    del logits, ref

    def step():
        case.step()
        synchronize()

    def reset_grads():
        for m in case.models:
            m.zero_grad(set_to_none=True)

    benchmark.pedantic(step, setup=reset_grads, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    ours, together, separate = mem[provider], mem["together"], mem["separate"]
    info = benchmark.extra_info
    info.update(environment())
    info.update(provider=provider, mode="fwd_bwd", adapters=N_ADAPTERS, jobs=len(case.models),
                shape={k: v for k, v in vars(shape).items() if k != "dtype"},
                dtype=str(shape.dtype).removeprefix("torch."), guard_rel_error=err,
                saved_bytes=ours["saved_bytes"], saved_mib=ours["saved_bytes"] / MIB,
                peak_bytes=ours["peak_bytes"],
                peak_mib=None if ours["peak_bytes"] is None else ours["peak_bytes"] / MIB,
                param_bytes=ours["param_bytes"], param_mib=ours["param_bytes"] / MIB,
                saved_ratio_together_over_separate=_ratio(together["saved_bytes"], separate["saved_bytes"]),
                peak_ratio_together_over_separate=_ratio(together["peak_bytes"], separate["peak_bytes"]),
                param_ratio_together_over_separate=_ratio(together["param_bytes"], separate["param_bytes"]))
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        info["tokens_per_s"] = N_ADAPTERS * shape.batch * shape.seq / stats.median
        _MEDIANS[(shape.name, provider)] = stats.median
        if all((shape.name, p) in _MEDIANS for p in PROVIDERS):
            info["time_ratio_together_over_separate"] = \
                _MEDIANS[(shape.name, "together")] / _MEDIANS[(shape.name, "separate")]

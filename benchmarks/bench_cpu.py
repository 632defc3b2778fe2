"""CPU training step (forward + backward of the loss, no optimizer) of the model of issue 11, per provider.

A 2-layer LLaMA-shaped model (H 256, I 688, 4 heads, vocab 512), batch 4 × 128 tokens, fp32, adapters on the FFN
projections gate/up/down only:
    cpu        our MixLoRA model (E 8, K 2, R 16) on the `mixlora_kernels.cpu` kernels (C++, the extension
               `mixlora_kernels._cpu`).
    torch      the same model on the pure-torch reference ops (the loop-simple oracle implementations).
    naive      the same model with every MoE's forward replaced by the published loop over experts
               (`tests.reference.reference_moe_forward`, via bench_model.use_naive_moe).
    peft_lora  PEFT LoRA r 16 on the same projections of the same base.
Every provider's logits are checked against the float64 oracle before it is timed (bench_model.oracle64). Each
provider records the machine's load average before and after its rounds (extra_info.load_avg_*: this is a shared
machine, and a loaded one says little about the kernels).

Run: `python -m pytest --benchmark-only benchmarks/bench_cpu.py --benchmark-json=out.json`, then
`python -m benchmarks.bench_cpu out.json -o out.md` writes the table (ms, × naive, × PEFT LoRA, saved bytes, the
issue's targets); CPU only (the GPU has bench_model/bench_ffn).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import pytest
import torch

from benchmarks.bench_model import ModelShape, build_model, oracle64
from benchmarks.common import DEVICE, MIB, check_close, environment, saved_bytes
from benchmarks.report import write_report
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
        load_before = os.getloadavg()
        benchmark.pedantic(step, setup=reset_grads, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        load_after = os.getloadavg()

    info = benchmark.extra_info
    info.update(environment())
    info.update(provider=provider, mode="fwd_bwd", shape={k: v for k, v in vars(shape).items() if k != "dtype"},
                dtype="float32", guard_rel_error=err, saved_bytes=saved, saved_mib=saved / MIB,
                threads=torch.get_num_threads(), ops_backend=used, load_avg_before=load_before,
                load_avg_after=load_after)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        info["tokens_per_s"] = shape.batch * shape.seq / stats.median


# --- the table -------------------------------------------------------------------------------------------------------

LABELS = {
    "cpu": "**ours: C++ CPU kernels** (`mixlora_kernels.cpu`, the extension `mixlora_kernels._cpu`)",
    "torch": "ours on the torch reference ops",
    "naive": "naive (published loop)",
    "peft_lora": "PEFT LoRA r16",
}
TARGETS = {"naive": 0.7, "peft_lora": 1.5}  # issue 11: ours <= 0.7x the published loop and <= 1.5x PEFT LoRA


def render(data: dict) -> str:
    """Markdown for a pytest-benchmark JSON of this file: header (commit, device, load), the table, the targets."""
    rows = {b["extra_info"]["provider"]: b for b in data["benchmarks"] if "provider" in b["extra_info"]}
    if not rows:
        raise ValueError("no bench_cpu results in this JSON")
    median = {p: r["stats"]["median"] * 1e3 for p, r in rows.items()}
    info = next(iter(rows.values()))["extra_info"]
    loads = [v for r in rows.values() for k in ("load_avg_before", "load_avg_after")
             for v in [r["extra_info"].get(k)] if v]
    shape = info["shape"]
    lines = [
        f"# CPU training step, issue 11 model ({data.get('datetime', '?')[:10]})", "",
        f"- commit: {info.get('commit', '?')}; device: {info.get('device', '?')}; torch {info.get('torch', '?')}",
        "- machine load (1-min load average before / after each provider's rounds, 2 cores): " + (
            ", ".join(f"{p} {r['extra_info']['load_avg_before'][0]:.2f} / {r['extra_info']['load_avg_after'][0]:.2f}"
                      for p, r in rows.items() if r["extra_info"].get("load_avg_before"))
            if loads else "not recorded"),
        f"- model: {shape['layers']}-layer LLaMA-shaped (H {shape['H']}, I {shape['I']}, {shape['heads']} heads, vocab "
        f"{shape['vocab']}), batch {shape['batch']} x {shape['seq']} tokens, {info.get('dtype')}; MixLoRA E 8, K 2, "
        "R 16 on gate/up/down; PEFT LoRA r 16 on the same projections",
        f"- forward + backward of the LM loss (no optimizer), `python -m pytest --benchmark-only "
        f"benchmarks/bench_cpu.py`; median of {next(iter(rows.values()))['stats']['rounds']} rounds after 1 warm-up, "
        "providers one after another in one process",
        "- **CPU timings: they say nothing about the GPU kernels.**", "",
        "| provider | median ms | IQR ms | × naive | × peft_lora | saved for backward MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for provider in [p for p in LABELS if p in rows] + sorted(set(rows) - set(LABELS)):
        r = rows[provider]

        def ratio(base):
            return f"{median[provider] / median[base]:.2f}" if base in median else "–"

        lines.append(f"| {LABELS.get(provider, provider)} | {median[provider]:.1f} | {r['stats']['iqr'] * 1e3:.1f} | "
                     f"{ratio('naive')} | {ratio('peft_lora')} | {r['extra_info'].get('saved_mib', 0):.2f} |")
    if "cpu" in median and all(b in median for b in TARGETS):
        met = {b: median["cpu"] / median[b] <= limit for b, limit in TARGETS.items()}
        verdict = "**met**" if all(met.values()) else "**not met**"
        lines += ["", f"Issue 11's targets (ours ≤ {TARGETS['naive']}× naive and ≤ {TARGETS['peft_lora']}× PEFT LoRA, "
                      f"in the same run) are {verdict}: " + ", ".join(
                          f"{median['cpu'] / median[b]:.2f}× {b} (≤ {limit})" for b, limit in TARGETS.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Markdown table of a bench_cpu pytest-benchmark JSON")
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json) of benchmarks/bench_cpu.py")
    parser.add_argument("-o", "--output", help="markdown file to write (default: stdout)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        text = render(json.load(f))
    write_report(text, args.output)


if __name__ == "__main__":
    main()

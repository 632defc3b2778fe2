"""Activation memory of the MixLoRA FFN (docs/algorithm.md §2): the shared-base layer saves for backward no more than
PEFT LoRA on the same FFN, and at most half of the published per-expert loop. Measured with the benchmarks' own factory
and counter (benchmarks/bench_ffn.py), at the CPU benchmark shape."""

from __future__ import annotations

import sys
from pathlib import Path

# `benchmarks` is a top-level package of the repository, not an installed one.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.bench_ffn import FfnShape, build_ffn, inputs  # noqa: E402
from benchmarks.common import describe_saved, saved_tensors  # noqa: E402
import torch  # noqa: E402

# The CPU benchmark shape: LLaMA-2-7B FFN scaled down 16x, E 8, K 2, R 16.
SHAPE = FfnShape("cpu-small-T512", 512, 256, 688, 8, 2, 16, torch.float32)


def _saved(provider: str):
    case = build_ffn(provider, SHAPE)
    x, _ = inputs(SHAPE)
    return saved_tensors(lambda: case.forward(x), [case.module])


def test_mixlora_ffn_saves_no_more_than_peft_lora_and_half_the_naive_loop():
    ours, peft, naive = _saved("torch"), _saved("peft_lora"), _saved("naive")
    total = {name: sum(t.nbytes for t in ts) for name, ts in (("ours", ours), ("peft", peft), ("naive", naive))}
    detail = f"{total}\nours:\n{describe_saved(ours)}\npeft_lora:\n{describe_saved(peft)}"
    assert total["ours"] <= total["peft"], detail
    assert total["ours"] <= 0.5 * total["naive"], detail

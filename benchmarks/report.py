"""Markdown table from a pytest-benchmark JSON: `python -m benchmarks.report results.json [-o table.md]
[--measured-cost cost.json]`.

One table per group (shape and mode): median and IQR of the timed rounds, saved-for-backward MiB, CUDA peak MiB,
time and saved-memory ratios against peft_lora and against the naive (published) loop of the same group.
`--measured-cost` also writes, from a GPU run of bench_ffn, backend -> {T: median fwd+bwd ms} of our kernel
backends: committed as `mixlora_kernels/measured_cost.json`, it is the evidence `MIXLORA_BACKEND=auto` orders the
GPU backends by.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

NAIVE = ("naive", "naive_mixlora")
# Row order: baselines first, then ours from the reference to the kernels.
ORDER = ("dense", "peft_lora", "naive", "naive_mixlora", "torch", "mixlora", "triton", "cuda")


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def header(data: dict) -> list[str]:
    env = data.get("machine_info", {}).get("mixlora", {})
    commit = env.get("commit") or data.get("commit_info", {}).get("id", "unknown")
    backends = sorted(set(env.get("backends", {}).values())) or ["?"]
    lines = [f"- date: {data.get('datetime', 'unknown')}",
             f"- commit: {commit}",
             f"- device: {env.get('device', data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?'))}",
             f"- torch {env.get('torch', '?')}, triton {env.get('triton') or 'none'}, CUDA {env.get('cuda') or 'none'}",
             f"- mixlora:: op backends serving CUDA tensors: {', '.join(backends)}"]
    if str(env.get("device", "")).startswith("CPU"):
        lines.append("- **CPU timings of the pure-torch reference ops, not of the GPU kernels**: they show the "
                     "memory accounting and relative loop costs, not GPU performance.")
    return lines


def table(rows: list[dict]) -> list[str]:
    by_provider = {r["extra_info"].get("provider", r["name"]): r for r in rows}
    peft = by_provider.get("peft_lora")
    naive = next((by_provider[n] for n in NAIVE if n in by_provider), None)

    def median(r):
        return None if r is None else r["stats"]["median"]

    def saved(r):
        return None if r is None else r["extra_info"].get("saved_bytes")

    out = ["| provider | median ms | IQR ms | rounds | saved MiB | peak MiB | time ×peft | time ×naive | "
           "saved ×peft | saved ×naive | throughput |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rank = {name: i for i, name in enumerate(ORDER)}
    for name, r in sorted(by_provider.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])):
        info, stats = r["extra_info"], r["stats"]
        if info.get("tflops") is not None:
            throughput = f"{info['tflops']:.3g} TFLOP/s"
        elif info.get("tokens_per_s") is not None:
            throughput = f"{info['tokens_per_s']:,.0f} tok/s"
        else:
            throughput = "–"
        out.append(f"| {name} | {stats['median'] * 1e3:.2f} | {stats['iqr'] * 1e3:.2f} | {stats['rounds']} | "
                   f"{_fmt(info.get('saved_mib'), '.2f')} | {_fmt(info.get('peak_mib'), '.1f')} | "
                   f"{_ratio(median(r), median(peft))} | {_ratio(median(r), median(naive))} | "
                   f"{_ratio(saved(r), saved(peft))} | {_ratio(saved(r), saved(naive))} | {throughput} |")
    return out


def render(data: dict, note: str | None = None) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]].append(bench)
    lines = ["# MixLoRA benchmarks", ""] + header(data) + ([f"- note: {note}"] if note else []) + [""]
    for group in sorted(groups):
        lines += [f"## {group}", ""] + table(groups[group]) + [""]
    notes = {b["extra_info"].get("flops_counted") for b in data["benchmarks"]} - {None}
    lines += ["Saved MiB: bytes autograd keeps for backward after one forward (unique storages, parameters excluded). "
              "Peak MiB (CUDA only): max allocated during one step above the allocation before it. Ratios: this "
              "row over the peft_lora / naive row of the same group (time: medians)."]
    lines += [f"TFLOP/s counts {n}." for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def measured_cost(data: dict) -> dict[str, dict[str, float]]:
    """Kernel backend -> {str(T): median ms} of the FFN fwd+bwd rows measured on CUDA (empty for a CPU run)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        on_gpu = not str(info.get("device", "CPU")).startswith("CPU")
        if on_gpu and info.get("mode") == "fwd_bwd" and info.get("provider") in ("triton", "cuda"):
            out[info["provider"]][str(info["shape"]["T"])] = bench["stats"]["median"] * 1e3
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", help="markdown file to write (default: stdout)")
    parser.add_argument("--note", help="a line for the header, e.g. the machine's load during the run")
    parser.add_argument("--measured-cost", help="JSON to write: kernel backend -> {T: fwd+bwd ms} (GPU runs)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    text = render(data, args.note)
    if args.measured_cost:
        with open(args.measured_cost, "w") as f:
            json.dump(measured_cost(data), f, indent=1)
    write_report(text, args.output)


def write_report(text: str, path: str | None) -> None:
    """The markdown `text` into `path`, or onto stdout for None."""
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

"""Predicted H200 (sm_90) cost of every MixLoRA kernel, from the compiled code, without a GPU: PREDICTION, not a
measurement (method, constants and anchors: docs/cost-model.md; a GPU measurement overrides this).

    python -m benchmarks.sm90_cost --json benchmarks/results/sm90-cost-DATE.json [--md ...] [--predicted PATH]

What it does, per backend, for the LLaMA-2-7B FFN (H 4096, I 11008, E 8, K 2, R 16, bf16) at T 4096 and 16384,
LoRA dropout 0 and 0.05:
- Triton: calls the real launchers of `mixlora_kernels.triton` (the op pipeline of one MoE FFN, forward then
  backward) on `meta` tensors, with a stub driver that reports sm_90 and a `JITFunction.run` that compiles only.
  Constexprs, integer specialisation, num_warps / num_stages and the grid are exactly a run's.
- CUDA: every `csrc/**/*.cu` with nvcc `-cubin -O3 -lineinfo -arch=sm_90 -Xptxas -v` and setup.py's / torch's
  extension flags (device code only: the host side does not change the kernels); of each templated kernel the
  instantiation the bf16 pipeline launches (`CudaLaunch.instance`: dtypes, the tensor-core kernels' rank-fragment
  count NF); grids, shared memory and bytes from `CUDA_LAUNCHES` (transcribed from the `*_launch` functions, shape
  formulas; every `__global__` kernel of csrc/ is either in it or in `CUDA_NOT_IN_PIPELINE`, which
  tests/test_sm90_cost.py checks against the launch sites). sort_slots' cub radix sort and api.cpp's casts of the
  fp32 weight gradients to bf16 are modelled at HBM bandwidth (`cuda_model_only_records`).
- Each kernel's SASS (nvdisasm with line info) is read: registers / stack (cuobjdump -res-usage, ptxas -v for CUDA),
  spills (STL/LDL), MMA kinds (HGMMA = wgmma, HMMA = mma.sync, with the operand type from the opcode and the PTX), and
  dynamic counts (see `profile_sass`): loops are backward branches; each SASS loop is matched to the source `for`
  whose line its backward branch carries (else whose lines its instructions carry), and its trip count is that loop's
  `range(...)` (Triton) or `for (...)` header (CUDA) evaluated at the launch's arguments. Data-dependent bounds (an
  expert's segment of the sorted slots) are taken at balanced routing, S / E slots per expert. Two-role Triton kernels
  (`if pid < n:` at the top level) charge each role's instructions to the programs that take it.
- Cost model per kernel, H200 constants below: lower bound = max(HBM / 4.3 TB/s, L2 / 8 TB/s, tensor-core FLOPs /
  peak of the MMA kind, SIMT FLOPs / 67 TFLOP/s, warp-instructions / (132 * 4 * 1.755 GHz)), each divided by the
  fraction of SMs the grid can fill; central = CENTRAL_LOW_OCC x bound where at most 8 warps per SM are resident
  (docs/cost-model.md's 1.5-2x, we take the middle), else CENTRAL_HIGH_OCC x bound; plus LAUNCH_S per launch.
- Whole FFN fwd+bwd per backend = the measured dense frozen FFN (3.41 / 14.22 ms) + every kernel the backend's
  pipeline launches in fwd+bwd. router_logits: both paths launch their own kernels (analysed like the others; exact
  fp32 SIMT FMA, no dot or MMA).

HBM bytes are the compulsory traffic: every distinct tensor a launch touches, read or written once (Triton: the
launch's tensor arguments; CUDA: `CUDA_LAUNCHES` formulas). L2 bytes are the dynamic global load/store bytes of the
SASS (every lane of every executed LDG/STG/LDGSTS, at its access width) beyond the HBM bytes: what is re-read from
L2 (Triton: divided by the replication of the load's layout, lanes that load the same element, or the same address
of a broadcast pointer tile; predicated-off lanes and same-address lanes of CUDA's scalar loads are counted, so it
is an upper estimate).

Approximate, and how: a loop's trip count is taken at its source bounds (mean over programs where they depend on
the program id); unrolled loops are recognised as main + remainder copies of one source loop, and unswitched copies
of a CUDA kernel's loop as versions of which one runs, but versions that nvcc does not emit as sibling loops are
all counted; branches inside a loop are counted as if taken (CUDA's dropout hash at dropout 0, an untaken
activation case is removed); early exits of spare programs are not modelled. Torch ops between kernels that move
whole weights are modelled at HBM bandwidth (`triton_model_only_records`, `cuda_model_only_records`); not modelled at
all: the small ones (sort_slots' cumsum, the split-sum of an I-split reduction, dtype casts of the down delta).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREDICTED_COST_PATH = ROOT / "mixlora_kernels" / "predicted_cost.json"
LABEL = "PREDICTION, not a measurement: static analysis of the sm_90 code compiled on a CPU machine (no GPU ran)"

# H200 constants (docs/cost-model.md): 132 SMs, 4 schedulers per SM at 1.755 GHz, 4.3 TB/s HBM copy (measured),
# ~790 TFLOP/s bf16 dense GEMM (measured, = wgmma), L2->SM 7-10 TB/s (assumed 8), tf32 mma.sync ~250 TFLOP/s
# (assumed), fp32 SIMT 67 TFLOP/s, 228 KB shared memory and 65 536 registers per SM.
SMS = 132
SCHEDULERS = 4
CLOCK_HZ = 1.755e9
HBM_BPS = 4.3e12
L2_BPS = 8.0e12
SIMT_FLOPS = 67e12
# Tensor-core peak by (instruction, operand type). HMMA bf16/fp16 (mma.sync) is not in docs/cost-model.md: assumed
# 2x its tf32 figure (the operand is half as wide), i.e. ~63 % of wgmma, as commonly seen on Hopper.
TC_PEAK = {("HGMMA", "bf16"): 790e12, ("HGMMA", "f16"): 790e12, ("HGMMA", "tf32"): 395e12,
           ("HMMA", "bf16"): 500e12, ("HMMA", "f16"): 500e12, ("HMMA", "tf32"): 250e12}
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
CENTRAL_LOW_OCC = 1.75   # <= 8 resident warps per SM: latency-bound, docs/cost-model.md's 1.5-2x
CENTRAL_HIGH_OCC = 1.25  # well-occupied kernels reach ~80 % of their bound
LAUNCH_S = 2e-6          # launch + tail of one kernel (not in the bound)

# Measured on an H200, bf16, fwd+bwd, LLaMA-2-7B FFN (docs/cost-model.md): the anchors the predictions compare to.
MEASURED_MS = {"dense": {4096: 3.41, 16384: 14.22}, "peft_lora": {4096: 4.56, 16384: 17.54},
               "published_loop": {4096: 27.66, 16384: 47.67}}
GOAL_MS = {4096: 4.8, 16384: 18.4}
# Predictions of the review of commit 19e494c at T 4096 (the review in the project's shared notes), for calibration.
REVIEW_19E494C_MS = {"triton": 14.0, "cuda": 33.0}


@dataclass(frozen=True)
class Shape:
    """One FFN layer: T tokens, H hidden, I intermediate, E experts, K top-k, R rank, LoRA dropout p."""
    T: int
    H: int = 4096   # LLaMA-2-7B FFN
    I: int = 11008
    E: int = 8
    K: int = 2
    R: int = 16
    dropout: float = 0.0

    @property
    def S(self) -> int:
        return self.T * self.K


TARGET_TOKENS = (4096, 16384)
TARGET_DROPOUTS = (0.0, 0.05)


# ----------------------------------------------------------------------------------------------------- tools
def _triton_bin(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else (shutil.which(name) or name)


def _run(cmd: list[str], **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout + out.stderr


def disassemble(cubin: bytes | str) -> str:
    """nvdisasm text of a cubin (bytes or path) with inlined line info (`//## File ..., line N inlined at ...`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = cubin
        if isinstance(cubin, bytes):
            path = os.path.join(tmp, "k.cubin")
            Path(path).write_bytes(cubin)
        cmd = [_triton_bin("nvdisasm"), "-c", "-g", "-gi", path]
        return subprocess.run(cmd, capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage: function -> {REG, STACK, SHARED, LOCAL}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        text = _run([_triton_bin("cuobjdump"), "-res-usage", path])
    out, fn = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        elif fn and "REG:" in line:
            out[fn] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return out


# ------------------------------------------------------------------------------------------ SASS and loops
@dataclass
class Instr:
    addr: int
    op: str            # opcode with modifiers, predicate stripped: "HGMMA.64x32x16.F32.BF16"
    text: str
    locs: frozenset    # {(file, line)}: every level of the inlining chain
    target: str | None = None  # branch label
    inner: tuple | None = None  # (file, line) of the innermost level (the code itself, not a call site)
    chain: tuple = ()  # the levels of locs in order, innermost first


@dataclass
class SourceLoop:
    """A source loop: lines [first, last] of `file`, trip count per entry (None: unknown at this shape)."""
    file: str
    first: int
    last: int
    trips: float | None
    text: str


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    instrs, labels, pending, locs, inner = [], {}, [], frozenset(), None
    chain: list = []
    fresh = True
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//##"):
            found = [(f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', s)]
            if fresh:
                chain, fresh, inner = [], False, found[0] if found else None
            chain += [loc for loc in found if loc not in chain]
            locs = frozenset(chain)
            continue
        m = re.match(r"\s*(\.L\w+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);?\s*$", line)
        if not m:
            continue
        fresh = True
        addr, body = int(m.group(1), 16), m.group(2).strip().rstrip(";").strip()
        if not body or body.startswith("."):
            continue
        words = body.split()
        if words[0].startswith("@"):
            words = words[1:]
        if not words:
            continue
        op = words[0]
        t = re.search(r"`\((\.L\w+)\)", body)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(Instr(addr, op, body, locs, t.group(1) if t and op.startswith("BRA") else None, inner,
                            tuple(chain)))
    return instrs, labels


def sass_loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """Address ranges [head, back-branch] of the loops: one per backward branch target, outermost end kept."""
    ends: dict[int, int] = {}
    for ins in instrs:
        # a branch to itself is the trap after EXIT, never executed
        if ins.target in labels and labels[ins.target] < ins.addr:
            head = labels[ins.target]
            ends[head] = max(ends.get(head, 0), ins.addr)
    return sorted(ends.items())


def match_loop(own: list[Instr], source_loops: list[SourceLoop], inner: list[SourceLoop] = (),
               back: Instr | None = None) -> SourceLoop | None:
    """The source loop of a SASS loop: the one whose `for` line its backward branch `back` carries at its innermost
    level (nvcc attributes a loop's compare and branch to its header). Failing that, among the source loops that are
    neither one of the source loops already matched to the SASS loops nested in it nor nested inside one of them,
    the innermost one whose lines carry at least half of the SASS loop's own instructions (those not in a nested
    SASS loop); the best-scoring one when none reaches half. Innermost: the shortest of each file's, then across
    files, among those that carry the most instructions, the one at the deepest inlining level (a helper's loop
    inlined in a kernel's loop carries every instruction the kernel's loop does; a helper's loop the compiler
    unrolled fully, fewer than its caller's)."""
    def within(a: SourceLoop, b: SourceLoop) -> bool:
        return a is b or (a.file == b.file and b.first <= a.first and a.last <= b.last)

    def level(sl: SourceLoop) -> float:
        """Mean inlining level (0: the code itself) at which the instructions carry sl's lines."""
        hits = [min((k for k, (f, n) in enumerate(ins.chain) if f == sl.file and sl.first <= n <= sl.last),
                    default=None) for ins in own]
        hits = [k for k in hits if k is not None]
        return sum(hits) / len(hits) if hits else 0.0

    if back is not None and back.chain:
        headed = [sl for sl in source_loops if (sl.file, sl.first) == back.chain[0]]
        if len(headed) == 1:
            return headed[0]
    scored, score_of = [], {}
    for sl in source_loops:
        if any(within(sl, i) for i in inner):
            continue
        score = sum(1 for ins in own if any(f == sl.file and sl.first <= n <= sl.last for f, n in ins.locs))
        if score:
            scored.append((score, sl))
            score_of[id(sl)] = score
    if not scored:
        return None
    half = [sl for score, sl in scored if score * 2 >= len(own)]
    if half:
        shortest = {}
        for sl in half:
            if sl.file not in shortest or sl.last - sl.first < shortest[sl.file].last - shortest[sl.file].first:
                shortest[sl.file] = sl
        most = max(score_of[id(sl)] for sl in shortest.values())
        return min((sl for sl in shortest.values() if score_of[id(sl)] == most), key=level)
    return max(scored, key=lambda p: p[0])[1]


# Global-memory instructions and their bytes per lane (access width in the opcode; 32 bits by default).
_GLOBAL_MEM = re.compile(r"^(LDG|STG|LDGSTS|RED|ATOM|ATOMG)(\.|$)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_SIMT_FLOPS = {"FFMA": 2, "FADD": 1, "FMUL": 1, "FMNMX": 1, "HFMA2": 4, "HADD2": 2, "HMUL2": 2, "FFMA2": 4,
               "FADD2": 2, "FMUL2": 2}


def _lane_bytes(op: str) -> int:
    width = 4
    for part in op.split(".")[1:]:
        width = _WIDTH.get(part, width)
    return width


def _mma_flops(op: str) -> tuple[str, str, int] | None:
    """(kind, operand type, FLOPs per warp-instruction) of an MMA opcode, None otherwise.

    HMMA.16816.F32.BF16: one warp, 2*16*8*16 FLOPs. HGMMA.64x32x16.F32.BF16: one warpgroup instruction issued by
    its 4 warps, 2*64*32*16 FLOPs, so a quarter per warp-instruction.
    """
    parts = op.split(".")
    kind = parts[0]
    if kind not in ("HMMA", "HGMMA"):
        return None
    dtype = {"BF16": "bf16", "F16": "f16", "TF32": "tf32"}.get(parts[-1], parts[-1].lower())
    if kind == "HMMA":
        m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4)}.get(parts[1], (16, 8, 8))
        return kind, dtype, 2 * m * n * k
    m, n, k = (int(v) for v in parts[1].split("x"))
    return kind, dtype, 2 * m * n * k // 4


@dataclass
class Role:
    """Programs that take one top-level branch of a two-role kernel: lines [first, last] of the kernel file."""
    file: str
    first: int
    last: int
    programs: int


def load_replication(ins: Instr, replication: dict[tuple[str, int], float]) -> float:
    """The replication (`ttgir_load_replication`) of the tl.load a global SASS access comes from, 1 if none.

    A Triton load is an inline-asm block: one `mov` per 32-bit register (of `other`, or of 0), then the ld.global,
    and LLVM numbers the lines of an inline-asm block consecutively from the op's own line. The access then carries
    its tl.load's line + up to its register count (3 or 4 for a 128-bit access) at the innermost level of its
    inlining chain (the call sites above keep their lines): when its own lines name no load, the nearest load line at
    most that far above its innermost line is taken (loads only: LDG, LDGSTS)."""
    hits = [replication[loc] for loc in ins.locs if loc in replication]
    if hits or ins.inner is None or not ins.op.startswith("LDG"):  # a store's block is one line: no shift
        return min(hits, default=1.0)
    f, n = ins.inner
    for shift in range(1, max(1, _lane_bytes(ins.op) // 4) + 1):
        if (f, n - shift) in replication:
            return replication[(f, n - shift)]
    return 1.0


def profile_sass(instrs, labels, source_loops, ctas: int, warps: int, roles: list[Role] = (),
                 kernel_span: tuple[str, int, int] | None = None, replication: dict | None = None,
                 scalar_code: bool = False, dead: tuple[set, set] | None = None) -> dict:
    """Dynamic counts of one launch: each instruction weighs programs (of its role) x warps x the trip counts of the
    SASS loops around it.

    Sibling SASS loops (same enclosing SASS loop) matched to the same source loop are either an unrolled main loop
    and its remainder(s) (u copies of the body, counted on memory instructions: each runs what is left of the
    trips // u) or, for a loop of the kernel's own body (kernel_span: file, first, last line), versions of it (nvcc
    unswitches runtime branches: activation, dropout, U present) of which one runs: each is charged trips / n.
    Loops of inlined helpers are not merged as versions (each call site is its own loop). dead = (untaken, taken)
    lines of a runtime switch's cases: instructions on untaken lines do not run, nor do SASS loops that contain
    untaken-case code but none of the taken case (the unswitched copies for other activations).

    Returns warp-instructions, MMA counts / FLOPs by kind, SIMT FLOPs, global bytes (lanes x access width /
    replication), the matched loops, notes on unmatched loops, and the spill instruction count (STL/LDL).
    """
    loops = sass_loops(instrs, labels)
    at = {i.addr: i for i in instrs}
    trip_of, notes, mapped, own_of = {}, [], {}, {}
    for head, end in sorted(loops, key=lambda he: he[1] - he[0]):  # innermost first
        inner = [(h, e) for h, e in loops if (h, e) != (head, end) and head <= h and e <= end]
        own = [i for i in instrs if head <= i.addr <= end and not any(h <= i.addr <= e for h, e in inner)]
        own_of[(head, end)] = own
        sl = match_loop(own, source_loops, [mapped[i] for i in inner if i in mapped], at.get(end))
        if sl is None or sl.trips is None:
            trip_of[(head, end)] = 1.0
            notes.append(f"loop @{head:#x}-{end:#x}: trip count unknown "
                         f"({'no source loop' if sl is None else sl.text}), counted once")
        else:
            trip_of[(head, end)] = max(float(sl.trips), 0.0)
            mapped[(head, end)] = sl
    def parent(he):
        outer = [o for o in loops if o != he and o[0] <= he[0] and he[1] <= o[1]]
        return min(outer, key=lambda o: o[1] - o[0]) if outer else None

    groups: dict = {}
    for he, sl in mapped.items():
        groups.setdefault((id(sl), parent(he)), []).append(he)
    unroll = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        # Instructions per source line: an unrolled copy repeats every line u times; unswitched versions share
        # their common lines once each and differ in a few (the activation's case, the dropout hash).
        # Copies of the source body in each member, counted on memory instructions per (opcode, source line) common
        # to all members (loop overhead is not repeated). Scalar CUDA code issues one instruction per access and
        # iteration, so the count is absolute (nvcc unrolls main loops by 16 and remainders by 4); a Triton tile
        # access is several instructions, so there the count is relative to the smallest member.
        def per_key(he):
            counts = {}
            for ins in own_of[he]:
                if re.match(r"(LD|ST)", ins.op):
                    for loc in ins.locs:
                        counts[(ins.op, loc)] = counts.get((ins.op, loc), 0) + 1
            return counts
        keyed = {he: per_key(he) for he in members}
        common = set.intersection(*(set(v) for v in keyed.values()))
        if common:
            copies = {he: min(keyed[he][k] for k in common) for he in members}
            if not scalar_code:
                unit = min(copies.values())
                copies = {he: max(1, round(c / unit)) for he, c in copies.items()}
        else:
            copies = {he: 1 for he in members}
        trips = trip_of[members[0]]
        if len(set(copies.values())) > 1:
            # an unrolled main loop and its remainder loop(s): each runs what is left // its copies (the same count
            # in every member is no unrolling: one helper loop per call site of an unrolled loop, each a whole
            # loop, where an access is several instructions, a tensor-core fragment load)
            left = trips
            for he in sorted(members, key=lambda m: -copies[m]):
                trip_of[he] = left // copies[he]
                left -= trip_of[he] * copies[he]
                unroll[he] = copies[he]
        elif kernel_span and all(mapped[he].file == kernel_span[0] and
                                 kernel_span[1] <= mapped[he].first <= kernel_span[2] for he in members):
            for he in members:  # unswitched versions of one loop of the kernel body: one of them runs
                trip_of[he] = trips / len(members)
    untaken, taken = dead if dead else (set(), set())
    for he in loops:
        locs = {loc for ins in instrs if he[0] <= ins.addr <= he[1] for loc in ins.locs}
        if locs & untaken and not locs & taken:
            trip_of[he] = 0.0
    detail = [f"{h:#x}-{e:#x} {Path(mapped[(h, e)].file).name}:{mapped[(h, e)].first} "
              f"{mapped[(h, e)].text} x{trip_of[(h, e)]:g}"
              + (f" (unrolled x{unroll[(h, e)]})" if unroll.get((h, e), 1) > 1 else "")
              for h, e in loops if (h, e) in mapped]
    out = {"warp_instructions": 0.0, "mma": {}, "tc_flops": {}, "simt_flops": 0.0, "global_bytes": 0.0,
           "spill_instructions": 0, "mma_instructions": 0.0, "loops": detail, "notes": notes}
    role_of_prev = None
    for ins in instrs:
        mult = float(warps)
        for (head, end), trips in trip_of.items():
            if head <= ins.addr <= end:
                mult *= trips
        role = None
        for r in roles:
            if any(f == r.file and r.first <= n <= r.last for f, n in ins.locs):
                role = r
        if role is None and not ins.locs:
            role = role_of_prev
        role_of_prev = role
        mult *= role.programs if role is not None else ctas
        if untaken and any(loc in untaken for loc in ins.locs):
            mult = 0.0
        out["warp_instructions"] += mult
        base = ins.op.split(".")[0]
        mma = _mma_flops(ins.op)
        if mma:
            kind, dtype, flops = mma
            key = f"{kind}.{dtype}"
            out["mma"][key] = out["mma"].get(key, 0) + 1
            out["tc_flops"][key] = out["tc_flops"].get(key, 0.0) + mult * flops
            out["mma_instructions"] += mult
        elif base in _SIMT_FLOPS:
            out["simt_flops"] += mult * 32 * _SIMT_FLOPS[base]
        if _GLOBAL_MEM.match(ins.op):
            rep = load_replication(ins, replication) if replication else 1.0
            out["global_bytes"] += mult * 32 * _lane_bytes(ins.op) / rep
        if base in ("STL", "LDL"):
            out["spill_instructions"] += 1
    return out


def occupancy(regs: int, shared: int, warps: int) -> dict:
    """Resident CTAs and warps per SM from registers (allocated per warp in units of 256), shared memory (plus the
    1 KB the runtime reserves per CTA) and the 64-warp / 32-CTA limits."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    ctas = max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "occupancy": ctas * warps / MAX_WARPS_PER_SM}


def time_model(hbm: float, l2: float, tc_flops: dict, simt: float, warp_instr: float, ctas: int, warps: int,
               resident_ctas_per_sm: int) -> dict:
    """Lower bound and central time (s) of one launch; see the module docstring."""
    terms = {"hbm": hbm / HBM_BPS, "l2": l2 / L2_BPS,
             "tensor": sum(f / TC_PEAK.get(tuple(k.split(".")), 250e12) for k, f in tc_flops.items()),
             "simt": simt / SIMT_FLOPS, "issue": warp_instr / (SMS * SCHEDULERS * CLOCK_HZ)}
    fill = min(1.0, ctas / SMS) if ctas else 1.0
    lower = max(terms.values()) / fill
    resident = min(resident_ctas_per_sm, math.ceil(ctas / SMS)) * warps
    factor = CENTRAL_LOW_OCC if resident <= 8 else CENTRAL_HIGH_OCC
    return {"lower_s": lower, "central_s": factor * lower + LAUNCH_S, "bound_by": max(terms, key=terms.get),
            "central_factor": factor, "resident_warps_per_sm": resident, "terms_s": terms}


# -------------------------------------------------------------------------------------------------- Triton
class _TlShim:
    """Enough of triton.language to evaluate a kernel's index arithmetic on the host, program ids as numpy ranges."""

    def __init__(self, grid):
        self.grid = grid

    def program_id(self, axis):
        import numpy as np
        shape = [1, 1, 1]
        shape[axis] = self.grid[axis]
        return np.arange(self.grid[axis]).reshape(shape)

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    @staticmethod
    def minimum(a, b):
        import numpy as np
        return np.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        import numpy as np
        return np.maximum(a, b)

    @staticmethod
    def cast(x, *_):
        return x

    int32 = int64 = float32 = None


def _eval(node, path, scope, grid):
    return eval(compile(ast.Expression(node), path, "eval"), {"tl": _TlShim(grid), "__builtins__": {}}, scope)


def _kernel_scope(fn, env: dict, grid: tuple) -> dict:
    """The kernel's arguments plus every local `name = expr` that evaluates on the host (program ids as numpy
    ranges over the grid, so pid-dependent values are arrays over the programs); loads and loop-carried values fail
    to evaluate and are skipped."""
    path = fn.fn.__code__.co_filename
    tree = ast.parse(Path(path).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn.__name__)
    scope = dict(env)

    def visit(body):
        for stmt in body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                try:
                    scope[stmt.targets[0].id] = _eval(stmt.value, path, scope, grid)
                except Exception:
                    pass
            elif isinstance(stmt, ast.If):
                visit(stmt.body)
                visit(stmt.orelse)
    visit(node.body)
    return scope


def _trips(start, stop, step):
    """Mean trip count over the programs (bounds may be numpy arrays over the grid)."""
    import numpy as np
    n = np.maximum(0, -(-(np.asarray(stop) - np.asarray(start)) // np.asarray(step)))
    return float(np.mean(n))


def _python_loops(path: str, scope: dict, grid: tuple) -> list[SourceLoop]:
    """Every `for ... in range(...)` / `tl.range(...)` of a Python file with its mean trip count (static_range is
    unrolled at compile time and leaves no SASS loop)."""
    tree = ast.parse(Path(path).read_text())
    loops = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.For) or not isinstance(node.iter, ast.Call):
            continue
        if ast.unparse(node.iter.func) not in ("range", "tl.range"):
            continue
        trips = None
        try:
            args = [_eval(a, path, dict(scope), grid) for a in node.iter.args[:3]]
            if len(args) == 1:
                start, stop, step = 0, args[0], 1
            else:
                start, stop, step = args[0], args[1], args[2] if len(args) > 2 else 1
            trips = _trips(start, stop, step)
        except Exception:
            pass
        loops.append(SourceLoop(path, node.lineno, node.end_lineno, trips, ast.unparse(node.iter)))
    return loops


def _triton_roles(fn, scope: dict, grid: tuple) -> list[Role]:
    """Top-level `if <condition on program ids>:` branches of a kernel and how many programs take each side."""
    import numpy as np
    path = fn.fn.__code__.co_filename
    tree = ast.parse(Path(path).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn.__name__)
    roles, total = [], math.prod(grid)
    for stmt in node.body:
        if not isinstance(stmt, ast.If):
            continue
        try:
            cond = _eval(stmt.test, path, dict(scope), grid)
        except Exception:
            continue
        if not isinstance(cond, np.ndarray):
            continue
        hit = int(np.count_nonzero(np.broadcast_to(cond, grid)))
        roles.append(Role(path, stmt.body[0].lineno, stmt.body[-1].end_lineno, hit))
        if stmt.orelse:
            roles.append(Role(path, stmt.orelse[0].lineno, stmt.orelse[-1].end_lineno, total - hit))
    return roles


class _Sm90Driver:
    """Built lazily (imports triton): a CudaDriver that reports an sm_90 device and never touches a GPU."""

    @staticmethod
    def make():
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaDriver

        class Sm90Driver(CudaDriver):
            def __init__(self):  # no CudaUtils: it would load libcuda
                pass

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_device_capability(self, device=None):
                return (9, 0)

            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        return Sm90Driver()


@dataclass
class Launch:
    op: str
    fn: object          # JITFunction
    kernel: object      # CompiledKernel
    grid: tuple
    env: dict           # int / float / constexpr arguments by name
    tensors: dict       # argument name -> (storage key, bytes)


@functools.lru_cache(maxsize=None)
def _private_triton_cache() -> tempfile.TemporaryDirectory:
    """This process's Triton cache: a kernel cached from another checkout has the same hash but that checkout's
    line info (file paths and line numbers), which the loop matching reads."""
    return tempfile.TemporaryDirectory(prefix="sm90_cost_triton_")


@contextlib.contextmanager
def sm90_compile_only():
    """Within: every Triton launch compiles for sm_90 (no GPU) and is recorded, not run. Yields the record list."""
    import triton
    from triton.runtime.jit import JITFunction
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90_cost compiles kernels: run it without TRITON_INTERPRET=1 (a fresh process)")
    records: list[Launch] = []
    op_name = ["?"]
    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = _private_triton_cache().name
    previous = triton.runtime.driver._active  # not .active: that would look for a real GPU driver
    triton.runtime.driver.set_active(_Sm90Driver.make())
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
        env, tensors = {}, {}
        for name, value in bound.items():
            if hasattr(value, "untyped_storage") or hasattr(value, "data_ptr"):
                base = value if getattr(value, "_base", None) is None else value._base
                tensors[name] = (id(base), base.numel() * base.element_size())
            elif isinstance(value, (bool, int, float, str)):
                env[name] = value
        records.append(Launch(op_name[0], self, kernel, g, env, tensors))
        return kernel

    JITFunction.run = run
    try:
        yield records, op_name
    finally:
        JITFunction.run = original
        triton.runtime.driver._active = previous
        if saved_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache


def triton_pipeline(shape: Shape, act: str = "silu"):
    """Run the Triton launchers of one MoE FFN forward and backward (the op sequence of mixlora/moe.py and the ops'
    autograd: router_logits first, its backward last, from route_backward's logits gradient) on meta tensors under
    `sm90_compile_only`; returns the recorded launches. The router weight is fp32 (E, H), as in the model."""
    import torch

    from mixlora_kernels.triton import KERNELS
    T, H, I, E, K, R, p = shape.T, shape.H, shape.I, shape.E, shape.K, shape.R, shape.dropout
    bf16, f32 = torch.bfloat16, torch.float32

    def new(*size, dtype=bf16):
        return torch.empty(*size, dtype=dtype, device="meta")

    x, w_router = new(T, H), new(E, H, dtype=f32)
    G, U = new(T, I), new(T, I)
    A_in, Bg, Bu, Ad, Bd = new(E, 2 * R, H), new(E, I, R), new(E, I, R), new(E, R, I), new(E, H, R)
    scale = 2.0  # lora_alpha / R; the value does not change the code
    with sm90_compile_only() as (records, op):
        op[0] = "router_logits"
        logits = KERNELS["router_logits"](x, w_router)
        op[0] = "route"
        weights, experts = KERNELS["route"](logits, K)
        op[0] = "sort_slots"
        order, offsets = KERNELS["sort_slots"](experts, E)
        op[0] = "lora_shrink"
        z = KERNELS["lora_shrink"](x, A_in, experts, order, offsets, p, 1234)
        zg, zu = z.split([R, R], dim=1)
        op[0] = "expand_act_combine"
        hbar, zd = KERNELS["expand_act_combine"](G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, scale,
                                                 act, p, 5678)
        op[0] = "lora_expand_combine"
        KERNELS["lora_expand_combine"](zd, Bd, weights, experts, order, offsets, scale)
        # backward: grad of the fp32 down delta, of hbar (from the dense dgrad) and of the routing weights
        op[0] = "lora_expand_combine_backward"
        dzd, _, dw1 = KERNELS["lora_expand_combine_backward"](new(T, H, dtype=f32), zd, Bd, weights, experts, order,
                                                              offsets, scale)
        op[0] = "expand_act_combine_backward"
        grads = KERNELS["expand_act_combine_backward"](new(T, I), dzd, G, U, zg, Bg, zu, Bu, weights, experts, order,
                                                       offsets, Ad, scale, act, p, 5678)
        dzg, dzu = grads[2], grads[4]
        op[0] = "lora_shrink_backward"
        KERNELS["lora_shrink_backward"](torch.cat([dzg, dzu], dim=1), x, A_in, experts, order, offsets, p, 1234)
        op[0] = "route_backward"
        dlogits = KERNELS["route_backward"](new(T, K, dtype=f32), weights, experts, E)
        op[0] = "router_logits_backward"
        KERNELS["router_logits_backward"](dlogits, x, w_router)
    return records


def ttir_dots(ttir: str) -> list[dict]:
    """Every `tt.dot` of a kernel: operand element types and input precision (tf32x3 = 3 MMAs + split code)."""
    dots = []
    for line in ttir.splitlines():
        if "tt.dot " not in line:
            continue
        types = re.findall(r"tensor<([\dx]+)x(\w+)>", line)
        prec = re.search(r"inputPrecision = (\w+)", line)
        dots.append({"a": types[0][1] if types else "?", "b": types[1][1] if len(types) > 1 else "?",
                     "shape": [types[0][0], types[1][0]] if len(types) > 1 else [],
                     # inputPrecision only applies to fp32 operands; 16-bit dots are plain bf16/f16 MMAs
                     "precision": (prec.group(1) if prec else "tf32") if types and types[0][1] == "f32"
                     else (types[0][1] if types else "-")})
    return dots


def ttgir_load_replication(ttgir: str) -> dict[tuple[str, int], float]:
    """(file, line) of every global load in the TTGIR -> how many threads load each element: a blocked layout whose
    lanes x warps x sizePerThread cover more than the tensor (a (32,) row-id vector in a 4-warp program, a slice
    layout's removed dimension) has every element loaded by several lanes, which the L1 serves. Used to count the
    L2 bytes of a SASS load as its lanes' bytes / replication. A pointer tensor broadcast along a dimension
    (`tt.broadcast` of a size-1 dimension: a row of W loaded straight into a (rows, columns) tile) has every address
    loaded by all the threads along that dimension."""
    layouts = {}
    for m in re.finditer(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                         r"warpsPerCTA = \[([\d, ]+)\]", ttgir, re.M):
        layouts[m.group(1)] = [[int(v) for v in g.split(",")] for g in m.groups()[1:]]
    locs = {m.group(1): m.group(2) for m in re.finditer(r"^(#loc\d*) = loc\((.*)\)\s*$", ttgir, re.M)}

    def innermost(ref: str, depth: int = 0):
        text = locs.get(ref, "")
        direct = re.match(r'"([^"]+)":(\d+)', text)
        if direct:
            return direct.group(1), int(direct.group(2))
        inner = re.findall(r"#loc\d*", text)
        return innermost(inner[0], depth + 1) if inner and depth < 20 else None

    broadcast = {m.group(1): [int(v) for v in m.group(2).split("x")] for m in re.finditer(
        r"^\s*(%[\w.]+) = tt\.broadcast %[\w.]+ : tensor<([\dx]+)x!tt\.ptr<", ttgir, re.M)}
    out: dict = {}
    for m in re.finditer(r"(?:tt\.load|ttg\.async_copy_global_to_local) (%[\w.]+).*?: tensor<([\dx]+)x!tt\.ptr<\w+>, "
                         r"(#\w+|#ttg\.slice<\{dim = (\d+), parent = (#\w+)\}>)>.*?loc\((#loc\d*)\)", ttgir):
        shape = [int(v) for v in m.group(2).split("x")]
        sliced, name = (int(m.group(4)), m.group(5)) if m.group(4) else (None, m.group(3))
        if name not in layouts:
            continue
        spt, tpw, wpc = layouts[name]
        source = broadcast.get(m.group(1)) if sliced is None else None
        rep, k = 1.0, 0
        for d in range(len(spt)):
            if d == sliced or (source and source[d] == 1 < shape[d]):
                rep *= tpw[d] * wpc[d]
                k += d != sliced
                continue
            rep *= max(1.0, spt[d] * tpw[d] * wpc[d] / shape[k])
            k += 1
        where = innermost(m.group(6))
        if where:
            out[where] = min(out.get(where, rep), rep)
    return out


def ptx_mma_types(ptx: str) -> dict[str, int]:
    """Static count of PTX MMA instructions by kind and operand type: {"wgmma.bf16": 4, "mma.sync.tf32": 12}."""
    out: dict[str, int] = {}
    for m in re.finditer(r"\b(wgmma\.mma_async|mma\.sync)\S*?\.(bf16|f16|tf32)\b", ptx):
        key = f"{m.group(1).split('.')[0]}.{m.group(2)}"
        out[key] = out.get(key, 0) + 1
    return out


@functools.lru_cache(maxsize=None)
def _triton_static(kernel_hash: str, cubin: bytes, name: str):
    text = disassemble(cubin)
    res = resource_usage(cubin).get(name, {})
    return parse_sass(text), res


def inspect_source(fn) -> list[str]:
    import inspect
    return inspect.getsourcelines(fn.fn)[0]


def analyse_triton(launch: Launch, shape: Shape) -> dict:
    k, fn = launch.kernel, launch.fn
    md = k.metadata
    (instrs, labels), res = _triton_static(md.hash, k.asm["cubin"], md.name)
    files = {i_file for ins in instrs for i_file, _ in ins.locs if i_file.startswith(str(ROOT))}
    env = dict(launch.env)
    # Data-dependent bounds at balanced routing: an expert's segment of the sorted slots is [0, S / E).
    env.update(start=0, end=shape.S // shape.E)
    scope = _kernel_scope(fn, env, launch.grid)
    source_loops = [sl for f in sorted(files) for sl in _python_loops(f, scope, launch.grid)]
    roles = _triton_roles(fn, scope, launch.grid)
    ctas = math.prod(launch.grid)
    span = (fn.fn.__code__.co_filename, fn.fn.__code__.co_firstlineno,
            fn.fn.__code__.co_firstlineno + len(inspect_source(fn)) - 1)
    prof = profile_sass(instrs, labels, source_loops, ctas, md.num_warps, roles, span,
                        ttgir_load_replication(k.asm["ttgir"]))
    regs, shared = res.get("REG", 0), md.shared
    occ = occupancy(regs, shared, md.num_warps)
    hbm = float(sum(b for _, b in {key: (key, b) for key, b in launch.tensors.values()}.values()))
    dots = ttir_dots(k.asm["ttir"])
    return _record("triton", launch.op, md.name, shape, regs, res.get("STACK", 0), prof, shared, occ, md.num_warps,
                   launch.grid, hbm, ptx_mma_types(k.asm["ptx"]), dots,
                   {"num_stages": md.num_stages, **{n: v for n, v in launch.env.items() if n.isupper()}})


def _record(backend, op, name, shape, regs, stack, prof, shared, occ, warps, grid, hbm, ptx_mma, dots, config):
    ctas = math.prod(grid)
    l2 = max(0.0, prof["global_bytes"] - hbm)
    t = time_model(hbm, l2, prof["tc_flops"], prof["simt_flops"], prof["warp_instructions"], ctas, warps,
                   occ["ctas_per_sm"])
    return {"backend": backend, "op": op, "name": name, "T": shape.T, "dropout": shape.dropout,
            "regs": regs, "stack_bytes": stack, "spills": prof["spill_instructions"], "shared_bytes": shared,
            "warps": warps, "grid": list(grid), "occupancy": round(occ["occupancy"], 4),
            "warps_per_sm": occ["warps_per_sm"],
            "mma": {"sass": prof["mma"], "ptx": ptx_mma, "dots": dots},
            "hbm_bytes": hbm, "l2_bytes": l2,
            "flops": {"tensor": prof["tc_flops"], "simt": prof["simt_flops"]},
            "warp_instructions": prof["warp_instructions"],
            "mma_instruction_share": prof["mma_instructions"] / max(prof["warp_instructions"], 1.0),
            "lower_ms": t["lower_s"] * 1e3, "central_ms": t["central_s"] * 1e3, "bound_by": t["bound_by"],
            "terms_ms": {k: v * 1e3 for k, v in t["terms_s"].items()}, "config": config,
            "loops": prof["loops"], "notes": prof["notes"]}


# Ops whose kernels must be exact fp32 (the router: its weight stays fp32, no tf32 or bf16 rounding of it): SIMT FMA
# only, no `tt.dot` and no MMA at all, also in a bf16 model.
EXACT_FP32_OPS = ("router_logits", "router_logits_backward")


def rule_violations(shape: Shape) -> list[str]:
    """What the CPU test guards, for the Triton kernels the pipeline launches at `shape` (bf16 model):
    "spills:<kernel>" when its SASS has local-memory spill instructions (STL/LDL) or a stack frame;
    "non-bf16-dot:<kernel>" when a `tt.dot` has a non-bf16 operand (fp32 tf32/tf32x3/ieee) or the SASS has a
    non-bf16 MMA; and, the stated exception for the router (`EXACT_FP32_OPS`: the bf16-MMA rule does not apply, it
    must not multiply on tensor cores at all), "inexact-router:<kernel>" when one of its kernels has any `tt.dot`
    (Triton may turn a broadcast multiply + sum into one) or any MMA. Compiles only: no SASS profile, no cost model."""
    out = set()
    for launch in triton_pipeline(shape):
        md = launch.kernel.metadata
        (instrs, _), res = _triton_static(md.hash, launch.kernel.asm["cubin"], md.name)
        if res.get("STACK", 0) or any(i.op.split(".")[0] in ("STL", "LDL") for i in instrs):
            out.add(f"spills:{md.name}")
        dots = ttir_dots(launch.kernel.asm["ttir"])
        mmas = {m[1] for m in (_mma_flops(i.op) for i in instrs) if m}
        if launch.op in EXACT_FP32_OPS:
            if dots or mmas:
                out.add(f"inexact-router:{md.name}")
        elif any(d["a"] != "bf16" or d["b"] != "bf16" for d in dots) or mmas - {"bf16"}:
            out.add(f"non-bf16-dot:{md.name}")
    return sorted(out)


def triton_records(shape: Shape) -> list[dict]:
    return [analyse_triton(launch, shape) for launch in triton_pipeline(shape)] + triton_model_only_records(shape)


def triton_model_only_records(shape: Shape) -> list[dict]:
    """What the Triton path runs beyond its kernels, modelled at HBM bandwidth: the expand_act_combine launchers'
    layout copies of Bg, Bu and Ad into the all-expert slab (`_slab_weights`: one permuted copy each, read + write,
    in the forward and again in the backward)."""
    b = float(3 * shape.E * shape.I * shape.R * 2 * 2)
    return [_model_only("triton", op, "LoRA weight slab layout copies (torch, _slab_weights)", shape, b, b / HBM_BPS,
                        launches=3) for op in ("expand_act_combine", "expand_act_combine_backward")]


# ---------------------------------------------------------------------------------------------------- CUDA
def nvcc_flags() -> list[str]:
    """setup.py's nvcc flags for sm_90 plus what torch's BuildExtension adds, device code only (-cubin)."""
    import torch
    from torch.utils import cpp_extension
    inc = Path(torch.__file__).parent / "include"
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return ["-cubin", "-O3", "-lineinfo", "-arch=sm_90", "-Xptxas", "-v", "-std=c++20",
            *cpp_extension.COMMON_NVCC_FLAGS, f"-I{ROOT / 'csrc'}", f"-I{inc}",
            f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_home}/include"]


@functools.lru_cache(maxsize=None)
def compile_cu(path: str) -> tuple[bytes, str, str]:
    """(cubin, ptxas -v log, ptx) of one .cu for sm_90; compiled once per process."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.cubin")
        log = _run([nvcc, *nvcc_flags(), "-keep", "-keep-dir", tmp, "-o", out, path])
        ptx = "".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
        return Path(out).read_bytes(), log, ptx


def ptxas_info(log: str) -> dict[str, dict[str, int]]:
    """Mangled function -> {regs, spill_stores, spill_loads, smem, stack} from `-Xptxas -v`."""
    out, fn = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            fn = m.group(1)
            out.setdefault(fn, {})
        if fn is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[fn].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[fn]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[fn]["smem"] = int(s.group(1)) if s else 0
    return out


def _c_eval(expr: str, env: dict, threads: int):
    """A C expression of loop bounds in Python: casts dropped, p.X -> X, L.X -> L_X (the layout structs' fields),
    thread / block index 0 (thread 0's trip count stands for all), blockDim.x the block size, gridDim.x the
    launch's `grid_x`, one level of `c ? a : b`."""
    e = re.sub(r"static_cast<[^>]*>", "", expr)
    e = e.replace("p.", "").replace("L.", "L_").replace("threadIdx.x", "0").replace("blockDim.x", str(threads))
    e = e.replace("blockIdx.x", "0").replace("blockIdx.y", "0").replace("gridDim.x", "grid_x")
    if "?" in e:
        cond, rest = e.split("?", 1)
        a, b = rest.split(":", 1)
        e = f"(({a}) if ({cond}) else ({b}))"
    e = re.sub(r"\btid\b", "0", e).replace("&&", " and ").replace("||", " or ")
    e = re.sub(r"(?<![/])/(?![/])", "//", e)
    return eval(e, {"__builtins__": {}}, env)


def _cpp_constants(text: str, env: dict, threads: int) -> dict:
    """`constexpr int kX = ...;` and `const int64_t X = ...;` definitions, evaluated in order where possible."""
    out = dict(env)
    for m in re.finditer(r"(?:constexpr|const)\s+(?:int|int64_t|size_t|unsigned int)\s+(\w+)\s*=\s*([^;{]+);", text):
        try:
            out.setdefault(m.group(1), _c_eval(m.group(2), out, threads))
        except Exception:
            pass
    return out


def _cpp_loops(path: str, text: str, env: dict, threads: int, span: tuple[int, int] | None = None) -> list[SourceLoop]:
    """`for (init; v < bound; step)` loops of a C++ file (within line span if given) with per-thread trip counts."""
    loops, lines = [], text.splitlines()
    local = _cpp_constants("\n".join(lines[span[0] - 1:span[1]]) if span else text, env, threads)
    for m in re.finditer(r"for\s*\(([^;]*);([^;]*);((?:[^()]|\([^()]*\))*)\)", text):
        first = text.count("\n", 0, m.start()) + 1
        if span and not span[0] <= first <= span[1]:
            continue
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        if before == "#pragma unroll":  # fully unrolled: leaves no SASS loop
            continue
        # the body: up to the matching brace, or the next statement
        i = m.end()
        while i < len(text) and text[i] in " \t\n":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
        else:
            j = text.find(";", i)
        last = text.count("\n", 0, j) + 1
        trips = None
        try:
            init, cond, step = (s.strip() for s in m.groups())
            start = _c_eval(init.split("=", 1)[1], local, threads)
            cm = re.match(r"\w+\s*(<|>)\s*(.+)", cond)
            if "<<=" in step or ">>=" in step:
                trips = max(1.0, math.log2(max(start, 1)) + 1)
            elif cm and cm.group(1) == "<":
                stop = _c_eval(cm.group(2), local, threads)
                inc = 1 if "++" in step else _c_eval(step.split("+=", 1)[1], local, threads)
                trips = max(0.0, math.ceil((stop - start) / inc))
        except Exception:
            trips = None
        loops.append(SourceLoop(path, first, last, trips, m.group(0)))
    return loops


def switch_case_lines(path: str, taken: str = "kSilu") -> tuple[set, set]:
    """(file, line) of the `case` bodies of every `switch (act)` in a CUDA file other than the taken activation
    (the pipeline runs SiLU, LLaMA's): the activation is a runtime argument of the CUDA kernels, so nvcc compiles
    every case, and unswitches some loops into one copy per case; only the taken one runs. Returns (untaken,
    taken) line sets."""
    lines = Path(path).read_text().splitlines()
    dead, taken_lines, inside, live = set(), set(), False, True
    for n, line in enumerate(lines, 1):
        if re.search(r"switch\s*\(act\)", line):
            inside, live = True, True
            continue
        if not inside:
            continue
        m = re.match(r"\s*(case (\w+)|default)\s*:", line)
        if m:
            live = m.group(2) == taken
        elif re.match(r"^  \}", line):  # the switch's closing brace (2-space indent in this code base)
            inside = False
            continue
        (taken_lines if live else dead).add((path, n))
    return dead, taken_lines


def _kernel_span(text: str, name: str) -> tuple[int, int] | None:
    m = re.search(r"__global__[^{;]*?\b" + re.escape(name) + r"\s*\(", text)
    if not m:
        return None
    i = text.find("{", m.end())
    depth, j = 0, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            break
        j += 1
    return text.count("\n", 0, m.start()) + 1, text.count("\n", 0, j) + 1


def _in_kernel(text: str, line: int):
    """Yields once if `line` is inside some __global__ function of text (its loops belong to that kernel only)."""
    for m in re.finditer(r"__global__[^{;]*?\b(\w+)\s*\(", text):
        span = _kernel_span(text, m.group(1))
        if span and span[0] <= line <= span[1]:
            yield True
            return


@dataclass
class CudaLaunch:
    """One CUDA kernel launch of an op: grid from the shape (transcribed from csrc/<op>/<op>.cu's *_launch
    function), threads per block, compulsory HBM bytes (formula, documented), dynamic shared memory bytes, the
    values of the kernel's parameters its loop bounds use (with those of the common.cuh helpers it calls: N of
    block_sum = the pass width, 32 here; nk of tile_fma = the chunk it is called with; num_experts; ne, Rp of the
    slab loaders = the experts per slab and the padded rank), the template instantiation the bf16 model launches
    (`instance`: its template arguments as c++filt writes them, "<float, c10::BFloat16>", "<1>"; "" for a kernel
    that is no template; a str or Shape -> str) and whether the launch happens at a shape (`when`)."""
    op: str
    file: str
    kernel: str
    grid: object            # Shape -> tuple
    hbm: object             # Shape -> bytes
    threads: int = 256      # common.cuh kBlock
    dyn_smem: object = lambda s: 0
    params: object = lambda s: {}
    instance: object = ""   # str or Shape -> str
    when: object = lambda s: True

    def instance_at(self, shape: Shape) -> str:
        return self.instance(shape) if callable(self.instance) else self.instance


def _round16(v: int) -> int:
    return -(-v // 16) * 16


def _rank_frags(s: Shape) -> int:
    """dispatch_rank_frags (csrc/expand_act_combine/expand_act_combine_kernels.cuh): the NF instantiation of the
    tensor-core kernels for the largest of the gate / up / down ranks (all R here)."""
    return 1 if s.R <= 16 else 2 if s.R <= 32 else 4


def _wg_layout_bytes(s: Shape) -> int:
    """make_wg_layout(R, R, R).bytes (expand_act_combine_kernels.cuh): the dynamic shared memory of
    eac_bwd_weight_mma_kernel (kWgSlots = 64 slots per chunk, kMmaCols = 64 columns, rows padded by 8 bf16)."""
    rp = _round16(min(s.R, 4096))
    tile = 64 * 72 * 2
    sizes = [64 * 4, 64 * 4, 64 * 4, 64 * (3 * rp + 8) * 2, 64 * (rp + 8) * 2, 64 * (rp + 8) * 2, rp * 72 * 2,
             tile, tile, tile, 3 * tile]
    return sum(-(-b // 128) * 128 for b in sizes)


def _tile_layout_bytes(s: Shape, backward: bool) -> int:
    """make_tile_layout(K, E, R, R, R, backward).bytes (expand_act_combine_kernels.cuh): the dynamic shared memory
    of eac_fwd_mma_kernel / eac_bwd_mma_kernel (128 slot rows, 64 columns, slab rows padded by 8 bf16; backward: dzd
    in the rank rows and the dH-bar rows; the rank rows' space reused for the chunk's fp32 slot rows; the sort's keys
    and permutation), every array rounded up to 128 bytes."""
    kp = 1 << max(0, (s.K - 1).bit_length())
    bt = 128 // kp if kp <= 8 else 0
    rp = _round16(min(s.R, 4096))
    rows = [bt * 72 * 2] * (3 if backward else 2)
    z_or_comb = max(128 * ((3 if backward else 2) * rp + 8) * 2, (2 if backward else 1) * 128 * 16 * 4)
    sizes = [s.E * 64 * (rp + 8) * 2, s.E * 64 * (rp + 8) * 2, s.E * rp * 72 * 2, *rows, z_or_comb, 8 * 16 * 4,
             3 * 128 * 4]
    return sum(-(-b // 128) * 128 for b in sizes)


def _tile(s: Shape, backward: bool) -> dict:
    """Launch values of eac_fwd_mma_kernel / eac_bwd_mma_kernel: TileLayout (KP = K rounded up to a power of two,
    BT = 128 / KP tokens per tile, t1 = BT of them present: whole tiles), the I splits (mma_splits) and a split's
    steps [first, last), the 16-column chunks per step (nch), and the experts present per warp (nex; the rows are
    sorted by expert): one plus the expected expert boundaries among a warp's 15 gaps when the block's 128 rows hold
    min(E, 128) experts."""
    kp = 1 << max(0, (s.K - 1).bit_length())
    bt = 128 // kp
    tiles = -(-s.T // bt)
    steps = -(-s.I // 64)
    splits = max(1, min(-(-2 * 132 // tiles), 16, steps))
    rp = _round16(s.R)
    nex = 1 + 15 * (min(s.E, 128) - 1) / 127
    return dict(NF=_rank_frags(s), L_KP=kp, L_BT=bt, L_E=s.E, L_Rgp=rp, L_Rup=rp, L_Rdp=rp,
                Rz=(3 if backward else 2) * rp, nex=nex, BT=bt, t1=bt, ne=s.E, Rp=rp, grid_x=splits, tiles=tiles,
                first=0, last=-(-steps // splits), nch=4, T=s.T, I=s.I, K=s.K, E=s.E, Rg=s.R, Ru=s.R, Rd=s.R)


def mma_path(s: Shape) -> bool:
    """use_mma / mma_fits (expand_act_combine.cu, _kernels.cuh) for a bf16 model with bf16 weights: whether
    expand_act_combine runs its tensor-core kernels (CUDA_LAUNCHES) rather than the SIMT ones
    (CUDA_NOT_IN_PIPELINE)."""
    limit = 227 * 1024
    return (s.R <= 64 and s.K <= 8 and s.E <= 4096 and _tile_layout_bytes(s, False) <= limit
            and _tile_layout_bytes(s, True) <= limit and _wg_layout_bytes(s) <= limit)


def _wg(s: Shape) -> dict:
    """Launch values of eac_bwd_weight_mma_kernel: WgLayout's padded ranks, one expert per slab (ne 1), its
    expert's slots [start, end) at balanced routing (set by analyse_cuda)."""
    rp = _round16(s.R)
    return dict(NF=_rank_frags(s), L_Rgp=rp, L_Rup=rp, L_Rdp=rp, T=s.T, I=s.I, K=s.K, E=s.E, Rg=s.R, Ru=s.R,
                Rd=s.R, H=s.H, N=32, num_experts=s.E, ne=1, Rp=rp)


def _split_sum_blocks(n: int) -> int:
    return max(1, min(1024, -(-n // 256)))


def _lora_tile_smem(planes: int, words: int) -> int:
    """lora_tile_smem_bytes (csrc/lora_tiles.cuh): `planes` bf16 planes of 64 x 72 (or the 64 x 68 fp32 stage
    laid over them, if larger), then `words` 32-bit words."""
    return max(planes * 64 * 72 * 2, 64 * 68 * 4) + 4 * words


def _gshift(nrows: int) -> int:
    """stage_weight_rows' gshift (lora_tiles.cuh): log2 of the threads per column, at least nrows / 8."""
    return 1 if nrows <= 16 else 2 if nrows <= 32 else 3


def _slot_rank(s: Shape, R: int, rank_tiles: int) -> dict:
    """Loop bounds of slot_rank_mma_kernel (lora_tiles.cuh) for rank R: the rank loop's step (gridDim.y tiles of
    64), a tile's rank columns and the weight rows staged for them, the k steps of a 64-deep chunk,
    find_segment_tile's experts."""
    nrows = _round16(min(64, R))
    return dict(H=s.H, R=R, K=s.K, E=s.E, S=s.S, num_experts=s.E, rank_step=64 * rank_tiles, ncols=min(64, R),
                nrows=nrows, gshift=_gshift(nrows), steps=4)


def _token_fold_plan(s: Shape, R: int, passes: int, nw: int = 1) -> dict:
    """plan_token_fold (csrc/lora_tiles.cuh) for rank R, `passes` passes, NW weight planes and NV = 1 fold plane
    (bf16 weights and products, kTerms): the whole fold
    (fold_rows = E R rounded up to 64, one copy per pass) when TokenFoldSmem fits in 227 KiB, with h_tiles column
    tiles per block (up to 8, about two blocks per SM of 132); else 64 fold columns, one column tile per block."""
    rows = -(-s.E * R // 64) * 64

    def smem(fold_rows, slots):
        fold = -(-(slots * 64 * (fold_rows + 8) * 2) // 128) * 128  # the rank vectors rounded to bf16: 1 plane
        return fold + max(nw * 64 * 72 * 2, 64 * 68 * 4) + 4 * (3 * fold_rows + 64 * s.K)

    if rows <= 4096 and smem(rows, passes) <= 227 * 1024:
        tiles = -(-s.H // 64) * -(-s.T // 64)
        return dict(fold_rows=rows, h_tiles=max(1, min(8, tiles // (2 * SMS))), whole=True, smem=smem(rows, passes))
    return dict(fold_rows=64, h_tiles=1, whole=False, smem=smem(64, 2 if passes > 1 else 1))


def _token_fold(s: Shape, R: int, passes: int) -> dict:
    """Loop bounds of token_fold_mma_kernel: the fold's E * R columns, held FG at a time (all of them when whole), one
    pass per slot k with dropout (else 1), h_tiles column tiles per block."""
    plan = _token_fold_plan(s, R, passes)
    F, FG = s.E * R, plan["fold_rows"]
    nrows = _round16(min(64, F))
    return dict(H=s.H, R=R, K=s.K, E=s.E, T=s.T, F=F, FG=FG, gn=min(F, FG), h_tiles=plan["h_tiles"], passes=passes,
                nrows=nrows, gshift=_gshift(nrows), steps=4)


def _passes(s: Shape) -> int:
    """token_fold's passes in lora_shrink_backward: one per slot k with dropout, else 1."""
    return s.K if s.dropout > 0 else 1


def _token_fold_grid(s: Shape, R: int, passes: int) -> tuple:
    """token_fold_grid: (ceil(H / (64 h_tiles)), ceil(T / 64))."""
    return (math.ceil(s.H / (64 * _token_fold_plan(s, R, passes)["h_tiles"])), math.ceil(s.T / 64))


def _weight_grad(s: Shape, R: int) -> dict:
    """Loop bounds of weight_grad_mma_kernel: its expert's slots [start, end) at balanced routing (set by
    analyse_cuda), 64 per chunk; the 8-rank groups of v staged per row (round16 of the tile's ranks / 8) and their
    power-of-two ceiling's log2 (vshift)."""
    vgroups = _round16(min(64, R)) // 8
    return dict(H=s.H, R=R, K=s.K, S=s.S, steps=4, vgroups=vgroups, vshift=max(1, (vgroups - 1).bit_length()))


def _tile_instance(s: Shape) -> str:
    """The template arguments of an expand_act_combine tensor-core kernel (dispatch_tiles): NF, SiLU, aligned rows,
    dropout on."""
    return f"<{_rank_frags(s)}, 0, true, {'true' if s.dropout > 0 else 'false'}>"


def _lora_instance(types: str, drop: bool, h_rows: bool, whole: bool | None = None) -> str:
    """The template arguments of a csrc/lora_tiles.cuh kernel as c++filt writes them: its dtypes, then the
    LoraVariant (dropout on, aligned rows: true at the modelled shapes, the weight's rows along h: A's), then, for
    token_fold_mma_kernel, WHOLE (plan.whole)."""
    flag = lambda b: "true" if b else "false"  # noqa: E731
    variant = f"mixlora::(anonymous namespace)::LoraVariant<{flag(drop)}, true, {flag(h_rows)}>"
    return f"<{types}, {variant} >" if whole is None else f"<{types}, {variant}, {flag(whole)}>"


# Bytes: bf16 activations and LoRA weights (2; api.cpp passes the weights of a bf16 model as they are), fp32 rank-R
# tensors, routing weights, y (the down delta) and weight gradients (4; api.cpp casts the gradients to bf16 after the
# launches: cuda_model_only_records), int64 experts / order (8). Instances: logits and the routing tensors are fp32
# (router_logits), grad_y of lora_expand_combine is fp32 (y is), everything else bf16; the tensor-core kernels'
# NF from dispatch_rank_frags; the LoRA tile kernels' products in bf16 (shrink_dot_t, expand_dot_t: one bf16 plane
# per operand, the fp32 rank vectors and grad_y rounded to it).
CUDA_LAUNCHES = [
    # router_logits (csrc/router_logits): the forward, grid (ceil(T/32), ceil(E/8)), reads x (bf16) and the fp32
    # router weight, writes the fp32 logits; the backward's dx (grid (ceil(H/256), ceil(T/128))), the dW partials of
    # 256-row chunks (grid (ceil(H/256), chunks, ceil(E/8))) and their sum.
    CudaLaunch("router_logits", "csrc/router_logits/router_logits.cu", "router_logits_fwd_kernel",
               lambda s: (math.ceil(s.T / 32), math.ceil(s.E / 8)),
               lambda s: s.T * s.H * 2 + s.E * s.H * 4 + s.T * s.E * 4, params=lambda s: dict(T=s.T, H=s.H, E=s.E),
               instance="<c10::BFloat16, true>"),
    CudaLaunch("router_logits_backward", "csrc/router_logits/router_logits.cu", "router_logits_dx_kernel",
               lambda s: (math.ceil(s.H / 256), math.ceil(s.T / 128)),
               lambda s: s.T * s.E * 4 + s.E * s.H * 4 + s.T * s.H * 2, params=lambda s: dict(T=s.T, H=s.H, E=s.E),
               instance="<c10::BFloat16, true>"),
    CudaLaunch("router_logits_backward", "csrc/router_logits/router_logits.cu", "router_logits_dw_partial_kernel",
               lambda s: (math.ceil(s.H / 256), math.ceil(s.T / 256), math.ceil(s.E / 8)),
               lambda s: s.T * s.E * 4 + s.T * s.H * 2 + math.ceil(s.T / 256) * s.E * s.H * 4,
               params=lambda s: dict(T=s.T, H=s.H, E=s.E), instance="<c10::BFloat16, true>"),
    CudaLaunch("router_logits_backward", "csrc/router_logits/router_logits.cu", "router_logits_dw_sum_kernel",
               lambda s: (math.ceil(s.E * s.H / 256),), lambda s: (math.ceil(s.T / 256) + 1) * s.E * s.H * 4,
               params=lambda s: dict(n_chunks=math.ceil(s.T / 256), N=s.E * s.H)),
    CudaLaunch("route", "csrc/route/route.cu", "route_fwd_kernel", lambda s: (math.ceil(s.T / 128),),
               lambda s: s.T * s.E * 4 + s.T * s.K * 12, threads=128, params=lambda s: dict(E=s.E, K=s.K),
               instance="<float>"),
    CudaLaunch("sort_slots", "csrc/sort_slots/sort_slots.cu", "sort_slots_keys_kernel",
               lambda s: (math.ceil(s.S / 256),), lambda s: s.S * (8 + 4 + 8), instance="<long>"),
    CudaLaunch("sort_slots", "csrc/sort_slots/sort_slots.cu", "sort_slots_offsets_kernel",
               lambda s: (math.ceil((s.E + 1) / 256),), lambda s: s.S * 4),
    # lora_shrink: slot_rank_mma_kernel, grid (ceil(S/64) + E, ceil(2R/64)); reads x rows (gathered) and A (bf16),
    # writes z (S, 2R) fp32.
    CudaLaunch("lora_shrink", "csrc/lora_shrink/lora_shrink.cu", "slot_rank_mma_kernel",
               lambda s: (math.ceil(s.S / 64) + s.E, math.ceil(2 * s.R / 64)),
               lambda s: s.T * s.H * 2 + s.E * 2 * s.R * s.H * 2 + s.S * 2 * s.R * 4 + s.S * 16,
               dyn_smem=lambda s: _lora_tile_smem(1 + 1, 4 * 64),
               params=lambda s: _slot_rank(s, 2 * s.R, math.ceil(2 * s.R / 64)),
               instance=lambda s: _lora_instance("c10::BFloat16, c10::BFloat16, c10::BFloat16", s.dropout > 0, True)),
    # expand_act_combine on tensor cores (bf16 G/U and weights, ranks <= 64): grid (I splits, token tiles of
    # BT = 128 / KP tokens), the split partial sums added by eac_split_sum_kernel (forward:
    # only when there are splits; backward: always).
    CudaLaunch("expand_act_combine", "csrc/expand_act_combine/expand_act_combine.cu", "eac_fwd_mma_kernel",
               lambda s: (_tile(s, False)["grid_x"], _tile(s, False)["tiles"]),
               lambda s: 3 * s.T * s.I * 2 + s.S * 2 * s.R * 4 + 3 * s.E * s.I * s.R * 2 + s.S * 12
               + _tile(s, False)["grid_x"] * s.S * s.R * 4,
               dyn_smem=lambda s: _tile_layout_bytes(s, False), params=lambda s: _tile(s, False),
               instance=_tile_instance),
    CudaLaunch("expand_act_combine", "csrc/expand_act_combine/expand_act_combine.cu", "eac_split_sum_kernel",
               lambda s: (_split_sum_blocks(s.S * s.R),), lambda s: (_tile(s, False)["grid_x"] + 1) * s.S * s.R * 4,
               params=lambda s: dict(splits=_tile(s, False)["grid_x"], rows=s.S, cols=s.R,
                                     grid_x=_split_sum_blocks(s.S * s.R)),
               when=lambda s: _tile(s, False)["grid_x"] > 1 and s.R > 0),
    # lora_expand_combine: token_fold_mma_kernel, grid (ceil(H / (64 h_tiles)), ceil(T/64)); reads zd, the routing,
    # B (bf16), writes y (T, H) fp32.
    CudaLaunch("lora_expand_combine", "csrc/lora_expand_combine/lora_expand_combine.cu", "token_fold_mma_kernel",
               lambda s: _token_fold_grid(s, s.R, 1),
               lambda s: s.T * s.H * 4 + s.S * s.R * 4 + s.E * s.H * s.R * 2 + s.S * 12,
               dyn_smem=lambda s: _token_fold_plan(s, s.R, 1)["smem"], params=lambda s: _token_fold(s, s.R, 1),
               instance=lambda s: _lora_instance("c10::BFloat16, float, c10::BFloat16", False, False,
                                                 _token_fold_plan(s, s.R, 1)["whole"])),
    # lora_expand_combine_backward: slot_rank_mma_kernel (q, dzd, dweights; one rank tile, grid (ceil(S/64) + E, 1))
    # reads grad_y (fp32) rows by token, B, zd, the routing; weight_grad_mma_kernel (dB) reads grad_y, zd, the
    # routing, writes dB fp32.
    CudaLaunch("lora_expand_combine_backward", "csrc/lora_expand_combine/lora_expand_combine.cu",
               "slot_rank_mma_kernel", lambda s: (math.ceil(s.S / 64) + s.E, 1),
               lambda s: s.T * s.H * 4 + 2 * s.S * s.R * 4 + s.E * s.H * s.R * 2 + s.S * 16,
               dyn_smem=lambda s: _lora_tile_smem(1 + 1, 4 * 64), params=lambda s: _slot_rank(s, s.R, 1),
               instance=_lora_instance("float, c10::BFloat16, c10::BFloat16", False, False)),
    CudaLaunch("lora_expand_combine_backward", "csrc/lora_expand_combine/lora_expand_combine.cu",
               "weight_grad_mma_kernel", lambda s: (math.ceil(s.H / 64), s.E, math.ceil(s.R / 64)),
               lambda s: s.T * s.H * 4 + s.S * s.R * 4 + s.E * s.H * s.R * 4 + s.S * 16,
               dyn_smem=lambda s: _lora_tile_smem(1 + 1, 3 * 64), params=lambda s: _weight_grad(s, s.R),
               instance=_lora_instance("float, c10::BFloat16", False, False)),
    CudaLaunch("expand_act_combine_backward", "csrc/expand_act_combine/expand_act_combine.cu",
               "eac_bwd_mma_kernel", lambda s: (_tile(s, True)["grid_x"], _tile(s, True)["tiles"]),
               lambda s: 5 * s.T * s.I * 2 + s.S * 3 * s.R * 4 + 3 * s.E * s.I * s.R * 2 + s.S * 12
               + _tile(s, True)["grid_x"] * s.S * (2 * s.R + 1) * 4,
               dyn_smem=lambda s: _tile_layout_bytes(s, True), params=lambda s: _tile(s, True),
               instance=_tile_instance),
    CudaLaunch("expand_act_combine_backward", "csrc/expand_act_combine/expand_act_combine.cu",
               "eac_split_sum_kernel", lambda s: (_split_sum_blocks(s.S * (2 * s.R + 1)),),
               lambda s: (_tile(s, True)["grid_x"] + 1) * s.S * (2 * s.R + 1) * 4,
               params=lambda s: dict(splits=_tile(s, True)["grid_x"], rows=s.S, cols=2 * s.R + 1,
                                     grid_x=_split_sum_blocks(s.S * (2 * s.R + 1)))),
    # Weight gradients on tensor cores: grid (ceil(I / 64) column tiles, E experts), 256 threads, WgLayout's shared
    # memory. A block stages its expert's 64-column slabs of Bg, Bu, Ad (bf16) once, then walks the expert's sorted
    # slots 64 at a time: order, zg / zu / dzd rows (fp32) and the slots' G, U, dH-bar rows (bf16, by token; read
    # once from HBM, re-read from L2 by the other K-1 slots of a token and by the other experts) and the routing
    # weights; writes dBg, dBu, dAd (fp32) once.
    CudaLaunch("expand_act_combine_backward", "csrc/expand_act_combine/expand_act_combine.cu",
               "eac_bwd_weight_mma_kernel", lambda s: (math.ceil(s.I / 64), s.E),
               lambda s: 3 * s.T * s.I * 2 + s.S * 3 * s.R * 4 + 3 * s.E * s.I * s.R * (2 + 4) + s.S * (8 + 4),
               dyn_smem=_wg_layout_bytes, params=_wg, instance=_tile_instance),
    # lora_shrink_backward: token_fold_mma_kernel (dx: reads grad_z, experts, A; writes dx bf16), grid
    # (ceil(H / (64 h_tiles)), ceil(T/64)), one pass per slot k with dropout; weight_grad_mma_kernel (dA), grid
    # (ceil(H/64), E, ceil(2R/64)): reads x rows by slot, grad_z, writes dA fp32.
    CudaLaunch("lora_shrink_backward", "csrc/lora_shrink/lora_shrink.cu", "token_fold_mma_kernel",
               lambda s: _token_fold_grid(s, 2 * s.R, _passes(s)),
               lambda s: s.T * s.H * 2 + s.S * 2 * s.R * 4 + s.E * 2 * s.R * s.H * 2 + s.S * 8,
               dyn_smem=lambda s: _token_fold_plan(s, 2 * s.R, _passes(s))["smem"],
               params=lambda s: _token_fold(s, 2 * s.R, _passes(s)),
               instance=lambda s: _lora_instance("c10::BFloat16, c10::BFloat16, c10::BFloat16", s.dropout > 0, True,
                                                 _token_fold_plan(s, 2 * s.R, _passes(s))["whole"])),
    CudaLaunch("lora_shrink_backward", "csrc/lora_shrink/lora_shrink.cu", "weight_grad_mma_kernel",
               lambda s: (math.ceil(s.H / 64), s.E, math.ceil(2 * s.R / 64)),
               lambda s: s.T * s.H * 2 + s.S * 2 * s.R * 4 + s.E * 2 * s.R * s.H * 4 + s.S * 16,
               dyn_smem=lambda s: _lora_tile_smem(1 + 1, 3 * 64), params=lambda s: _weight_grad(s, 2 * s.R),
               instance=lambda s: _lora_instance("c10::BFloat16, c10::BFloat16", s.dropout > 0, True)),
    CudaLaunch("route_backward", "csrc/route/route.cu", "route_bwd_kernel", lambda s: (math.ceil(s.T / 128),),
               lambda s: s.T * s.K * 20 + s.T * s.E * 4, threads=128, params=lambda s: dict(E=s.E, K=s.K),
               instance="<float>"),
]


def _ptx_entry(ptx: str, mangled: str) -> str:
    """The PTX of one kernel (`.entry <mangled>` up to the next entry) out of a whole file's PTX."""
    start = ptx.find(f".entry {mangled}")
    if start < 0:
        return ""
    end = ptx.find(".entry ", start + 7)
    return ptx[start:end if end > 0 else len(ptx)]


@functools.lru_cache(maxsize=None)
def _demangle(names: tuple[str, ...]) -> tuple[str, ...]:
    """c++filt of mangled names (binutils, which nvcc's host compiler comes with)."""
    tool = shutil.which("c++filt")
    if tool is None:
        raise RuntimeError("c++filt (binutils) is needed to pick a CUDA kernel's template instantiation")
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    return tuple(out.splitlines()[:len(names)])


def _cuda_function(info: dict, kernel: str, instance: str) -> str | None:
    """The mangled name of `kernel`'s instantiation `instance` (template arguments as c++filt writes them, "" for a
    kernel that is no template); None when the compiled file has no such function."""
    names = tuple(info)
    want = f"::{kernel}{instance}("
    found = [n for n, d in zip(names, _demangle(names)) if want in d]
    return found[0] if len(found) == 1 else None


def analyse_cuda(launch: CudaLaunch, shape: Shape) -> dict:
    path = str(ROOT / launch.file)
    cubin, log, ptx = compile_cu(path)
    info = ptxas_info(log)
    mangled = _cuda_function(info, launch.kernel, launch.instance_at(shape))
    if mangled is None:
        raise RuntimeError(f"{launch.kernel}{launch.instance_at(shape)} not found (or not unique) in the nvcc output "
                           f"of {launch.file}")
    instrs, labels = _cuda_sass(path, mangled)
    env = dict(start=0, end=shape.S // shape.E, **launch.params(shape))
    common = ROOT / "csrc" / "common.cuh"
    consts = _cpp_constants(common.read_text() + Path(path).read_text(), env, launch.threads)
    # Loops of the kernel's own body, and of every other file its line info names (inlined device helpers).
    files = sorted({f for ins in instrs for f, _ in ins.locs if f.startswith(str(ROOT / "csrc"))} | {path})
    source_loops = []
    for f in files:
        # the kernel's own loops and those of device helpers (not inside another __global__ function)
        text = Path(f).read_text()
        span = _kernel_span(text, launch.kernel)
        own = "\n".join(text.splitlines()[span[0] - 1:span[1]]) if span else ""
        consts_f = _cpp_constants(text, _cpp_constants(own, consts, launch.threads), launch.threads)
        source_loops += [sl for sl in _cpp_loops(f, text, consts_f, launch.threads)
                         if (span and span[0] <= sl.first <= span[1]) or not any(_in_kernel(text, sl.first))]
    kspan = None
    for f in files:
        span = _kernel_span(Path(f).read_text(), launch.kernel)
        if span:
            kspan = (f, *span)
    grid = tuple(launch.grid(shape)) + (1,) * (3 - len(launch.grid(shape)))
    warps = launch.threads // 32
    cases = [switch_case_lines(f) for f in files]
    dead = (set().union(*(c[0] for c in cases)), set().union(*(c[1] for c in cases)))
    prof = profile_sass(instrs, labels, source_loops, math.prod(grid), warps, (), kspan, scalar_code=True, dead=dead)
    fi = info[mangled]
    shared = fi.get("smem", 0) + launch.dyn_smem(shape)
    occ = occupancy(fi.get("regs", 0), shared, warps)
    rec = _record("cuda", launch.op, launch.kernel + launch.instance_at(shape), shape, fi.get("regs", 0),
                  fi.get("stack", 0), prof, shared, occ, warps, grid, float(launch.hbm(shape)),
                  ptx_mma_types(_ptx_entry(ptx, mangled)), [],
                  {"threads": launch.threads, "instance": launch.instance_at(shape)})
    rec["spill_bytes"] = {"stores": fi.get("spill_stores", 0), "loads": fi.get("spill_loads", 0)}
    return rec


@functools.lru_cache(maxsize=None)
def _cuda_disassembly(path: str) -> dict[str, str]:
    """nvdisasm text of one compiled .cu, split by function (`.text.<mangled>:` sections)."""
    cubin, _, _ = compile_cu(path)
    out, name = {}, None
    for line in disassemble(cubin).splitlines(keepends=True):
        m = re.match(r"\.text\.(\S+):", line)
        if m:
            name = m.group(1)
        if name:
            out[name] = out.get(name, "") + line
    return out


def _cuda_sass(path: str, mangled: str):
    return parse_sass(_cuda_disassembly(path).get(mangled, ""))


# Kernels of csrc/ that the bf16 LLaMA-2-7B pipeline does not launch, and why (each launched only inside a
# `dispatch_simt(` call of csrc/expand_act_combine/expand_act_combine.cu: the SIMT path, taken when `use_mma` is
# false; tests/test_sm90_cost.py checks both).
CUDA_NOT_IN_PIPELINE = {
    "eac_fwd_kernel": "SIMT expand_act_combine: fp32/fp16 models, or ranks the tensor-core tiles do not fit",
    "eac_bwd_token_kernel": "SIMT expand_act_combine backward: as eac_fwd_kernel",
    "eac_bwd_weight_kernel": "SIMT expand_act_combine weight gradients: as eac_fwd_kernel (bf16 models with ranks "
                             "that fit take eac_bwd_weight_mma_kernel)",
}

_GLOBAL_DEF = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")


def cuda_global_kernels() -> set[str]:
    """Every `__global__` kernel defined in csrc/ (.cu, .cuh)."""
    found = set()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cu", ".cuh"):
            found |= set(_GLOBAL_DEF.findall(path.read_text()))
    return found


def cuda_unmodelled_kernels() -> list[str]:
    """`__global__` kernels in csrc/ that CUDA_LAUNCHES does not describe: the CUDA prediction misses them (a kernel
    was added or renamed since the table was written), so the report lists them next to the CUDA numbers."""
    known = {launch.kernel for launch in CUDA_LAUNCHES} | set(CUDA_NOT_IN_PIPELINE)
    return sorted(cuda_global_kernels() - known)


@dataclass(frozen=True)
class LaunchSite:
    """A `<<<...>>>` launch in the host code of a csrc/ .cu file: the kernel it launches, its line, and whether it
    sits inside a `dispatch_simt(` call (expand_act_combine's SIMT path)."""
    file: str    # relative to the repository root
    line: int
    kernel: str
    simt: bool


def _call_spans(text: str, callee: str) -> list[tuple[int, int]]:
    """Character spans of the calls `callee(...)` in text (not its definition: a call is not preceded by a type)."""
    spans = []
    for m in re.finditer(r"(?<![\w:])" + re.escape(callee) + r"\s*\(", text):
        before = text[:m.start()].rstrip()
        if re.search(r"\b(void|bool|int|auto|inline)$", before):
            continue
        depth, j = 0, m.end() - 1
        while j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        spans.append((m.start(), j))
    return spans


def cuda_launch_sites() -> list[LaunchSite]:
    """Every kernel launch of csrc/**/*.cu: `kernel<...><<<` directly, or through a local alias
    (`const auto kernel = eac_fwd_mma_kernel<...>;` ... `kernel<<<`)."""
    sites = []
    for path in sorted((ROOT / "csrc").rglob("*.cu")):
        text = path.read_text()
        aliases = [(m.start(), m.group(1), m.group(2))
                   for m in re.finditer(r"\bauto\s+(\w+)\s*=\s*&?(\w+)\s*(?:<[^;]*>)?\s*;", text)]
        simt = _call_spans(text, "dispatch_simt")
        for m in re.finditer(r"\b(\w+)\s*(?:<(?:[^<>;]|<[^<>;]*>)*>)?\s*<<<", text):
            name = m.group(1)
            alias = [k for at, a, k in aliases if a == name and at < m.start()]
            sites.append(LaunchSite(str(path.relative_to(ROOT)), text.count("\n", 0, m.start()) + 1,
                                    alias[-1] if alias else name,
                                    any(a <= m.start() <= b for a, b in simt)))
    return sites


def cuda_records(shape: Shape, kernels=None) -> list[dict]:
    """Records of the CUDA pipeline (kernels: restrict to these kernel names); launches that do not happen at this
    shape (`when`) are left out."""
    return [analyse_cuda(launch, shape) for launch in CUDA_LAUNCHES
            if (kernels is None or launch.kernel in kernels) and launch.when(shape)]


def lora_weight_elements(shape: Shape) -> int:
    """Elements of the LoRA weights of one FFN: A_in (E, 2R, H), Bg, Bu (E, I, R), Ad (E, R, I), Bd (E, H, R)."""
    s = shape
    return s.E * (2 * s.R * s.H + 2 * s.I * s.R + s.R * s.I + s.H * s.R)


def cuda_model_only_records(shape: Shape) -> list[dict]:
    """What the CUDA path launches beyond csrc/'s kernels, modelled at HBM bandwidth:
    - sort_slots' cub::DeviceRadixSort::SortPairs of the S (key, slot) pairs (csrc/sort_slots/sort_slots.cu;
      onesweep at these sizes: histogram, exclusive sum and one onesweep pass over <= 8 key bits, plus the
      memset of its lookback counters): keys and slots read twice and written once;
    - api.cpp's casts of the fp32 weight gradients (dA, dB of lora_shrink / lora_expand_combine, dBg, dBu, dAd of
      expand_act_combine) to the bf16 weights' dtype (`like_dtype`): fp32 read + bf16 write, one launch each.
    The forward weights are not cast any more (api.cpp reads bf16 weights as they are)."""
    s = shape
    sort_bytes = float(s.S * (4 + 8) * 3)
    casts = float(lora_weight_elements(s) * (4 + 2))
    return [_model_only("cuda", "sort_slots", "cub::DeviceRadixSort::SortPairs", s, sort_bytes,
                        sort_bytes / HBM_BPS, launches=4,
                        note="modelled at HBM bandwidth (cub's kernels, not analysed here)"),
            _model_only("cuda", "api_grad_casts", "fp32 -> bf16 weight-gradient casts (torch, api.cpp)", s, casts,
                        casts / HBM_BPS, launches=5)]


def _model_only(backend, op, name, shape, hbm, lower, launches=1,
                note="modelled at HBM bandwidth (torch ops, not compiled here)") -> dict:
    return {"backend": backend, "op": op, "name": name, "T": shape.T, "dropout": shape.dropout, "regs": None,
            "spills": 0, "shared_bytes": None, "occupancy": None, "mma": {}, "hbm_bytes": hbm, "l2_bytes": 0.0,
            "flops": {"tensor": {}, "simt": 0.0}, "warp_instructions": None, "lower_ms": lower * 1e3,
            "central_ms": (CENTRAL_HIGH_OCC * lower + launches * LAUNCH_S) * 1e3, "bound_by": "hbm",
            "notes": [note]}


# ------------------------------------------------------------------------------------------------ report
def predict(records: list[dict]) -> dict:
    """backend -> {T: whole-FFN fwd+bwd ms} from the kernel records (central) plus the measured dense FFN; for
    dropout 0 (key "ms") and 0.05 ("ms_dropout")."""
    out: dict = {}
    for backend in ("triton", "cuda"):
        for r in records:
            if r["backend"] not in (backend, "both"):
                continue
            key = str(r["T"])
            slot = out.setdefault(backend, {}).setdefault(key, {"0.0": MEASURED_MS["dense"][r["T"]],
                                                                "0.05": MEASURED_MS["dense"][r["T"]]})
            slot[str(r["dropout"])] += r["central_ms"]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def git_dirty(paths=("mixlora_kernels/triton", "csrc")) -> bool:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths], capture_output=True,
                             text=True).stdout
    except OSError:
        return False
    return bool(out.strip())


def versions() -> dict:
    import torch
    import triton
    nvcc = shutil.which("nvcc")
    v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    m = re.search(r"release ([\d.]+), V([\d.]+)", v)
    return {"torch": torch.__version__, "triton": triton.__version__, "nvcc": m.group(2) if m else None}


def build_report(tokens=TARGET_TOKENS, dropouts=TARGET_DROPOUTS, backends=("triton", "cuda"), commit=None) -> dict:
    records = []
    for T in tokens:
        for p in dropouts:
            shape = Shape(T=T, dropout=p)
            if "triton" in backends:
                records += triton_records(shape)
            if "cuda" in backends:
                records += cuda_records(shape) + cuda_model_only_records(shape)
    pred = predict(records)
    return {
        "label": LABEL,
        "commit": commit or git_commit(),
        "kernels_modified_in_worktree": False if commit else git_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "shape": {"H": 4096, "I": 11008, "E": 8, "K": 2, "R": 16, "dtype": "bf16", "model": "LLaMA-2-7B FFN"},
        "cuda_unmodelled_kernels": cuda_unmodelled_kernels() if "cuda" in backends else [],
        "predicted_fwd_bwd_ms": {b: {T: v["0.0"] for T, v in d.items()} for b, d in pred.items()},
        "predicted_fwd_bwd_ms_dropout_0.05": {b: {T: v["0.05"] for T, v in d.items()} for b, d in pred.items()},
        "measured_anchors_ms": {k: {str(t): v for t, v in d.items()} for k, d in MEASURED_MS.items()},
        "goal_ms": {str(k): v for k, v in GOAL_MS.items()},
        "review_19e494c_T4096_ms": REVIEW_19E494C_MS,
        "constants": {"sms": SMS, "clock_hz": CLOCK_HZ, "hbm_Bps": HBM_BPS, "l2_Bps": L2_BPS,
                      "simt_flops": SIMT_FLOPS, "tc_peak": {".".join(k): v for k, v in TC_PEAK.items()},
                      "central_low_occ": CENTRAL_LOW_OCC, "central_high_occ": CENTRAL_HIGH_OCC, "launch_s": LAUNCH_S},
        "kernels": records,
    }


def _mma_text(mma: dict) -> str:
    if not mma:
        return "–"
    sass = ", ".join(f"{k}×{v}" for k, v in sorted(mma.get("sass", {}).items())) or "none (SIMT)"
    precs = sorted({d["precision"] for d in mma.get("dots", []) if d["precision"] not in ("-",)})
    ins = sorted({f"{d['a']}" for d in mma.get("dots", [])})
    extra = f"; dots {'/'.join(ins)} {'/'.join(precs)}" if mma.get("dots") else ""
    return sass + extra


def markdown(report: dict) -> str:
    dirty = " (kernel files modified in the work tree)" if report["kernels_modified_in_worktree"] else ""
    lines = [f"# Predicted H200 cost of the MixLoRA kernels — {report['label']}", "",
             f"Commit {report['commit']}{dirty}, "
             f"{report['date']}; torch {report['versions']['torch']}, triton {report['versions']['triton']}, "
             f"nvcc {report['versions']['nvcc']}. LLaMA-2-7B FFN (H 4096, I 11008, E 8, K 2, R 16), bf16, fwd+bwd. "
             "Regenerate: `python -m benchmarks.sm90_cost --json PATH --md PATH`.", "",
             "## Whole FFN, forward + backward (ms)", "",
             "| path | T 4096 | T 16384 | T 4096, dropout 0.05 | T 16384, dropout 0.05 | kind |",
             "|---|---:|---:|---:|---:|---|"]
    for b in report["predicted_fwd_bwd_ms"]:  # the backends analysed
        d, dd = report["predicted_fwd_bwd_ms"][b], report["predicted_fwd_bwd_ms_dropout_0.05"][b]
        lines.append(f"| MixLoRA, {b} kernels | {d['4096']:.2f} | {d['16384']:.2f} | {dd['4096']:.2f} | "
                     f"{dd['16384']:.2f} | **predicted** |")
    for k, name in (("dense", "dense frozen FFN"), ("peft_lora", "PEFT LoRA r16"),
                    ("published_loop", "published MixLoRA loop")):
        m = report["measured_anchors_ms"][k]
        lines.append(f"| {name} | {m['4096']:.2f} | {m['16384']:.2f} | | | measured (H200) |")
    lines.append(f"| goal | {report['goal_ms']['4096']} | {report['goal_ms']['16384']} | | | |")
    if report.get("cuda_unmodelled_kernels"):
        lines += ["", "CUDA kernels in csrc/ that `CUDA_LAUNCHES` does not describe (not in the CUDA prediction): "
                  + ", ".join(f"`{k}`" for k in report["cuda_unmodelled_kernels"]) + "."]
    for T in ("4096", "16384"):
        for p in (0.0, 0.05):
            rows = [r for r in report["kernels"] if str(r["T"]) == T and r["dropout"] == p]
            lines += ["", f"## Kernels at T {T}, dropout {p} (central ms; bound = lower bound and what sets it)", "",
                      "| backend | op | kernel | regs | spills | smem B | occ. | MMA (SASS kinds; dot operands) | "
                      "HBM MB | L2 MB | TC GFLOP | SIMT GFLOP | warp-instr (M) | bound ms | central ms |",
                      "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                tc = sum(r["flops"]["tensor"].values()) / 1e9
                wi = "–" if r["warp_instructions"] is None else f"{r['warp_instructions'] / 1e6:.1f}"
                occ = "–" if r["occupancy"] is None else f"{r['occupancy']:.3f}"
                lines.append(
                    f"| {r['backend']} | {r['op']} | `{r['name']}` | {r['regs'] if r['regs'] is not None else '–'} | "
                    f"{r['spills']} | {r['shared_bytes'] if r['shared_bytes'] is not None else '–'} | {occ} | "
                    f"{_mma_text(r['mma'])} | {r['hbm_bytes'] / 1e6:.1f} | {r['l2_bytes'] / 1e6:.0f} | {tc:.1f} | "
                    f"{r['flops']['simt'] / 1e9:.1f} | {wi} | {r['lower_ms']:.3f} ({r['bound_by']}) | "
                    f"{r['central_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def write_predicted_cost(report: dict, path: Path = PREDICTED_COST_PATH) -> None:
    """The small file `auto` backend selection reads: backend -> {T: predicted fwd+bwd ms} (dropout 0). The CUDA
    backend is left out while csrc/ has kernels CUDA_LAUNCHES does not describe: its sum would be of kernels that
    may not be the ones that run."""
    skip = {"cuda"} if report.get("cuda_unmodelled_kernels") else set()
    data = {"label": LABEL, "commit": report["commit"],
            **{b: {T: round(ms, 3) for T, ms in d.items()} for b, d in report["predicted_fwd_bwd_ms"].items()
               if b not in skip}}
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_predicted_cost(path: Path = PREDICTED_COST_PATH) -> dict[str, dict[int, float]]:
    """backend -> {T: predicted whole-FFN fwd+bwd ms} from the committed report ({} when there is none)."""
    if not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    return {b: {int(T): ms for T, ms in d.items()} for b, d in data.items() if isinstance(d, dict)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write the report (JSON) here")
    ap.add_argument("--md", help="also write a Markdown table here")
    ap.add_argument("--predicted", help="write backend -> {T: ms} here for `auto` backend selection ('' to skip; "
                    f"default: {PREDICTED_COST_PATH.relative_to(ROOT)} when every backend is analysed, else skip)")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--commit", help="the commit the analysed tree is (for a tree exported with `git archive`)")
    args = ap.parse_args(argv)
    backends = tuple(args.backends.split(","))
    report = build_report(backends=backends, commit=args.commit)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report))
    predicted = args.predicted
    if predicted is None:  # a partial run must not drop the other backend from the file `auto` reads
        predicted = str(PREDICTED_COST_PATH) if set(backends) == {"triton", "cuda"} else ""
    if predicted:
        write_predicted_cost(report, Path(predicted))
    for b, d in report["predicted_fwd_bwd_ms"].items():
        print(f"{b}: " + ", ".join(f"T {T}: {ms:.2f} ms" for T, ms in d.items()) + f"  ({LABEL.split(':')[0]})")
    if report["cuda_unmodelled_kernels"]:
        print("WARNING: CUDA kernels not in CUDA_LAUNCHES (missing from the CUDA prediction): "
              + ", ".join(report["cuda_unmodelled_kernels"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

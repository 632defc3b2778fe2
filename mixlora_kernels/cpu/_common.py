"""Pieces shared by the pure-torch CPU kernels: accumulation dtype, the LoRA-dropout hash in int32, matrix products
over expert segments, the autocast-off wrapper.

A leaf module (imports torch only): `mixlora_kernels.ops` imports the backend, which imports this package.
"""

from __future__ import annotations

import functools

import torch

# The counter hash of `mixlora_kernels.ops._common.dropout_scale`, restated here (that module is not importable from a
# backend); tests/test_cpu_kernels.py checks that the two masks are equal bit for bit.
_HASH_MUL = 0x45D9F3B
_INT32_MIN = -(2**31)
# torch._grouped_mm on the CPU: these dtypes, and the leading stride of every operand a multiple of 16 bytes.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp64 when any input is fp64, else fp32 (the references' rule)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def bounds(offsets: torch.Tensor) -> list[int]:
    """The expert offsets as Python ints (a CPU tensor: reading it costs no device sync)."""
    return offsets.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# LoRA dropout

def _xorshift16_(x: torch.Tensor) -> torch.Tensor:
    """x ^= (x >> 16) & 0xFFFF in place on int32: the logical shift of the uint32 hash, as one xor of the low int16
    half of each element with its high half (little-endian; x86 and ARM builds of torch are). One strided pass
    instead of a shift, a mask and an xor."""
    halves = x.view(torch.int16).view(*x.shape, 2)
    halves[..., 0] ^= halves[..., 1]
    return x


# Rows per block of the mask: the int32 block stays in the L2 cache between its passes (128 x 1536 int32 = 768 KiB;
# measured on this 2-core Sapphire Rapids, 1 thread, (512, 1536) mask: 2.8 ms in blocks of 128 rows, 3.2 ms
# unblocked, 3.8 ms in blocks of 32).
_MASK_ROWS = 128


class DropoutMask:
    """The LoRA-dropout keep mask of the rows `slots` (N,) of an (S, cols) slot matrix, block by block: `rows(a, b)`
    is (b - a, cols) bool, True where `dropout_scale(slots[a:b], cols, p, seed, ...)` keeps the element (the
    multiplier 1/(1-p) is left to the caller, who applies it to a rank-R result instead of an (N, cols) one).

    The same hash32((j * cols + c) mod 2**32 XOR seed) >= floor(p * 2**32), evaluated in int32 with in-place passes:
    int32 multiplies wrap mod 2**32 like the uint32 of the kernels, the logical shift is `_xorshift16_`, and the
    unsigned comparison is a signed one after flipping the top bit. Measured on this 2-core CPU, 1 thread, a (512,
    1536) mask: 2.8 ms, against 4.3 ms with int32 shifts and ~140 ms for the int64 reference in the same run (its
    int64 multiplies are not vectorised).
    """

    def __init__(self, slots: torch.Tensor, cols: int, p: float, seed: int) -> None:
        base = (slots.reshape(-1).to(torch.int64) * cols) & 0xFFFFFFFF
        self.base = torch.where(base >= 2**31, base - 2**32, base).to(torch.int32)
        seed32 = seed & 0xFFFFFFFF
        self.seed = seed32 - 2**32 if seed32 >= 2**31 else seed32
        self.threshold = int(p * 2**32) + _INT32_MIN
        self.columns = torch.arange(cols, dtype=torch.int32, device=slots.device)

    def rows(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.add(self.base[start:end].view(-1, 1), self.columns)
        x ^= self.seed
        for _ in range(2):
            _xorshift16_(x)
            x *= _HASH_MUL
        _xorshift16_(x)
        x ^= _INT32_MIN
        return torch.ge(x, self.threshold, out=out)


def keep_mask(slots: torch.Tensor, cols: int, p: float, seed: int) -> torch.Tensor:
    """(N, cols) bool: the whole `DropoutMask` of `slots`, in blocks of `_MASK_ROWS` rows."""
    mask = DropoutMask(slots, cols, p, seed)
    keep = torch.empty(slots.numel(), cols, dtype=torch.bool, device=slots.device)
    for start in range(0, slots.numel(), _MASK_ROWS):
        mask.rows(start, start + _MASK_ROWS, out=keep[start:start + _MASK_ROWS])
    return keep


# ---------------------------------------------------------------------------------------------------------------------
# Matrix products over expert segments (rows in expert-sorted order, segment e = rows bounds[e]:bounds[e+1])

def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands on the CPU (dtype, 16-byte leading strides)."""
    for t in tensors:
        if t.dtype not in _GROUPED_MM_DTYPES or t.dtype != tensors[0].dtype:
            return False
        align = 16 // t.element_size()
        s, n = t.stride()[-2:], t.shape[-2:]
        if s[0] == 1 and s[1] >= max(1, n[0]):  # the order of torch's check_valid_strides_and_return_transposed
            lead = s[1]
        elif s[1] == 1 and s[0] >= max(1, n[1]):
            lead = s[0]
        else:
            return False
        if lead % align:
            return False
    return True


def _offs(seg: list[int]) -> torch.Tensor:
    return torch.tensor(seg[1:], dtype=torch.int32)


def segment_mm(a: torch.Tensor, b: torch.Tensor, seg: list[int]) -> torch.Tensor:
    """a (S, k) in expert-sorted order, b (E, k, n) -> (S, n): each segment's rows times its expert's matrix.

    torch._grouped_mm where it accepts the operands (one call: a C++ loop of mm), else the same loop here.
    """
    S, n = a.shape[0], b.shape[-1]
    if a.shape[1] == 0 or n == 0:
        return a.new_zeros(S, n)
    if _grouped_mm_ok(a, b):
        return torch._grouped_mm(a, b, offs=_offs(seg))
    out = a.new_empty(S, n)
    for e in range(b.shape[0]):
        if seg[e + 1] > seg[e]:
            torch.mm(a[seg[e]:seg[e + 1]], b[e], out=out[seg[e]:seg[e + 1]])
    return out


def segment_mm_t(a: torch.Tensor, b: torch.Tensor, seg: list[int]) -> torch.Tensor:
    """a (S, m), b (S, n), rows in expert-sorted order -> (E, m, n): Σ over each segment's rows of a_rowᵀ b_row
    (the per-expert weight gradients); an empty segment gives zeros."""
    E = len(seg) - 1
    m, n = a.shape[1], b.shape[1]
    if m == 0 or n == 0:
        return a.new_zeros(E, m, n)
    if _grouped_mm_ok(a.T, b):
        return torch._grouped_mm(a.T, b, offs=_offs(seg))
    out = a.new_zeros(E, m, n)
    for e in range(E):
        if seg[e + 1] > seg[e]:
            torch.mm(a[seg[e]:seg[e + 1]].T, b[seg[e]:seg[e + 1]], out=out[e])
    return out


def no_autocast(fn):
    """Run a kernel with CPU autocast off, as the references do: it computes at the precision it documents (fp32
    accumulation) whatever autocast region the caller is in."""

    @functools.wraps(fn)
    def wrapped(*args):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)

    return wrapped

"""The CUDA kernels of csrc/ run on the CPU: build of the harness library and the ops on top of it.

`load()` compiles the kernel headers csrc/<op>/<op>_kernels.cuh and csrc/lora_tiles.cuh (the text nvcc compiles)
with the host compiler, `g++ -x c++ -std=c++17 -O1`, against tests/cuda_cpu/cuda_cpu.h, together with the fiber scheduler cuda_cpu.cpp and
the C ABI launchers launch_<op>.cpp, into one shared library under build/cuda_cpu/<hash of every input>/ (built once,
then reused; a file lock serialises concurrent builds), and returns `Kernels`: one method per
`torch.ops.mixlora_cuda` op with the same arguments and results, for CPU tensors.

Each method mirrors the op's CUDA path: the input preparation of csrc/api.cpp (dtype casts of the small tensors,
a contiguous copy when the innermost stride is not 1, int64 experts), the output allocation, and the launch function
of csrc/<op>/<op>.cu (mirrored in launch_<op>.cpp). On top, for the tests: outputs start as NaN (integers as
_INT_FILL) so that an element no kernel writes shows up as a mismatch, floating inputs sit between NaN guard bands
so that a read out of bounds poisons the result, and a write past an output's end is reported.

A new kernel runs here once its device code is in a torch-free csrc/<op>/<op>_kernels.cuh (dynamic shared memory
through mixlora::dynamic_smem), its launch function is mirrored in a launch_<op>.cpp listed in SOURCES, and `Kernels`
has a method for its op; a CUDA built-in it uses that cuda_cpu.h lacks fails the build and belongs in cuda_cpu.h.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
SOURCES = ["cuda_cpu.cpp", "launch_route.cpp", "launch_router_logits.cpp", "launch_sort_slots.cpp",
           "launch_lora_shrink.cpp", "launch_lora_expand_combine.cpp", "launch_expand_act_combine.cpp", "selftest.cu"]
CXX = os.environ.get("CXX", "g++")
# -fsanitize=bounds,object-size: an out-of-bounds access to a shared (or local) array, by index or through a pointer
# the compiler traces to it, calls a handler in cuda_cpu.cpp (the sanitizer runtime is not linked).
# -fno-extern-tls-init: the thread_local shared arrays have no dynamic initialiser, so an access needs no TLS wrapper.
CXXFLAGS = ["-x", "c++", "-std=c++17", "-O1", "-fPIC", "-fno-extern-tls-init", "-fsanitize=bounds,object-size",
            "-fno-sanitize-recover=all", "-Wall", "-Wno-unknown-pragmas", "-include", str(HERE / "cuda_cpu.h"),
            f"-I{HERE}", f"-I{CSRC}", f"-I{Path(torch.__file__).parent / 'include'}"]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # the order of common.cuh::Activation
_GUARD = 64  # elements of NaN (or _INT_FILL) before and after every guarded tensor
_INT_FILL = -(2**62)


class KernelError(RuntimeError):
    """A kernel fault on the CPU harness (device assertion, out-of-bounds shared access, barrier misuse, ...)."""


def _inputs() -> list[Path]:
    return sorted([HERE / s for s in SOURCES] + list(HERE.glob("*.h")) + list(CSRC.rglob("*.cuh")))


def build() -> Path:
    """The harness library, compiled unless a build of the same inputs exists."""
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([version, *CXXFLAGS]).encode())
    for path in _inputs():
        key.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    out = ROOT / "build" / "cuda_cpu" / key.hexdigest()[:16]
    lib = out / "libmixlora_cuda_cpu.so"
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            def compile_one(source):
                obj = out / (source + ".o")
                result = subprocess.run([CXX, *CXXFLAGS, "-c", str(HERE / source), "-o", str(obj)],
                                        capture_output=True, text=True)
                if result.returncode:
                    raise RuntimeError(f"cuda_cpu: compiling {source} failed:\n{result.stderr[-6000:]}")
                return str(obj)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                objects = list(pool.map(compile_one, SOURCES))
            tmp = out / "tmp.so"
            subprocess.run([CXX, "-shared", "-Wl,--no-undefined", *objects, "-o", str(tmp)], check=True)
            tmp.rename(lib)
    return lib


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


# ----------------------------------------------------------------------------------------------------------------
# Tensors as the kernels see them


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _float_inner(t: torch.Tensor) -> torch.Tensor:
    return _unit_inner_stride(t if t.dtype == torch.float32 else t.float())


def _float_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _like_dtype(fp32: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return fp32 if like.dtype == torch.float32 else fp32.to(like.dtype)


def _fill(dtype):
    return float("nan") if dtype.is_floating_point else _INT_FILL


def _guarded(t: torch.Tensor) -> torch.Tensor:
    """`t` (same values, shape and strides) inside a buffer with _GUARD NaNs on both sides of its span."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    buf = torch.full((span + 2 * _GUARD,), float("nan"), dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), _GUARD)
    view.copy_(t)
    return view


class _Outputs:
    """Output tensors of one op call: filled with NaN / _INT_FILL, followed by a guard band checked by `check`."""

    def __init__(self):
        self._buffers = []

    def empty(self, shape, dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = torch.full((n + _GUARD,), _fill(dtype), dtype=dtype)
        self._buffers.append((buf, n))
        return buf[:n].view(shape)

    def check(self, op: str) -> None:
        for buf, n in self._buffers:
            tail = buf[n:]
            intact = tail.isnan().all() if tail.is_floating_point() else (tail == _INT_FILL).all()
            if not intact:
                raise KernelError(f"{op}: a kernel wrote past the end of an output of {n} elements")


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


class Kernels:
    """The CUDA extension's ops (`torch.ops.mixlora_cuda.*`, csrc/api.cpp) for CPU tensors, run by the harness.

    Input checks are api.cpp's business and not repeated: the arguments must be valid for the op. Every call
    reseeds the thread schedule with `schedule_seed`, so a call behaves the same wherever it runs in a session.
    `sm_count` stands for the device's multiprocessor count where a launch sizes its grid by it (token_fold's
    column tiles per block, csrc/lora_tiles.cuh plan_token_fold): the H200's 132 unless a test sets another.
    """

    def __init__(self, lib_path: Path, schedule_seed: int = 0):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.cuda_cpu_last_error.restype = ctypes.c_char_p
        self.lib.cuda_cpu_set_schedule_seed.argtypes = [ctypes.c_uint64]
        self.schedule_seed = schedule_seed
        self.sm_count = 132

    def _launch(self, op: str, fn: str, *args) -> None:
        self.lib.cuda_cpu_set_schedule_seed(self.schedule_seed)
        c_args = [a if isinstance(a, ctypes._SimpleCData) or isinstance(a, ctypes.Array)
                  else ctypes.c_int64(a) if isinstance(a, int) else ctypes.c_double(a) for a in args]
        if getattr(self.lib, fn)(*c_args):
            raise KernelError(f"{op}: {self.lib.cuda_cpu_last_error().decode()}")

    # ----- sort_slots

    def sort_slots(self, experts, num_experts):
        out = _Outputs()
        order = out.empty((experts.numel(),), torch.int64)
        offsets = out.empty((num_experts + 1,), torch.int64)
        experts = experts.contiguous()
        bits = ctypes.c_int(32 if experts.dtype == torch.int32 else 64)
        self._launch("sort_slots", "cuda_cpu_sort_slots", bits, _ptr(experts), experts.numel(), num_experts,
                     _ptr(order), _ptr(offsets))
        out.check("sort_slots")
        return order, offsets

    # ----- route

    def route(self, logits, top_k):
        out = _Outputs()
        T, E = logits.shape
        weights = out.empty((T, top_k), torch.float32)
        experts = out.empty((T, top_k), torch.int64)
        logits = _guarded(logits.contiguous())
        self._launch("route", "cuda_cpu_route_forward", ctypes.c_int(_DTYPE_CODE[logits.dtype]), _ptr(logits), T, E,
                     top_k, _ptr(weights), _ptr(experts))
        out.check("route")
        return weights, experts

    def route_backward(self, grad_weights, weights, experts, num_experts):
        out = _Outputs()
        T, K = weights.shape
        grad_logits = out.empty((T, num_experts), torch.result_type(grad_weights, weights))
        gw, w = _guarded(_float_contiguous(grad_weights)), _guarded(_float_contiguous(weights))
        experts = experts.long().contiguous()
        self._launch("route_backward", "cuda_cpu_route_backward", ctypes.c_int(_DTYPE_CODE[grad_logits.dtype]),
                     _ptr(gw), _ptr(w), _ptr(experts), T, K, num_experts, _ptr(grad_logits))
        out.check("route_backward")
        return grad_logits

    # ----- router_logits

    def router_logits(self, x, weight):
        out = _Outputs()
        T, H = x.shape
        E = weight.shape[0]
        logits = out.empty((T, E), torch.float32)
        xk, w = _guarded(_unit_inner_stride(x)), _guarded(_float_inner(weight))
        self._launch("router_logits", "cuda_cpu_router_logits_forward", ctypes.c_int(_DTYPE_CODE[x.dtype]), _ptr(xk),
                     xk.stride(0), T, H, _ptr(w), w.stride(0), E, _ptr(logits))
        out.check("router_logits")
        return logits

    def router_logits_backward(self, grad, x, weight):
        out = _Outputs()
        T, H = x.shape
        E = weight.shape[0]
        dx = out.empty((T, H), x.dtype)
        dw = out.empty((E, H), torch.float32)
        part = out.empty((-(-T // 256), E, H), torch.float32)  # router_logits.cu: kRouterChunkT rows per partial
        g = _guarded(_float_contiguous(grad))
        xk, w = _guarded(_unit_inner_stride(x)), _guarded(_float_inner(weight))
        self._launch("router_logits_backward", "cuda_cpu_router_logits_backward", ctypes.c_int(_DTYPE_CODE[x.dtype]),
                     _ptr(g), _ptr(xk), xk.stride(0), T, H, _ptr(w), w.stride(0), E, _ptr(dx), _ptr(part), _ptr(dw))
        out.check("router_logits_backward")
        return dx, _like_dtype(dw, weight)

    # ----- lora_shrink

    def lora_shrink(self, x, A, experts, order, offsets, dropout_p, seed):
        out = _Outputs()
        T, H = x.shape
        E, R, _ = A.shape
        S, K = experts.numel(), experts.shape[1]
        z = torch.zeros(S, R) if H == 0 else out.empty((S, R), torch.float32)  # api.cpp: H = 0 gives zeros
        a_fp32 = A.dtype != x.dtype  # api.cpp: A in x's dtype is read as it is, otherwise as an fp32 copy
        x, A = _guarded(_unit_inner_stride(x)), _guarded(_float_inner(A) if a_fp32 else _unit_inner_stride(A))
        self._launch("lora_shrink", "cuda_cpu_lora_shrink_forward", ctypes.c_int(_DTYPE_CODE[x.dtype]), _ptr(x),
                     x.stride(0), H, _ptr(A), ctypes.c_int(a_fp32), A.stride(0), A.stride(1), E, R,
                     _ptr(order.contiguous()),
                     _ptr(offsets.contiguous()), S, K, float(dropout_p), seed, _ptr(z))
        out.check("lora_shrink")
        return z

    def lora_shrink_backward(self, grad_z, x, A, experts, order, offsets, dropout_p, seed):
        out = _Outputs()
        T, H = x.shape
        E, R, _ = A.shape
        dx = out.empty((T, H), x.dtype)
        dA = out.empty((E, R, H), torch.float32)
        a_fp32 = A.dtype != x.dtype
        gz, xk = _guarded(_float_inner(grad_z)), _guarded(_unit_inner_stride(x))
        Ak = _guarded(_float_inner(A) if a_fp32 else _unit_inner_stride(A))
        experts = experts.long().contiguous()
        self._launch("lora_shrink_backward", "cuda_cpu_lora_shrink_backward", ctypes.c_int(_DTYPE_CODE[x.dtype]),
                     _ptr(gz), gz.stride(0), _ptr(xk), xk.stride(0), T, H, _ptr(Ak), ctypes.c_int(a_fp32),
                     Ak.stride(0), Ak.stride(1), E, R,
                     _ptr(experts), experts.shape[1], _ptr(order.contiguous()), _ptr(offsets.contiguous()),
                     float(dropout_p), seed, _ptr(dx), _ptr(dA), self.sm_count)
        out.check("lora_shrink_backward")
        return dx, _like_dtype(dA, A)

    # ----- lora_expand_combine

    def lora_expand_combine(self, zd, B, weights, experts, order, offsets, scale):
        out = _Outputs()
        T, K = experts.shape
        E, H, R = B.shape
        y = out.empty((T, H), torch.float32)
        # api.cpp: B is read as it is
        zd, B, w = _guarded(_float_inner(zd)), _guarded(_unit_inner_stride(B)), _guarded(_float_contiguous(weights))
        experts = experts.long().contiguous()
        self._launch("lora_expand_combine", "cuda_cpu_lora_expand_combine_forward", _ptr(zd), zd.stride(0), _ptr(B),
                     ctypes.c_int(_DTYPE_CODE[B.dtype]), B.stride(0), B.stride(1), E, H, R, _ptr(w), _ptr(experts), T,
                     K, float(scale), _ptr(y), self.sm_count)
        out.check("lora_expand_combine")
        return y

    def lora_expand_combine_backward(self, grad_y, zd, B, weights, experts, order, offsets, scale):
        out = _Outputs()
        T, K = experts.shape
        E, H, R = B.shape
        dzd = out.empty(tuple(zd.shape), torch.float32)
        dB = out.empty((E, H, R), torch.float32)
        dweights = out.empty((T, K), torch.float32)
        B_as_is = B.dtype == grad_y.dtype or grad_y.dtype == torch.float32  # api.cpp's rule
        gy, zk = _guarded(_unit_inner_stride(grad_y)), _guarded(_float_inner(zd))
        Bk = _guarded(_unit_inner_stride(B) if B_as_is else _float_inner(B))
        w = _guarded(_float_contiguous(weights))
        experts = experts.long().contiguous()
        self._launch("lora_expand_combine_backward", "cuda_cpu_lora_expand_combine_backward",
                     ctypes.c_int(_DTYPE_CODE[grad_y.dtype]), _ptr(gy), gy.stride(0), _ptr(zk), zk.stride(0),
                     _ptr(Bk), ctypes.c_int(_DTYPE_CODE[Bk.dtype]), Bk.stride(0), Bk.stride(1), E, H, R, _ptr(w), _ptr(experts), T, K,
                     _ptr(order.contiguous()), _ptr(offsets.contiguous()), float(scale), _ptr(dzd), _ptr(dB),
                     _ptr(dweights))
        out.check("lora_expand_combine_backward")
        return _like_dtype(dzd, zd), _like_dtype(dB, B), _like_dtype(dweights, weights)

    # ----- expand_act_combine

    @staticmethod
    def _eac_inputs(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad):
        """api.cpp's prepare_expand_act_combine: the tensors the kernels read, and (pointers, sizes) for the ABI.
        The weights are read as they are when all three have G's dtype, else as fp32 copies."""
        as_is = Bg.dtype == Bu.dtype == Ad.dtype == G.dtype
        weight = _unit_inner_stride if as_is else _float_inner
        t = dict(G=_unit_inner_stride(G), U=None if U is None else _unit_inner_stride(U), zg=_float_inner(zg),
                 zu=_float_inner(zu), Bg=weight(Bg), Bu=weight(Bu), Ad=weight(Ad),
                 weights=_float_contiguous(weights), experts=experts.long().contiguous(), order=order.contiguous(),
                 offsets=offsets.contiguous())
        t = {k: None if v is None else _guarded(v) for k, v in t.items()}
        names = ("G", "U", "zg", "zu", "Bg", "Bu", "Ad", "weights", "experts", "order", "offsets")
        ptrs = (ctypes.c_void_p * len(names))(*[None if t[n] is None else t[n].data_ptr() for n in names])
        T, I = G.shape
        ints = [t["G"].stride(0), 0 if U is None else t["U"].stride(0), t["zg"].stride(0), t["zu"].stride(0),
                t["Bg"].stride(0), t["Bg"].stride(1), t["Bu"].stride(0), t["Bu"].stride(1), t["Ad"].stride(0),
                t["Ad"].stride(1), T, experts.shape[1], I, Bg.shape[0], Bg.shape[2], Bu.shape[2], Ad.shape[1],
                0 if as_is else 1]
        return t, ptrs, (ctypes.c_int64 * len(ints))(*ints)

    def expand_act_combine(self, G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, scale, activation_name,
                           dropout_p, seed):
        out = _Outputs()
        hbar = out.empty(tuple(G.shape), G.dtype)
        zd = out.empty((experts.numel(), Ad.shape[1]), torch.float32)
        keep, ptrs, ints = self._eac_inputs(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad)
        self._launch("expand_act_combine", "cuda_cpu_expand_act_combine_forward", ctypes.c_int(_DTYPE_CODE[G.dtype]),
                     ptrs, ints, float(scale), ctypes.c_int(_ACTIVATIONS.index(activation_name)), float(dropout_p),
                     seed, _ptr(hbar), _ptr(zd))
        out.check("expand_act_combine")
        return hbar, zd

    def expand_act_combine_backward(self, grad_hbar, grad_zd, G, U, zg, Bg, zu, Bu, weights, experts, order, offsets,
                                    Ad, scale, activation_name, dropout_p, seed):
        out = _Outputs()
        f32 = torch.float32
        dG = out.empty(tuple(G.shape), G.dtype)
        dU = torch.empty(0, dtype=G.dtype) if U is None else out.empty(tuple(G.shape), G.dtype)
        dzg, dBg = out.empty(tuple(zg.shape), f32), out.empty(tuple(Bg.shape), f32)
        dzu, dBu = out.empty(tuple(zu.shape), f32), out.empty(tuple(Bu.shape), f32)
        dweights, dAd = out.empty(tuple(weights.shape), f32), out.empty(tuple(Ad.shape), f32)
        keep, ptrs, ints = self._eac_inputs(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad)
        gh, gzd = _guarded(_unit_inner_stride(grad_hbar)), _guarded(_float_inner(grad_zd))
        self._launch("expand_act_combine_backward", "cuda_cpu_expand_act_combine_backward",
                     ctypes.c_int(_DTYPE_CODE[G.dtype]), ptrs, ints, float(scale),
                     ctypes.c_int(_ACTIVATIONS.index(activation_name)), float(dropout_p), seed, _ptr(gh), gh.stride(0),
                     _ptr(gzd), gzd.stride(0), _ptr(dG), _ptr(None if U is None else dU), _ptr(dzg), _ptr(dBg),
                     _ptr(dzu), _ptr(dBu), _ptr(dweights), _ptr(dAd))
        out.check("expand_act_combine_backward")
        return (dG, dU, _like_dtype(dzg, zg), _like_dtype(dBg, Bg), _like_dtype(dzu, zu), _like_dtype(dBu, Bu),
                _like_dtype(dweights, weights), _like_dtype(dAd, Ad))


def load(schedule_seed: int = 0) -> Kernels:
    return Kernels(build(), schedule_seed)

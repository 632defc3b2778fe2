"""Which implementation serves each `mixlora::` op, per device and dtype.

Implementations ("backends"):
    torch   the loop-simple pure-torch references in `mixlora_kernels.ops` (the float64 oracle): every op, device
            and dtype. fp64 inputs always get it.
    cpu     `mixlora_kernels.cpu`: the C++ kernels of the extension `mixlora_kernels._cpu` (csrc/cpu/), for CPU
            tensors. Where the extension is not built (or cannot load), the backend does not load: CPU tensors get
            the references, with a warning, and `load_errors()["cpu"]` says why.
    cuda    the compiled extension `mixlora_kernels._C`, for CUDA tensors.
    triton  `mixlora_kernels.triton`, for CUDA tensors.

`MIXLORA_BACKEND=auto|cuda|triton|torch` (default `auto`), read once at import:
    auto    CPU tensors get `cpu`; CUDA tensors get the loaded GPU backends in the order of the evidence (a GPU
            measurement in `measured_cost.json`, else the lower predicted time in `predicted_cost.json`, else
            cuda before triton), per op; a backend that cannot load is skipped, with a warning when a GPU is there.
    cuda, triton
            that backend's kernels for CUDA tensors where it has them, the reference elsewhere; one that cannot load
            raises. CPU tensors get `cpu`.
    torch   the references everywhere.
A backend that cannot load keeps its reason (`load_errors()`).

First-use self-check: the first time a kernel backend would serve an op for a (device, dtype), it runs once on small
random inputs (`mixlora_kernels.selftest`) against the reference on the same device; on an error or a mismatch beyond
the tolerance rule the op falls back to the next implementation in line, with a warning naming op, backend and error
(`fallbacks()` lists them). `MIXLORA_SELFTEST=0` turns the check off.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

from mixlora_kernels.selftest import check_against_reference

BACKENDS = ("auto", "cuda", "triton", "torch")
GPU_BACKENDS = ("cuda", "triton")
_HERE = Path(__file__).resolve().parent
MEASURED_COST = _HERE / "measured_cost.json"  # written from a GPU run (scripts/gpu_check.sh)
PREDICTED_COST = _HERE / "predicted_cost.json"  # written by `python -m benchmarks.sm90_cost`


class BackendWarning(UserWarning):
    """A kernel backend could not load, or failed its first-use self-check and was replaced."""


def requested_backend() -> str:
    name = os.environ.get("MIXLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MIXLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def selftest_enabled() -> bool:
    return os.environ.get("MIXLORA_SELFTEST", "1").strip() != "0"


def _load_cuda() -> Callable[[str], Callable | None]:
    importlib.import_module("mixlora_kernels._C")
    if not torch.cuda.is_available():
        raise ImportError("the CUDA extension is built but torch.cuda.is_available() is False")
    namespace = torch.ops.mixlora_cuda
    return lambda name: getattr(namespace, name) if hasattr(namespace, name) else None


def _load_triton() -> Callable[[str], Callable | None]:
    # Checked before importing triton: an import would build the kernels in compiled mode, and tests that run them
    # on the CPU under TRITON_INTERPRET=1 in the same process could no longer do so.
    if not torch.cuda.is_available():
        raise ImportError("torch.cuda.is_available() is False")
    importlib.import_module("triton")
    return importlib.import_module("mixlora_kernels.triton").KERNELS.get


def _load_cpu() -> Callable[[str], Callable | None]:
    module = importlib.import_module("mixlora_kernels.cpu")
    if module.EXTENSION_ERROR is not None:
        raise ImportError(f"the C++ CPU kernels (mixlora_kernels._cpu) cannot load: {module.EXTENSION_ERROR}")
    return module.KERNELS.get


_LOADERS = {"cuda": _load_cuda, "triton": _load_triton, "cpu": _load_cpu}


def evidence_order(loaded: list[str]) -> list[str]:
    """GPU backends by evidence: the lower whole-FFN fwd+bwd time in the GPU measurement, else in the prediction.

    Each file maps backend -> {str(T): ms}; backends are compared on the token counts both have (summed); a backend
    missing from the file keeps its place after those in it. Without either file: cuda, then triton.
    """
    for path in (MEASURED_COST, PREDICTED_COST):
        if path.is_file():
            times = json.loads(path.read_text())
            timed = [b for b in loaded if b in times]
            if timed:
                common = set.intersection(*(set(times[b]) for b in timed))
                timed.sort(key=lambda b: sum(times[b][t] for t in common))
                return timed + [b for b in loaded if b not in timed]
    return list(loaded)


def _load(requested: str) -> tuple[dict[str, Callable], dict[str, str]]:
    """(backend -> lookup op name -> implementation or None, backend -> why it did not load)."""
    wanted = {"auto": ["cuda", "triton", "cpu"], "torch": []}.get(requested, [requested, "cpu"])
    loaded, errors = {}, {}
    for name in wanted:
        try:
            loaded[name] = _LOADERS[name]()
        except Exception as err:  # noqa: BLE001  (whatever breaks a backend's import, the others still serve)
            errors[name] = f"{type(err).__name__}: {err}"
            if name == requested:
                raise RuntimeError(f"MIXLORA_BACKEND={requested} cannot load: {err}") from err
            if name == "cpu" or torch.cuda.is_available():
                warnings.warn(f"mixlora_kernels: backend {name!r} cannot load ({errors[name]}); "
                              "its ops fall back to the next backend", BackendWarning, stacklevel=3)
    return loaded, errors


_REQUESTED = requested_backend()
_LOADED, _LOAD_ERRORS = _load(_REQUESTED)
_GPU_ORDER = evidence_order([b for b in GPU_BACKENDS if b in _LOADED])

_OPS: dict[str, object] = {}  # op name -> the registered custom op
_REFERENCES: dict[str, Callable] = {}  # op name -> its pure-torch reference
_CHAINS: dict[tuple[str, str], list[tuple[str, Callable]]] = {}  # (op, device type) -> kernels in preference order
_REGISTERED: set[tuple[str, str]] = set()  # (op, device type) with `_dispatch` registered
_CHOSEN: dict[tuple, tuple[str, Callable]] = {}  # (op, device, dtype) -> what serves it, after the self-check
_FALLBACKS: list[dict[str, str]] = []


def _chain(name: str, backends: list[str]) -> list[tuple[str, Callable]]:
    """(backend, implementation of op `name`) for each of `backends` that is loaded and has the op, in order."""
    found = [(b, _LOADED[b](name)) for b in backends if b in _LOADED]
    return [(b, impl) for b, impl in found if impl is not None]


def _default_chains(name: str) -> dict[str, list[tuple[str, Callable]]]:
    if _REQUESTED == "torch":
        return {}
    return {"cuda": _chain(name, _GPU_ORDER), "cpu": _chain(name, ["cpu"])}


def _dtype_key(args) -> torch.dtype | None:
    """The precision class of a call: fp64 if any input is fp64, else its 16-bit dtype, else fp32 (None: no floats)."""
    dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
    for dtype in (torch.float64, torch.bfloat16, torch.float16, torch.float32):
        if dtype in dtypes:
            return dtype
    return None


def _device(args) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def _choose(name: str, device: torch.device, dtype: torch.dtype | None) -> tuple[str, Callable]:
    reference = ("torch", _REFERENCES[name])
    if dtype == torch.float64:
        return reference
    for backend, impl in _CHAINS.get((name, device.type), []):
        if not selftest_enabled():
            return backend, impl
        error = check_against_reference(name, impl, _REFERENCES[name], device, dtype or torch.float32)
        if error is None:
            return backend, impl
        _FALLBACKS.append({"op": name, "backend": backend, "device": str(device), "dtype": str(dtype),
                           "error": error})
        warnings.warn(f"mixlora::{name}: backend {backend!r} failed its self-check on {device} {dtype} and is not "
                      f"used for it: {error}", BackendWarning, stacklevel=4)
    return reference


def _dispatch(name: str) -> Callable:
    def run(*args, **kwargs):
        values = (*args, *kwargs.values())
        key = (name, _device(values), _dtype_key(values))
        chosen = _CHOSEN.get(key)
        if chosen is None:
            chosen = _CHOSEN[key] = _choose(*key)
        return chosen[1](*args, **kwargs)

    return run


def install(op, name: str, reference: Callable) -> None:
    """Serve `mixlora::<name>` (`op`, whose default implementation is `reference`) with the kernels of the loaded
    backends on the devices they cover (see the module docstring)."""
    _OPS[name], _REFERENCES[name] = op, reference
    for device_type, chain in _default_chains(name).items():
        _serve(name, device_type, chain)


def _serve(name: str, device_type: str, chain: list[tuple[str, Callable]]) -> None:
    """`device_type` tensors of op `name` go to the first of `chain` that passes its self-check (the reference
    when none does or the chain is empty); forgets earlier choices for them."""
    if chain and (name, device_type) not in _REGISTERED:
        _OPS[name].register_kernel(device_type)(_dispatch(name))  # stays registered; an empty chain means reference
        _REGISTERED.add((name, device_type))
    _CHAINS[(name, device_type)] = chain
    for key in [k for k in _CHOSEN if k[0] == name and k[1].type == device_type]:
        del _CHOSEN[key]


def loaded() -> list[str]:
    """Kernel backends loaded in this process (`cuda`, `triton` in the order `auto` prefers them, then `cpu`)."""
    return [b for b in (*_GPU_ORDER, "cpu") if b in _LOADED]


def load_errors() -> dict[str, str]:
    """Backend -> why it did not load (only backends this process tried)."""
    return dict(_LOAD_ERRORS)


def selected(device: str = "cuda") -> dict[str, str]:
    """Op name -> the backend that serves `device` tensors of 16/32-bit dtypes first (before its self-check;
    `torch` = the reference). fp64 always gets the reference."""
    return {name: next((b for b, _ in _CHAINS.get((name, device), [])), "torch") for name in _OPS}


def check_all(device: str = "cuda", dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> dict[str, dict]:
    """Run the first-use self-check now for every op on `device` in each of `dtypes` (what the first calls would do);
    returns op -> {dtype name: the backend that serves it}. Failures land in `fallbacks()`, with a warning each."""
    device = torch.device(device)
    out = {}
    for name in _OPS:
        out[name] = {}
        for dtype in dtypes:
            key = (name, device, None if name == "sort_slots" else dtype)
            if key not in _CHOSEN:
                _CHOSEN[key] = _choose(*key)
            out[name][str(dtype).removeprefix("torch.")] = _CHOSEN[key][0]
    return out


def fallbacks() -> list[dict[str, str]]:
    """The self-check failures of this process: op, backend, device, dtype and the error, in order."""
    return list(_FALLBACKS)


@contextlib.contextmanager
def use(backend: str) -> Iterator[dict[str, str]]:
    """Inside the block, serve the tensors of `backend`'s device (CUDA for `cuda`/`triton`, CPU for `cpu`, both for
    `torch`) with its kernels where it has the op and the reference elsewhere; yields op -> backend for that device.
    The import-time choice comes back on exit. For comparing backends in one process (benchmarks, tests); model code
    never calls it."""
    if backend != "torch" and backend not in _LOADED:
        raise ValueError(f"backend {backend!r} is not loaded here; loaded: {sorted(_LOADED) or 'none'}")
    saved_chains, saved_chosen = dict(_CHAINS), dict(_CHOSEN)
    device_types = {"torch": ("cuda", "cpu"), "cpu": ("cpu",)}.get(backend, ("cuda",))
    for name in _OPS:
        chain = _chain(name, [backend]) if backend != "torch" else []
        for device_type in device_types:
            _serve(name, device_type, chain)
    try:
        yield selected("cpu" if backend == "cpu" else "cuda")
    finally:
        _CHAINS.clear()
        _CHAINS.update(saved_chains)
        _CHOSEN.clear()
        _CHOSEN.update(saved_chosen)

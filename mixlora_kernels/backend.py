"""Backend choice for the `mixlora::` ops, made once at import.

`MIXLORA_BACKEND=auto|cuda|triton|torch` (default `auto`). Every op's default implementation is its pure-torch
reference; a faster backend is installed on top of it for CUDA tensors only. `auto` prefers the compiled extension,
then Triton, per op (an op the preferred backend does not implement falls back to the next one); an explicit
`cuda` or `triton` that cannot load raises. `selected()` says what each op got.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Iterator

BACKENDS = ("auto", "cuda", "triton", "torch")


def _load_cuda() -> object:
    """The compiled extension's op namespace `torch.ops.mixlora_cuda`; raises ImportError when it is not built."""
    import torch

    importlib.import_module("mixlora_kernels._C")
    if not torch.cuda.is_available():
        raise ImportError("the CUDA extension is built but torch.cuda.is_available() is False")
    return torch.ops.mixlora_cuda


def _load_triton() -> object:
    """The `mixlora_kernels.triton` package; raises ImportError when Triton or a GPU is missing."""
    import torch

    # Checked before importing triton: an import would build the kernels in compiled mode, and tests that run them
    # on the CPU under TRITON_INTERPRET=1 in the same process could no longer do so.
    if not torch.cuda.is_available():
        raise ImportError("torch.cuda.is_available() is False")
    importlib.import_module("triton")
    return importlib.import_module("mixlora_kernels.triton")


def requested_backend() -> str:
    name = os.environ.get("MIXLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MIXLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _available(requested: str) -> dict[str, object]:
    """Loaded backends in preference order; an explicit request that cannot load raises."""
    loaders = {"cuda": _load_cuda, "triton": _load_triton}
    order = ["cuda", "triton"] if requested == "auto" else ([requested] if requested != "torch" else [])
    found: dict[str, object] = {}
    for name in order:
        try:
            found[name] = loaders[name]()
        except ImportError as err:
            if requested != "auto":
                raise RuntimeError(f"MIXLORA_BACKEND={requested} cannot load: {err}") from err
    return found


_REQUESTED = requested_backend()
_LOADED = _available(_REQUESTED)
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}  # op name -> loaded backend -> implementation
_SELECTED: dict[str, str] = {}  # op name -> backend serving CUDA tensors now
_OPS: dict[str, object] = {}


def _implementation(backend: str, module: object, name: str) -> Callable | None:
    """The backend's implementation of `mixlora::<name>`, or None when it has none.

    The extension registers `torch.ops.mixlora_cuda.<name>`; the Triton package lists its launchers in `KERNELS`.
    """
    if backend == "cuda":
        return getattr(module, name) if hasattr(module, name) else None
    return module.KERNELS.get(name)


def install(op, name: str) -> None:
    """Install the best available implementation of `mixlora::<name>` for CUDA tensors (see module docstring)."""
    found = {b: impl for b, module in _LOADED.items() if (impl := _implementation(b, module, name)) is not None}
    if not found and _REQUESTED in ("cuda", "triton"):
        raise RuntimeError(f"MIXLORA_BACKEND={_REQUESTED} does not implement mixlora::{name}")
    _OPS[name], _IMPLEMENTATIONS[name] = op, found
    _SELECTED[name] = next(iter(found), "torch")
    if found:
        # One registered kernel that looks the backend up per call, so `use()` can switch it.
        op.register_kernel("cuda")(lambda *a, **kw: _IMPLEMENTATIONS[name][_SELECTED[name]](*a, **kw))


def loaded() -> list[str]:
    """Kernel backends loaded in this process (`cuda`, `triton`), in preference order; `torch` is always there."""
    return list(_LOADED)


def selected() -> dict[str, str]:
    """Op name -> backend serving CUDA tensors (`torch` = the reference). CPU tensors always get the reference."""
    return dict(_SELECTED)


@contextlib.contextmanager
def use(backend: str) -> Iterator[dict[str, str]]:
    """Serve CUDA tensors of every op with `backend` (`torch`, or a loaded `cuda`/`triton`) inside the block; ops the
    backend lacks get the reference. Yields op -> backend; the import-time choice comes back on exit. For comparing
    backends in one process (benchmarks, tests); model code never calls it."""
    if backend != "torch" and backend not in _LOADED:
        raise ValueError(f"backend {backend!r} is not loaded here; loaded: {sorted(_LOADED) or 'none'}")
    before = dict(_SELECTED)
    with contextlib.ExitStack() as stack:
        for name, op in _OPS.items():
            if backend in _IMPLEMENTATIONS[name]:
                _SELECTED[name] = backend
            else:
                _SELECTED[name] = "torch"
                if _IMPLEMENTATIONS[name]:
                    stack.enter_context(op.set_kernel_enabled("cuda", False))
        try:
            yield dict(_SELECTED)
        finally:
            _SELECTED.update(before)

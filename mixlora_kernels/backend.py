"""Backend choice for the `mixlora::` ops, made once at import.

`MIXLORA_BACKEND=auto|cuda|triton|torch` (default `auto`). Every op's default implementation is its pure-torch
reference; a faster backend is installed on top of it for CUDA tensors only. `auto` prefers the compiled extension,
then Triton, per op (an op the preferred backend does not implement falls back to the next one); an explicit
`cuda` or `triton` that cannot load raises. `selected()` says what each op got.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

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
_SELECTED: dict[str, str] = {}


def _implementation(backend: str, module: object, name: str) -> Callable | None:
    """The backend's implementation of `mixlora::<name>`, or None when it has none.

    The extension registers `torch.ops.mixlora_cuda.<name>`; the Triton package lists its launchers in `KERNELS`.
    """
    if backend == "cuda":
        return getattr(module, name) if hasattr(module, name) else None
    return module.KERNELS.get(name)


def install(op, name: str) -> None:
    """Install the best available implementation of `mixlora::<name>` for CUDA tensors (see module docstring)."""
    for backend, module in _LOADED.items():
        impl = _implementation(backend, module, name)
        if impl is not None:
            op.register_kernel("cuda")(impl)
            _SELECTED[name] = backend
            return
    if _REQUESTED in ("cuda", "triton"):
        raise RuntimeError(f"MIXLORA_BACKEND={_REQUESTED} does not implement mixlora::{name}")
    _SELECTED[name] = "torch"


def selected() -> dict[str, str]:
    """Op name -> backend serving CUDA tensors (`torch` = the reference). CPU tensors always get the reference."""
    return dict(_SELECTED)

"""The C++ CPU kernels: the extension `mixlora_kernels._cpu` (csrc/cpu/, built by setup.py wherever a C++ compiler
works), which registers `torch.ops.mixlora_cpu.*` for CPU tensors. Imported once; `ERROR` says why it did not load
(None when it did), and `mixlora_kernels.backend` reports that as a load error with a BackendWarning."""

from __future__ import annotations

import importlib

import torch

NAME = "mixlora_kernels._cpu"

try:
    importlib.import_module(NAME)
    ops = torch.ops.mixlora_cpu
    ERROR: str | None = None
except Exception as err:  # noqa: BLE001  (not built, built for another torch, no OpenMP runtime: the kernels say why)
    ops = None
    hint = ("not built: `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` builds it "
            "where a C++ compiler works" if isinstance(err, ModuleNotFoundError) else "rebuild it for this torch")
    ERROR = f"{type(err).__name__}: {err} ({hint})"

"""Shared by the benchmarks and tests/test_benchmark_memory.py: device choice, the environment record, the
correctness guard, saved-for-backward and peak-memory measurements, and the scoped choice of the op backend."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import pytest
import torch
from torch import nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MIB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short commit of the working tree, `+dirty` when tracked files differ from it; `unknown` without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment() -> dict:
    """What a result depends on: device, versions, commit, the op backend each `mixlora::` op got."""
    from mixlora_kernels import selected_backends

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "commit": git_commit(), "backends": selected_backends()}


# ---------------------------------------------------------------------------------------------------------------------
# Correctness guard

def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (Frobenius): one number that does not depend on the output's scale."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_close(what: str, out: torch.Tensor, ref64: torch.Tensor, tolerance: float) -> float:
    """Fail (not skip) the benchmark when `out` is further than `tolerance` (relative) from the float64 oracle."""
    err = relative_error(out, ref64)
    if not err <= tolerance:  # also catches NaN
        pytest.fail(f"{what}: relative error {err:.3e} against the float64 oracle exceeds {tolerance:.1e}")
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Memory

@dataclass(frozen=True)
class SavedTensor:
    nbytes: int  # of the whole storage (a saved view keeps its storage alive)
    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: str  # innermost non-torch frame that saved it: file:line function


def _origin() -> str:
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for marker in ("/site-packages/", ROOT + os.sep):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{frame.f_lineno} {frame.f_code.co_name}"


def saved_tensors(run: Callable[[], object], modules: Iterable[nn.Module]) -> list[SavedTensor]:
    """The activations autograd saves for backward while `run()` builds its graph, one entry per unique storage.

    Storages of the parameters of `modules` are excluded: frozen weights saved by F.linear (or views of them, such as
    one expert's slice of a stacked LoRA A) are not activation memory. Inputs saved by the first op count, as they do
    for every provider.
    """
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    found: dict[int, SavedTensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in params and ptr not in found:
            found[ptr] = SavedTensor(storage.nbytes(), tuple(t.shape), t.dtype, _origin())
        return t

    # The graph built by run() (and so every saved storage) stays alive until run() returns, so a storage address
    # cannot be reused by another saved tensor during the count.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return list(found.values())


def saved_bytes(run: Callable[[], object], modules: Iterable[nn.Module]) -> int:
    return sum(t.nbytes for t in saved_tensors(run, modules))


def describe_saved(tensors: list[SavedTensor]) -> str:
    """A table of saved tensors, largest first, for failure messages."""
    rows = sorted(tensors, key=lambda t: -t.nbytes)
    return "\n".join(f"{t.nbytes / MIB:9.3f} MiB  {str(t.shape):<22} {str(t.dtype):<15} {t.origin}" for t in rows)


def peak_memory(run: Callable[[], object]) -> int | None:
    """CUDA: peak bytes allocated by `run()` above what was allocated before it (inputs, weights). None on CPU."""
    if DEVICE.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


# ---------------------------------------------------------------------------------------------------------------------
# Op backends

def kernel_backends() -> list[str]:
    """Kernel backends (`cuda`, `triton`) loaded on this machine."""
    from mixlora_kernels import backend

    return backend.loaded()


@contextlib.contextmanager
def registry_backend(name: str) -> Iterator[dict[str, str]]:
    """Serve CUDA tensors of every `mixlora::` op with backend `name` (`torch` = the reference) for the duration of
    the block (`mixlora_kernels.backend.use`); yields op -> backend. On CPU every op runs its reference anyway."""
    from mixlora_kernels import backend

    if DEVICE.type != "cuda":
        yield {op: "torch" for op in backend.selected()}
        return
    with backend.use(name) as used:
        yield used

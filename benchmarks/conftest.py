"""pytest setup for the benchmarks: collect `bench_*.py`, make the repository root importable (the `naive` providers
import `tests.reference`, so benchmark and tests share one oracle), and record the device in the JSON's machine_info.

`benchmarks/` is outside the pytest testpaths, so `python -m pytest` never collects it.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks.common import environment

    machine_info["mixlora"] = environment()


@pytest.fixture(autouse=True)
def _release_memory():
    """Free each benchmark's models before the next one builds its own: the naive providers hold reference cycles
    (moe.forward -> partial -> moe), which only the cycle collector frees; on the GPU they are gigabytes."""
    yield
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""setup.py's decision to build the CUDA extension: only where a GPU is visible unless asked (MIXLORA_BUILD_CUDA=1),
never with MIXLORA_SKIP_CUDA_BUILD=1; the decision is printed. `python setup.py --version` makes the decision and
prints it without compiling anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _decision(tmp_path, fake_gpu: bool = False, **env) -> str:
    path = os.environ["PATH"]
    if fake_gpu:  # an nvidia-smi that lists one GPU, first on PATH
        tool = tmp_path / "nvidia-smi"
        tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
        tool.chmod(0o755)
        path = f"{tmp_path}{os.pathsep}{path}"
    clean = {k: v for k, v in os.environ.items() if k not in ("MIXLORA_BUILD_CUDA", "MIXLORA_SKIP_CUDA_BUILD")}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, "PATH": path, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "the CUDA extension mixlora_kernels._C" in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a GPU is visible here")
def test_no_gpu_no_build(tmp_path):
    assert "not building the CUDA extension mixlora_kernels._C: no CUDA GPU is visible" in _decision(tmp_path)


def test_a_visible_gpu_builds(tmp_path):
    assert "building the CUDA extension mixlora_kernels._C: a CUDA GPU is visible (GPU 0: NVIDIA H200" in \
        _decision(tmp_path, fake_gpu=True)


def test_asked_builds_and_skip_wins(tmp_path):
    assert "building the CUDA extension mixlora_kernels._C: MIXLORA_BUILD_CUDA=1" in \
        _decision(tmp_path, MIXLORA_BUILD_CUDA="1")
    assert "not building the CUDA extension mixlora_kernels._C: MIXLORA_SKIP_CUDA_BUILD=1" in \
        _decision(tmp_path, fake_gpu=True, MIXLORA_BUILD_CUDA="1", MIXLORA_SKIP_CUDA_BUILD="1")

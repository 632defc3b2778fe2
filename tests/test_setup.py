"""setup.py's decisions to build the extensions, printed: the CUDA extension only where a GPU is visible unless asked
(MIXLORA_BUILD_CUDA=1), never with MIXLORA_SKIP_CUDA_BUILD=1; the CPU extension wherever a C++ compiler is, unless
MIXLORA_SKIP_CPU_BUILD=1, and a warning instead of a failed install where the compiler is missing or fails.
`python setup.py --version` makes the decisions and prints them without compiling anything."""

from __future__ import annotations

import os
import shutil
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


# --- the CPU extension mixlora_kernels._cpu: built by default where a C++ compiler is, a warning where none works ----


def _cpu_decision(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MIXLORA_SKIP_CPU_BUILD", "CXX")}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "the CPU extension mixlora_kernels._cpu" in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler here")
def test_cpu_extension_built_by_default_and_skip_wins():
    assert "building the CPU extension mixlora_kernels._cpu (C++ compiler " in _cpu_decision()
    assert "not building the CPU extension mixlora_kernels._cpu: MIXLORA_SKIP_CPU_BUILD=1" in \
        _cpu_decision(MIXLORA_SKIP_CPU_BUILD="1")


def test_no_compiler_no_cpu_extension_with_a_warning():
    line = _cpu_decision(CXX="/nonexistent/c++")
    assert line.startswith("WARNING (mixlora-kernels setup.py): not building the CPU extension "
                           "mixlora_kernels._cpu: no C++ compiler ('/nonexistent/c++' is not on PATH"), line


def _copy_for_build(tmp_path):
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc", "cpu"), tmp_path / "csrc" / "cpu")
    (tmp_path / "mixlora_kernels").mkdir()
    (tmp_path / "mixlora_kernels" / "__init__.py").write_text("")


def _build_with(tmp_path, compiler):
    env = {k: v for k, v in os.environ.items() if k not in ("MIXLORA_SKIP_CPU_BUILD", "MIXLORA_BUILD_CUDA")}
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True,
                          text=True, env={**env, "CXX": str(compiler), "CC": str(compiler),
                                          "MIXLORA_SKIP_CUDA_BUILD": "1"}, timeout=600)


def test_a_failing_compiler_installs_without_the_cpu_extension(tmp_path):
    """A compiler that fails its probe: setup.py warns and finishes (exit 0) without the extension. Run on a copy of
    setup.py and csrc/cpu/ (whatever the build writes stays there)."""
    _copy_for_build(tmp_path)
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'broken-c++: this compiler does not work' >&2\nexit 1\n")
    broken.chmod(0o755)
    result = _build_with(tmp_path, broken)
    assert result.returncode == 0, result.stderr
    assert ("not building the CPU extension mixlora_kernels._cpu: no working C++ compiler "
            f"({broken} --version exited with 1: broken-c++: this compiler does not work)") in result.stderr, \
        result.stderr
    assert not list((tmp_path / "mixlora_kernels").glob("_cpu*.so"))


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler here")
def test_a_compile_error_installs_without_the_cpu_extension(tmp_path):
    """A compiler that passes the probe but fails on the kernels' sources: the build warns and finishes (exit 0)."""
    _copy_for_build(tmp_path)
    picky = tmp_path / "picky-c++"
    picky.write_text(f"#!/bin/sh\ncase \"$*\" in *csrc/cpu/*) echo 'picky-c++: error' >&2; exit 1;; esac\n"
                     f"exec {shutil.which('c++')} \"$@\"\n")
    picky.chmod(0o755)
    result = _build_with(tmp_path, picky)
    assert result.returncode == 0, result.stderr
    assert "building the CPU extension mixlora_kernels._cpu (C++ compiler " in result.stderr, result.stderr
    assert "WARNING (mixlora-kernels setup.py): building the CPU extension mixlora_kernels._cpu failed" in \
        result.stderr, result.stderr
    assert not list((tmp_path / "mixlora_kernels").glob("_cpu*.so"))

"""Build of mixlora-kernels: the Python packages, plus the CUDA extension ``mixlora_kernels._C`` where possible.

Metadata lives in pyproject.toml; this file only decides whether and how to build the extension. It imports
torch, so install without build isolation:

    pip install --no-build-isolation -e .          # editable; the .so lands next to mixlora_kernels/__init__.py
    python setup.py build_ext --inplace             # rebuild the extension in place

The extension is built when a CUDA GPU is visible (`nvidia-smi -L` lists one, or /dev/nvidia0 exists), or when asked
with MIXLORA_BUILD_CUDA=1 (CI does, as a compile check): on a machine without a GPU it could not run, and compiling
it takes 10+ minutes of two CPU cores. The decision is printed (pip shows it with -v). Object files are kept in
build/cuda-ext/ under the repository, so a re-install (pip's editable build starts in a fresh temporary directory)
recompiles only the sources that changed; that needs ninja (`pip install ninja`), without it torch rebuilds all.

Environment:
    MIXLORA_BUILD_CUDA=1        build the extension even when no GPU is visible (needs nvcc)
    MIXLORA_SKIP_CUDA_BUILD=1   install as pure Python, without the extension (wins over MIXLORA_BUILD_CUDA)
    MIXLORA_CUDA_ARCHS="80;90"  compute capabilities to build SASS for (also "8.0", "90a"; ";", "," or space
                                separated); PTX of the highest one is embedded so newer GPUs can JIT it
    MAX_JOBS=N                  parallel compile jobs (read by torch's ninja build)
    CUDA_HOME / CUDA_PATH       CUDA toolkit; otherwise found from nvcc on PATH or /usr/local/cuda

Without nvcc or without a CUDA build of torch it warns and installs as pure Python; the torch / Triton
backends of the ops still work then.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXTENSION = "mixlora_kernels._C"
DEFAULT_CUDA_ARCHS = "80;90"
# Kept between installs so that ninja recompiles only changed sources; `build/` is in .gitignore.
BUILD_TEMP = ROOT / "build" / "cuda-ext"


def warn(message):
    print(f"\nWARNING (mixlora-kernels setup.py): {message}\n", file=sys.stderr)


def find_cuda_home():
    """The first candidate that holds bin/nvcc and include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME as the parent of the nvcc on PATH, which is wrong when that nvcc is a wrapper
    script or symlink outside the toolkit (e.g. /usr/local/bin/nvcc), so check each guess.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in filter(None, candidates):
        home = Path(candidate)
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            return str(home)
        if candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
            warn(f"CUDA_HOME/CUDA_PATH {candidate!r} has no bin/nvcc or include/cuda_runtime.h; looking elsewhere")
    return None


def gencode_flags(spec):
    """nvcc -gencode flags for MIXLORA_CUDA_ARCHS: SASS for each arch, PTX for the highest."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        arch = item.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(
                f"MIXLORA_CUDA_ARCHS: {item!r} is not a compute capability; expected e.g. '80', '8.0' or '90a'"
            )
        archs.append(arch)
    if not archs:
        raise ValueError(f"MIXLORA_CUDA_ARCHS: no compute capability in {spec!r}; expected e.g. '80;90'")
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # Arch-specific targets (90a, 100f) have no forward-compatible PTX; take the highest plain one.
    plain = [arch for arch in archs if arch.isdigit()]
    if plain:
        highest = max(plain, key=int)
        flags += ["-gencode", f"arch=compute_{highest},code=compute_{highest}"]
    return flags


def visible_gpu():
    """A description of the first CUDA GPU this machine shows (`nvidia-smi -L`, else /dev/nvidia0), or None."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is not None:
        try:
            result = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            result = None
        if result is not None and result.returncode == 0:
            gpus = [line.strip() for line in result.stdout.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus[0]
    if os.path.exists("/dev/nvidia0"):
        return "/dev/nvidia0"
    return None


def build_decision():
    """(build the CUDA extension?, why), from MIXLORA_SKIP_CUDA_BUILD, MIXLORA_BUILD_CUDA and the visible GPUs."""
    if os.environ.get("MIXLORA_SKIP_CUDA_BUILD", "0") == "1":
        return False, "MIXLORA_SKIP_CUDA_BUILD=1"
    if os.environ.get("MIXLORA_BUILD_CUDA", "0") == "1":
        return True, "MIXLORA_BUILD_CUDA=1"
    gpu = visible_gpu()
    if gpu is not None:
        return True, f"a CUDA GPU is visible ({gpu})"
    return False, ("no CUDA GPU is visible (nvidia-smi -L lists none, no /dev/nvidia0); set MIXLORA_BUILD_CUDA=1 to "
                   "build it anyway")


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with a message saying why not."""
    build, why = build_decision()
    if not build:
        print(f"mixlora-kernels: not building the CUDA extension {EXTENSION}: {why}; installing as pure Python "
              "(the torch and Triton backends of the ops remain)", file=sys.stderr)
        return [], {}
    print(f"mixlora-kernels: building the CUDA extension {EXTENSION}: {why}", file=sys.stderr)

    cuda_home = find_cuda_home()
    if cuda_home is None:
        warn("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): installing without the CUDA "
             "extension mixlora_kernels._C; the torch/Triton backends remain available.")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as error:
        warn(f"torch cannot be imported ({error}): installing without the CUDA extension. Install torch "
             "first and build with `pip install --no-build-isolation ...`.")
        return [], {}
    if torch.version.cuda is None:
        warn(f"torch {torch.__version__} is not a CUDA build: installing without the CUDA extension.")
        return [], {}

    sources = ["csrc/api.cpp"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cu"))
    archs = os.environ.get("MIXLORA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    print(f"mixlora-kernels: building {EXTENSION} with nvcc from {cuda_home} (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}) for archs {archs!r}, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}",
          file=sys.stderr)
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14, C++17 before).
    # No --use_fast_math: the kernels must match the torch references exactly.
    extension = CUDAExtension(
        name=EXTENSION,
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + gencode_flags(archs),
        },
    )

    class PersistentBuildExtension(BuildExtension):
        """BuildExtension with its objects in BUILD_TEMP (not pip's temporary directory), for incremental builds."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(BUILD_TEMP)

    return [extension], {"build_ext": PersistentBuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

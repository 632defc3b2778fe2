"""Build of mixlora-kernels: the Python packages, plus two extensions where they can be built:

    mixlora_kernels._cpu   the C++ CPU kernels (csrc/cpu/), built by default wherever a C++ compiler works
    mixlora_kernels._C     the CUDA extension (csrc/), where a GPU is visible or when asked

Metadata lives in pyproject.toml; this file only decides whether and how to build the extensions. It imports
torch, so install without build isolation:

    pip install --no-build-isolation -e .          # editable; the .so files land next to mixlora_kernels/__init__.py
    python setup.py build_ext --inplace             # rebuild the extensions in place

The CPU extension needs only the C++ compiler torch's extensions use ($CXX, else c++) and OpenMP (GCC's -fopenmp on
Linux); it takes about 2 minutes of one core. Without a compiler, or when its build fails, setup.py warns and
installs without it: CPU tensors then get the pure-torch references of the ops, 1.7-2.5x slower on a training step
(mixlora_kernels.backend.load_errors() says why). Its objects are kept in build/cpu-ext/.

The CUDA extension is built when a CUDA GPU is visible (`nvidia-smi -L` lists one, or /dev/nvidia0 exists), or when
asked with MIXLORA_BUILD_CUDA=1 (CI does, as a compile check): on a machine without a GPU it could not run, and
compiling it takes 10+ minutes of two CPU cores. The decisions are printed (pip shows them with -v). Object files are
kept in build/cuda-ext/ under the repository, so a re-install (pip's editable build starts in a fresh temporary
directory) recompiles only the sources that changed; that needs ninja (`pip install ninja`), without it torch
rebuilds all.

Environment:
    MIXLORA_SKIP_CPU_BUILD=1    install without the CPU extension
    MIXLORA_BUILD_CUDA=1        build the CUDA extension even when no GPU is visible (needs nvcc)
    MIXLORA_SKIP_CUDA_BUILD=1   install without the CUDA extension (wins over MIXLORA_BUILD_CUDA)
    MIXLORA_CUDA_ARCHS="80;90"  compute capabilities to build SASS for (also "8.0", "90a"; ";", "," or space
                                separated); PTX of the highest one is embedded so newer GPUs can JIT it
    MAX_JOBS=N                  parallel compile jobs (read by torch's ninja build)
    CXX                         the C++ compiler (torch's default: c++)
    CUDA_HOME / CUDA_PATH       CUDA toolkit; otherwise found from nvcc on PATH or /usr/local/cuda

Without nvcc or without a CUDA build of torch it warns and installs without the CUDA extension; the torch / Triton
backends of the ops still work then.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXTENSION = "mixlora_kernels._C"
CPU_EXTENSION = "mixlora_kernels._cpu"
DEFAULT_CUDA_ARCHS = "80;90"
# Kept between installs so that ninja recompiles only changed sources; `build/` is in .gitignore.
BUILD_TEMP = {EXTENSION: ROOT / "build" / "cuda-ext", CPU_EXTENSION: ROOT / "build" / "cpu-ext"}


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
    """[the CUDA extension], or [] with a message saying why not."""
    build, why = build_decision()
    if not build:
        print(f"mixlora-kernels: not building the CUDA extension {EXTENSION}: {why}; installing without it "
              "(the torch and Triton backends of the ops remain)", file=sys.stderr)
        return []
    print(f"mixlora-kernels: building the CUDA extension {EXTENSION}: {why}", file=sys.stderr)

    cuda_home = find_cuda_home()
    if cuda_home is None:
        warn("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): installing without the CUDA "
             "extension mixlora_kernels._C; the torch/Triton backends remain available.")
        return []
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

    try:
        import torch
        from torch.utils.cpp_extension import CUDAExtension
    except ImportError as error:
        warn(f"torch cannot be imported ({error}): installing without the CUDA extension. Install torch "
             "first and build with `pip install --no-build-isolation ...`.")
        return []
    if torch.version.cuda is None:
        warn(f"torch {torch.__version__} is not a CUDA build: installing without the CUDA extension.")
        return []

    sources = ["csrc/api.cpp"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cu"))
    archs = os.environ.get("MIXLORA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    print(f"mixlora-kernels: building {EXTENSION} with nvcc from {cuda_home} (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}) for archs {archs!r}, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}",
          file=sys.stderr)
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14, C++17 before).
    # No --use_fast_math: the kernels must match the torch references exactly.
    return [CUDAExtension(
        name=EXTENSION,
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + gencode_flags(archs),
        },
    )]


def openmp_flags():
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def compiler_problem(command):
    """Why `command` (the C++ compiler) cannot build the CPU extension, or None: it must report its version (torch's
    build asks) and compile a file that includes <omp.h> with the extension's OpenMP flags."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text("#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n")
        for args in (["--version"], ["-c", str(source), "-o", str(Path(tmp) / "probe.o")] + openmp_flags()):
            try:
                result = subprocess.run(command + args, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                return f"{' '.join(command + args)}: {error}"
            if result.returncode != 0:
                output = (result.stderr or result.stdout).strip().splitlines()
                return f"{' '.join(command + args)} exited with {result.returncode}: {output[-1] if output else ''}"
    return None


def cpu_build_decision():
    """(build the CPU extension?, why), from MIXLORA_SKIP_CPU_BUILD and the C++ compiler torch would use."""
    if os.environ.get("MIXLORA_SKIP_CPU_BUILD", "0") == "1":
        return False, "MIXLORA_SKIP_CPU_BUILD=1"
    compiler = os.environ.get("CXX", "c++")
    command = shlex.split(compiler)
    found = shutil.which(command[0]) if command else None
    if found is None:
        return False, f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    problem = compiler_problem([found] + command[1:])
    if problem is not None:
        return False, f"no working C++ compiler ({problem})"
    return True, f"C++ compiler {found}"


def cpu_extension():
    """[the CPU extension], or [] with a message saying why not."""
    build, why = cpu_build_decision()
    if not build:
        message = (f"not building the CPU extension {CPU_EXTENSION}: {why}; CPU tensors get the ops' pure-torch "
                   "references")
        if why.startswith("no "):
            warn(message)
        else:
            print(f"mixlora-kernels: {message}", file=sys.stderr)
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as error:
        warn(f"torch cannot be imported ({error}): installing without the CPU extension {CPU_EXTENSION}. Install "
             "torch first and build with `pip install --no-build-isolation ...`.")
        return []
    print(f"mixlora-kernels: building the CPU extension {CPU_EXTENSION} ({why})", file=sys.stderr)
    # GCC multiversions the elementwise loops itself (csrc/cpu/cpu_common.h): no -march. No -ffast-math: the
    # kernels keep IEEE semantics (NaN propagation); contracting a*b+c into an FMA is allowed.
    openmp = openmp_flags()
    return [CppExtension(
        name=CPU_EXTENSION,
        sources=sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
        include_dirs=[str(ROOT / "csrc" / "cpu")],
        extra_compile_args=["-O3", "-ffp-contract=fast"] + openmp,
        extra_link_args=openmp,
    )]


def build_ext_command():
    """torch's BuildExtension, with each extension's objects in BUILD_TEMP (not pip's temporary directory, for
    incremental builds), and a failed CPU extension a warning instead of an error."""
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extension(self, ext):
            self.build_temp = str(BUILD_TEMP[ext.name])
            if ext.name != CPU_EXTENSION:
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as error:  # noqa: BLE001  (a compiler that does not work: install without it)
                warn(f"building the CPU extension {CPU_EXTENSION} failed ({type(error).__name__}: {error}); "
                     "installing without it: CPU tensors get the ops' pure-torch references. The compiler "
                     "output is above.")
                # Rebound, not edited: the loop that called us iterates the old list; what follows (the in-place
                # copy, the outputs of an editable install) no longer expects the library.
                self.extensions = [e for e in self.extensions if e is not ext]
                return None

    return Build


# The CUDA extension is decided first: it sets CUDA_HOME, which torch.utils.cpp_extension reads once, at its import
# (the CPU extension's import of it would otherwise fix CUDA_HOME to None and drop the CUDA headers).
cuda_modules = cuda_extension()
ext_modules = cpu_extension() + cuda_modules
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_command()} if ext_modules else {})

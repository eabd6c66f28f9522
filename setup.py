"""Build script. The package is pure Python; the compiled kernels are optional extras.

- ``belay_kernels._C``: the ops' schemas and CPU kernels. Built wherever a C++ compiler
  and torch are present.
- ``belay_kernels._C_cuda``: the CUDA kernels. Built whenever nvcc (CUDA_HOME) and a CUDA
  build of torch are present; no GPU is needed. Arch list: $TORCH_CUDA_ARCH_LIST, default
  ``7.5;8.0;9.0+PTX``: sm_75 (T4, the oldest CUDA 13 targets: no sm_70 for V100), sm_80
  (whose code also runs on sm_86/sm_89), sm_90, and PTX for newer GPUs.

Environment:
  BELAY_KERNELS_CPP=0|1    skip the C++ extension / require it (a failure fails the build)
  BELAY_KERNELS_CUDA=0|1   skip the CUDA extension / require it (a failure fails the build)
  unset                    build what this machine can; a failure is a warning, and the
                           package falls back to the torch reference at run time.
  MAX_JOBS                 parallel compile jobs (torch's ninja build).

Development build, in place:  python setup.py build_ext --inplace
"""

import os
import sys

from setuptools import setup

DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"
CPU_SOURCES = ["csrc/registration.cpp", "csrc/cpu_kernels.cpp", "csrc/cpu_module.cpp"]
CUDA_SOURCES = ["csrc/cuda_kernels.cu", "csrc/cuda_module.cpp"]
# -fno-trapping-math lets GCC turn the per-element choices (lerp's two sides, the
# non-finite policy) into vector selects; nothing here relies on floating-point traps.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def _choice(name):
    """'0' (skip), '1' (required) or None (build if possible, failures are warnings)."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"{name} must be 0, 1 or unset, got {value!r}")
    return value or None


def _extensions():
    cpp, cuda = _choice("BELAY_KERNELS_CPP"), _choice("BELAY_KERNELS_CUDA")
    if cpp == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if cpp == "1":
            raise
        print(f"belay_kernels: torch is not importable ({exc}); building without kernels")
        return [], {}

    extensions = [
        cpp_extension.CppExtension(
            "belay_kernels._C",
            CPU_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
            optional=cpp != "1",
        )
    ]
    cuda_missing = []
    if torch.version.cuda is None:
        cuda_missing.append("torch is not a CUDA build")
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        cuda_missing.append("no CUDA toolkit found (set CUDA_HOME to the toolkit root)")
    elif not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        cuda_missing.append(
            f"CUDA_HOME={cuda_home} is not a toolkit root (no include/cuda_runtime.h); "
            "set CUDA_HOME to it, e.g. /usr/local/cuda-13.0"
        )
    if cuda == "1" and cuda_missing:
        sys.exit("BELAY_KERNELS_CUDA=1 but " + "; ".join(cuda_missing))
    if cuda != "0" and not cuda_missing:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        extensions.append(
            cpp_extension.CUDAExtension(
                "belay_kernels._C_cuda",
                CUDA_SOURCES,
                extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
                optional=cuda != "1",
            )
        )
    elif cuda != "0":
        print("belay_kernels: not building the CUDA kernels: " + "; ".join(cuda_missing))

    class BuildOptionalExtensions(cpp_extension.BuildExtension):
        """torch's build, where an extension marked optional may fail with a warning."""

        def build_extensions(self):
            try:  # torch checks the compiler here, before any extension is built
                super().build_extensions()
            except Exception as exc:
                if not all(ext.optional for ext in self.extensions):
                    raise
                print(f"WARNING: belay_kernels: no compiled kernels ({exc}); the package "
                      "works without them (backend 'torch').")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ext.optional:
                    raise
                print(
                    f"WARNING: belay_kernels: building {ext.name} failed ({exc}); the "
                    "package works without it (backend 'torch')."
                )

    return extensions, {"build_ext": BuildOptionalExtensions.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script. The package is pure Python; the compiled kernels are optional extras.

- ``belay_kernels._C``: the ops' schemas and CPU kernels. Built wherever a C++ compiler
  and torch are present.
- ``belay_kernels._C_cuda``: the CUDA kernels. Built whenever a CUDA toolkit and a CUDA
  build of torch are present; no GPU is needed. The toolkit is $CUDA_HOME when set, else
  the real toolkit behind the ``nvcc`` on PATH (a wrapper script or symlink is followed),
  else /usr/local/cuda*. Arch list: $TORCH_CUDA_ARCH_LIST, default ``7.5;8.0;9.0+PTX``:
  sm_75 (T4, the oldest CUDA 13 targets: no sm_70 for V100), sm_80 (whose code also runs on
  sm_86/sm_89), sm_90, and PTX for newer GPUs.

Why a part was not built, and the command that rebuilds it, is written to
``belay_kernels/_build_info.json`` and shown by ``belay-kernels backends``. A part whose
sources, flags, compiler and torch are unchanged since it was last built in place is
reused, not rebuilt (``BELAY_KERNELS_REBUILD=1`` forces a rebuild).

Environment:
  BELAY_KERNELS_CPP=0|1    skip the C++ extension / require it (a failure fails the build)
  BELAY_KERNELS_CUDA=0|1   skip the CUDA extension / require it (a failure fails the build)
  unset                    build what this machine can; a failure is a warning, and the
                           package falls back to the torch reference at run time.
  MAX_JOBS                 parallel compile jobs (torch's ninja build).

Development build, in place:  python setup.py build_ext --inplace
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time

from setuptools import setup

DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"
# Every csrc/cpu_kernels*.cpp: a new op's CPU kernel file is built without a list edit.
CPU_SOURCES = [
    "csrc/registration.cpp",
    *sorted(glob.glob("csrc/cpu_kernels*.cpp")),
    "csrc/cpu_module.cpp",
    "csrc/bound_tensors.cpp",
    "csrc/cpu_isa.cpp",
]
CUDA_SOURCES = ["csrc/cuda_kernels.cu", "csrc/cuda_module.cpp"]
# -fno-trapping-math lets GCC turn the per-element choices (lerp's two sides, the
# non-finite policy) into vector selects; nothing here relies on floating-point traps.
# -g0: Python's own CFLAGS ask for debug info, which for these templates cost compile time
# and made _C.so 24 MB.
# -fno-math-errno: std::sqrt (Adam's denominator) becomes the sqrt instruction, correctly
# rounded as before but without the errno branch, so its loops vectorize.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
# --threads 0: nvcc compiles the arch list's targets in parallel, one thread per core.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--threads", "0"]
ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join("belay_kernels", "_build_info.json")
# Wall time of each part on the 2-core dev machine, for the line printed before the build.
ROUGH_MINUTES = {"belay_kernels._C": "1.5-5", "belay_kernels._C_cuda": "1-3"}


def _load_toolkit_finder():
    """belay_kernels/_toolkit.py, loaded by path: importing the package needs torch."""
    spec = importlib.util.spec_from_file_location(
        "_belay_toolkit", os.path.join(ROOT, "belay_kernels", "_toolkit.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _choice(name):
    """'0' (skip), '1' (required) or None (build if possible, failures are warnings)."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"{name} must be 0, 1 or unset, got {value!r}")
    return value or None


def _say(text):
    """stderr, which pip shows with -v and for a failed build; pip hides it otherwise, so
    the line also goes to the terminal when there is one."""
    line = f"belay_kernels: {text}"
    print(line, file=sys.stderr, flush=True)
    if not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write(line + "\n")
        except OSError:  # no terminal (CI, a log): stderr is all there is
            pass


def _fingerprint(sources, flags, extra):
    """A digest of everything a build depends on: every file in csrc/ (the headers too),
    the flags, the compiler and torch."""
    digest = hashlib.sha256(json.dumps([sources, flags, extra], sort_keys=True).encode())
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        with open(os.path.join(ROOT, "csrc", name), "rb") as handle:
            digest.update(name.encode() + b"\0" + handle.read())
    return digest.hexdigest()


def _read_build_info(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _extensions():
    cpp, cuda = _choice("BELAY_KERNELS_CPP"), _choice("BELAY_KERNELS_CUDA")
    # What is recorded for each part: built or not, and why.
    parts = {"belay_kernels._C": {}, "belay_kernels._C_cuda": {}}
    if cpp == "0":
        parts["belay_kernels._C"] = {"built": False, "reason": "BELAY_KERNELS_CPP=0 was set"}
    toolkit = None
    finder = _load_toolkit_finder()
    finder.quiet_torch_cuda_home_warning()  # no GPU is needed to build; we say what we use
    if cuda != "0" and cpp != "0":
        toolkit = finder.find_toolkit()
        if toolkit.root:
            # torch reads CUDA_HOME when cpp_extension is first imported, just below
            os.environ["CUDA_HOME"] = toolkit.root
    if cpp == "0":
        return [], {}, parts
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if cpp == "1":
            raise
        _say(f"torch is not importable ({exc}); building without kernels")
        return [], {}, parts

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
    if cuda == "0":
        cuda_missing.append("BELAY_KERNELS_CUDA=0 was set")
    else:
        if torch.version.cuda is None:
            cuda_missing.append(f"torch {torch.__version__} is not a CUDA build")
        if toolkit is not None and toolkit.root is None:
            cuda_missing.append(toolkit.describe())
    if cuda == "1" and cuda_missing:
        sys.exit("BELAY_KERNELS_CUDA=1 but " + "; ".join(cuda_missing))
    if not cuda_missing:
        cpp_extension.CUDA_HOME = toolkit.root  # in case torch was imported before us
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _say(f"{toolkit.describe()}; arch list {os.environ['TORCH_CUDA_ARCH_LIST']}")
        extensions.append(
            cpp_extension.CUDAExtension(
                "belay_kernels._C_cuda",
                CUDA_SOURCES,
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": NVCC_FLAGS},
                optional=cuda != "1",
            )
        )
    else:
        parts["belay_kernels._C_cuda"] = {
            "built": False,
            "reason": "; ".join(cuda_missing),
            "cuda_home_tried": toolkit.tried if toolkit else [],
            "rebuild_env": "BELAY_KERNELS_CUDA=1 "
            if cuda == "0"
            else "CUDA_HOME=/path/to/cuda-toolkit "
            if toolkit and not toolkit.root
            else "",
        }
        if cuda != "0":
            _say("not building the CUDA kernels: " + "; ".join(cuda_missing))

    depends_on = {
        "torch": torch.__version__,
        "python": sys.version,
        "cuda_home": cpp_extension.CUDA_HOME if not cuda_missing else None,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "cxx": os.environ.get("CXX", "c++"),
    }

    class BuildOptionalExtensions(cpp_extension.BuildExtension):
        """torch's build, where an extension marked optional may fail with a warning, a part
        built in place from the same sources is reused, and the outcome is recorded."""

        def run(self):
            # setuptools clears .inplace while it builds, so note where the build goes now
            self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
            self._info_path = os.path.join(ROOT, BUILD_INFO)
            self._previous = _read_build_info(self._info_path) if self._to_source else {}
            try:
                super().run()
            finally:
                self._record()

        def _rebuild_command(self):
            if not self._to_source:
                return f"{sys.executable} -m pip install --no-build-isolation {ROOT}"
            if getattr(self, "editable_mode", False):
                return f"{sys.executable} -m pip install --no-build-isolation -e {ROOT}"
            return f"cd {ROOT} && {sys.executable} setup.py build_ext --inplace"

        def _record(self):
            info = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": parts}
            for part in parts.values():
                if not part.get("built", True):
                    part["rebuild"] = part.pop("rebuild_env", "") + self._rebuild_command()
            targets = [os.path.join(self.build_lib, BUILD_INFO)]
            if self._to_source:
                targets.append(self._info_path)
            for target in targets:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "w") as handle:
                    json.dump(info, handle, indent=1)

        def build_extensions(self):
            try:  # torch checks the compiler here, before any extension is built
                super().build_extensions()
            except Exception as exc:
                if not all(ext.optional for ext in self.extensions):
                    raise
                for ext in self.extensions:
                    parts[ext.name].setdefault("built", False)
                    parts[ext.name].setdefault("reason", f"no compiler usable: {exc}")
                print(
                    f"WARNING: belay_kernels: no compiled kernels ({exc}); the package "
                    "works without them (backend 'torch')."
                )

        def _reuse(self, ext, fingerprint):
            """Copy the in-place build of ext where this build puts it, if that build is
            of the same fingerprint; True when done."""
            if not self._to_source or os.environ.get("BELAY_KERNELS_REBUILD") == "1":
                return False
            previous = self._previous.get("parts", {}).get(ext.name, {})
            build_py = self.get_finalized_command("build_py")
            inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            if previous.get("fingerprint") != fingerprint or not os.path.exists(inplace_file):
                return False
            target = self.get_ext_fullpath(ext.name)
            if os.path.abspath(target) != os.path.abspath(inplace_file):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(inplace_file, target)
            _say(
                f"{ext.name}: built from these sources at {self._previous.get('written')}; "
                "reusing it (BELAY_KERNELS_REBUILD=1 rebuilds)"
            )
            return True

        def build_extension(self, ext):
            flags = [ext.extra_compile_args, ext.extra_link_args]
            fingerprint = _fingerprint(ext.sources, flags, depends_on)
            parts[ext.name] = {"built": False, "fingerprint": fingerprint}
            if self._reuse(ext, fingerprint):
                parts[ext.name].update(built=True, reused=True)
                return
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count())
            _say(
                f"compiling {ext.name} ({len(ext.sources)} files, {jobs} parallel jobs; "
                f"about {ROUGH_MINUTES[ext.name]} min on a 2-core machine)"
            )
            start = time.monotonic()
            try:
                super().build_extension(ext)
            except Exception as exc:
                parts[ext.name]["reason"] = f"the build failed: {exc}"
                if not ext.optional:
                    raise
                print(
                    f"WARNING: belay_kernels: building {ext.name} failed ({exc}); the "
                    "package works without it (backend 'torch')."
                )
                return
            parts[ext.name].update(built=True, seconds=round(time.monotonic() - start, 1))
            _say(f"{ext.name} built in {time.monotonic() - start:.0f} s")

    cmdclass = {"build_ext": BuildOptionalExtensions.with_options(no_python_abi_suffix=True)}
    return extensions, cmdclass, parts


ext_modules, cmdclass, _ = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

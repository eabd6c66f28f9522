"""Loads the compiled modules once, on first use, and registers the ops' fake (meta)
implementations so that torch.compile can trace calls to them.

``belay_kernels._C`` defines the ops (``torch.ops.belay_kernels.*``) and their CPU
kernels; ``belay_kernels._C_cuda`` adds the CUDA kernels. The reason a module could not
be loaded is kept and reported, never raised at import time of the package.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

from ..methods import BY_OP

# The fused optimizer step and average (reference.adam_average_, sgd_average_), list ops
# only, outside the method table.
FUSED_OP_NAMES = ("adam_average_", "sgd_average_")
# Every op of the method table and its list variant, and the fused ops, as
# csrc/registration.cpp declares them.
ALL_OP_NAMES = (
    *(name for m in BY_OP.values() for name in (m.op, m.foreach)),
    *FUSED_OP_NAMES,
)

_BUILD_HINT = (
    "build it with `python setup.py build_ext --inplace` (or `pip install "
    "--no-build-isolation .`) where a C++ compiler is present"
)


def _mutates_only(*args, **kwargs) -> None:
    """Every op mutates its tensor arguments in place and returns nothing, so each fake
    implementation has nothing to compute: it only has to exist."""
    return None


@functools.cache
def build_record() -> dict:
    """What setup.py recorded about each compiled part (built or not, why, and the command
    that rebuilds it), from belay_kernels/_build_info.json; {} when there is no record."""
    try:
        return json.loads((Path(__file__).parents[1] / "_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _not_built_reason(module_name: str) -> str:
    """Why setup.py did not build a part, with the rebuild command; "" if it has no say."""
    part = build_record().get("parts", {}).get(module_name, {})
    if part.get("built", True):
        return ""
    tried = "; ".join(part.get("cuda_home_tried") or [])
    return (
        f"{module_name} was not built at install time: {part.get('reason', 'no reason recorded')}"
        + (f" (tried: {tried})" if tried and tried not in part.get("reason", "") else "")
        + (f". Rebuild with: {part['rebuild']}" if part.get("rebuild") else "")
    )


@functools.cache
def _load(module_name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module_name), ""
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        return None, _not_built_reason(module_name) or (
            f"{module_name} is not importable ({type(exc).__name__}: {exc})"
        )


@functools.cache
def _register_fakes() -> None:
    for name in ALL_OP_NAMES:
        torch.library.register_fake(f"belay_kernels::{name}")(_mutates_only)


def cpu_module() -> tuple[ModuleType | None, str]:
    """(belay_kernels._C, "") or (None, why not)."""
    module, reason = _load("belay_kernels._C")
    if module is None:
        return None, reason if build_record() else f"{reason}; {_BUILD_HINT}"
    _register_fakes()
    return module, ""


def cuda_unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here, or "" when they can."""
    _, reason = cpu_module()
    if reason:
        return reason
    module, reason = _load("belay_kernels._C_cuda")
    if module is None:
        if build_record():
            return reason
        return (
            f"{reason}; the CUDA kernels are built when a CUDA toolkit and a CUDA build "
            "of torch are present (BELAY_KERNELS_CUDA=1 makes that required)"
        )
    if not torch.cuda.is_available():
        return NO_DEVICE
    return _arch_mismatch(module)


def _arch_mismatch(module) -> str:
    """Why a visible GPU cannot run the built kernels, or "". Every device's compute
    capability is compared with the build's archs (no CUDA context is created for that);
    the current device is also asked whether it can load them, which catches a build
    without PTX on a newer GPU."""
    built = [int(a) for a in module.built_arches().split(",") if a.strip()]  # 750 = 7.5
    listed = ", ".join(f"sm_{a // 10}" for a in built) or "unknown archs"
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if built and 100 * major + 10 * minor < min(built):
            return (
                f"cuda:{index} has compute capability {major}.{minor}, older than every "
                f"arch the CUDA kernels were built for ({listed}); rebuild with "
                f"TORCH_CUDA_ARCH_LIST={major}.{minor} (a CUDA toolkit that still targets it "
                "is needed: CUDA 13 starts at sm_75)"
            )
    current = torch.cuda.current_device()
    error = module.kernel_image_error(current)
    if error:
        major, minor = torch.cuda.get_device_capability(current)
        return (
            f"cuda:{current} (compute capability {major}.{minor}) cannot load the CUDA "
            f"kernels built for {listed}: {error}; rebuild with "
            f'TORCH_CUDA_ARCH_LIST="{major}.{minor}+PTX"'
        )
    return ""


NO_DEVICE = (
    "the CUDA kernels are built, but no CUDA device is present here "
    "(torch.cuda.is_available() is False); they run on a machine with an NVIDIA GPU"
)


def ops():
    """The namespace ``torch.ops.belay_kernels`` (loads the CPU module first)."""
    _, reason = cpu_module()
    if reason:
        raise RuntimeError(reason)
    return torch.ops.belay_kernels

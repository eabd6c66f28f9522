"""The ``cpp`` backend: the compiled CPU kernels (csrc/cpu_kernels.cpp)."""

from ._compiled import *  # noqa: F403 (the backend functions)
from ._compiled import REQUIRES_CONTIGUOUS, supports  # noqa: F401
from ._library import cpu_module

DEVICE_TYPES = frozenset({"cpu"})


def unavailable_reason() -> str:
    return cpu_module()[1]


def usage() -> str:
    """Which clone of the CPU loops runs (what ``belay-kernels backends`` prints)."""
    module = cpu_module()[0]
    return (
        f"CPU loops: the {module.cpu_isa()} clone, of {', '.join(module.supported_cpu_isas())} "
        "here (BELAY_KERNELS_CPU_ISA picks one)"
    )

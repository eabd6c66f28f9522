"""The ``cpp`` backend: the compiled CPU kernels (csrc/cpu_kernels.cpp)."""

from ._compiled import *  # noqa: F403 (the backend functions)
from ._compiled import REQUIRES_CONTIGUOUS, supports  # noqa: F401
from ._library import cpu_module

DEVICE_TYPES = frozenset({"cpu"})


def unavailable_reason() -> str:
    return cpu_module()[1]

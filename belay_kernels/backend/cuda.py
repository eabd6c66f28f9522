"""The ``cuda`` backend: the compiled CUDA kernels (csrc/cuda_kernels.cu)."""

from ._compiled import *  # noqa: F403 (the backend functions)
from ._compiled import REQUIRES_CONTIGUOUS, supports  # noqa: F401
from ._library import cuda_unavailable_reason

DEVICE_TYPES = frozenset({"cuda"})


def unavailable_reason() -> str:
    return cuda_unavailable_reason()

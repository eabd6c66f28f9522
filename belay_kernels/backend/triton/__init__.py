"""The Triton backend: one launch per flat buffer (or per tensor list), one pass over
memory, for every op of :mod:`belay_kernels.reference`.

One file per method (``ema``, ``multi_ema``, ``swa``, ``belay``, ``two_point``, ``swap``, and
``optimizers``: an optimizer's step and the average in one pass), each with its
``@triton.jit`` kernels first and a thin launcher after; shared per-element pieces are
in ``_blocks``, host-side launch details in ``_launch``, and the device-side step
counters (graph-capturable steps) in ``device_step``.

Runs on CUDA tensors. With ``TRITON_INTERPRET=1`` set before Triton is imported, the
kernels run in Triton's interpreter on CPU tensors too; that is how the tests check
them on machines without a GPU.
"""

from __future__ import annotations

import os

from ...reference import swap_supported

try:
    import triton  # noqa: F401
except Exception as exc:  # kept, and reported by unavailable_reason()
    _IMPORT_ERROR: str | None = f"triton is not importable ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE_TYPES = frozenset({"cuda", "cpu"} if INTERPRETED else {"cuda"})
REQUIRES_CONTIGUOUS = True

if _IMPORT_ERROR is None:
    # Each method's kernels are in the module of its short name.
    from .belay import belay_step_, belay_step_foreach_
    from .device_step import StepGate, advance_step_
    from .ema import ema_update_, ema_update_foreach_
    from .multi_ema import multi_ema_update_, multi_ema_update_foreach_
    from .optimizers import adam_average_, sgd_average_
    from .swa import swa_update_, swa_update_foreach_
    from .swap import swap_, swap_foreach_
    from .two_point import two_point_average_, two_point_average_foreach_


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR


def supports(op: str, dtypes) -> bool:
    """Every floating dtype combination ops accepts, the fused optimizer's steps
    (adam_average_, sgd_average_: (param dtype, shadow dtype)) included; swap_ covers the
    reference's pairs (same dtype, and bf16 weights with an fp32 shadow, by bit packing)."""
    if op == "swap_":
        return swap_supported(*dtypes)
    return True


__all__ = [
    "DEVICE_TYPES",
    "REQUIRES_CONTIGUOUS",
    "StepGate",
    "advance_step_",
    "supports",
    "unavailable_reason",
    "ema_update_",
    "ema_update_foreach_",
    "swa_update_",
    "swa_update_foreach_",
    "belay_step_",
    "belay_step_foreach_",
    "two_point_average_",
    "two_point_average_foreach_",
    "swap_",
    "swap_foreach_",
    "multi_ema_update_",
    "multi_ema_update_foreach_",
    "adam_average_",
    "sgd_average_",
]

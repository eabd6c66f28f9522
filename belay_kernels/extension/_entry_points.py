"""The backend functions (see belay_kernels._backends) on top of the compiled ops, shared
by the ``cpp`` and ``cuda`` backends: the registered ops choose the CPU or CUDA kernel
from the tensors' device.

The ops layer has already checked the arguments; this module only converts them to the
ops' schema: a hyperparameter is a number, or a one-element tensor passed alongside
(converted to float64 / int64 on the tensors' device, where the kernel reads it).
"""

from __future__ import annotations

import torch

from ..methods import DTYPE_PAIRS
from ..reference import swap_supported

__all__ = [
    "ema_update_",
    "ema_update_foreach_",
    "multi_ema_update_",
    "multi_ema_update_foreach_",
    "swa_update_",
    "swa_update_foreach_",
    "belay_step_",
    "belay_step_foreach_",
    "two_point_average_",
    "two_point_average_foreach_",
    "swap_",
    "swap_foreach_",
]

_PAIRS = frozenset(DTYPE_PAIRS)

# The backend registry calls unavailable_reason() (which loads the compiled module) before
# it hands out this module, so the ops exist by the time these functions run. A plain
# attribute keeps the functions traceable by torch.compile.
_ops = torch.ops.belay_kernels

# The compiled kernels read flat contiguous storage.
REQUIRES_CONTIGUOUS = True


def max_profiles() -> int:
    """The most shadows one compiled multi_ema_update_ call takes (csrc/profiles.h)."""
    from .. import _C

    return _C.MAX_PROFILES


def supports(op: str, dtypes) -> bool:
    """Which dtype rows (in the ops' argument order) have a compiled kernel."""
    op = op.removesuffix("foreach")
    if op.removesuffix("foreach_") == "multi_ema_update_":
        *shadows, weights = dtypes
        return (
            1 <= len(shadows) <= max_profiles()
            and len(set(shadows)) == 1
            and (weights, shadows[0]) in _PAIRS
        )
    if op in ("ema_update_", "swa_update_"):
        shadow, weights = dtypes
        return (weights, shadow) in _PAIRS
    if op == "belay_step_":
        return tuple(dtypes) in _PAIRS
    if op == "two_point_average_":
        out, weights, snapshot = dtypes
        return out == weights and (weights, snapshot) in _PAIRS
    if op == "swap_":
        return swap_supported(*dtypes)
    return False


def _number_or_tensor(value, like: torch.Tensor | None, dtype: torch.dtype):
    """(number, None) or (0, value as a one-element ``dtype`` tensor on like's device)."""
    if isinstance(value, torch.Tensor):
        on_cpu = value.device.type == "cpu" or like is None
        device = value.device if on_cpu else like.device
        return 0, value.to(device=device, dtype=dtype).reshape(1)
    return value, None


def _rate(value, like):
    number, tensor = _number_or_tensor(value, like, torch.float64)
    return float(number), tensor


def _count(value, like):
    number, tensor = _number_or_tensor(value, like, torch.int64)
    return int(number), tensor


def ema_update_(shadow, weights, decay, skip_nonfinite=True, skipped=None):
    _ops.ema_update_(shadow, weights, *_rate(decay, shadow), skip_nonfinite, skipped)
    return shadow


def ema_update_foreach_(shadows, weights, decay, skip_nonfinite=True, skipped=None):
    _ops.ema_update_foreach_(shadows, weights, *_rate(decay, shadows[0]), skip_nonfinite, skipped)


def _rates(decays, like):
    """The decays as the multi-EMA ops take them: numbers, and a tensor or None each."""
    pairs = [_rate(decay, like) for decay in decays]
    return [number for number, _ in pairs], [tensor for _, tensor in pairs]


def multi_ema_update_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    _ops.multi_ema_update_(list(shadows), weights, *_rates(decays, weights), skip_nonfinite,
                           skipped)


def multi_ema_update_foreach_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    flat = [t for profile in shadows for t in profile]  # profile after profile
    like = weights[0] if len(weights) else None
    _ops.multi_ema_update_foreach_(flat, list(weights), *_rates(decays, like), skip_nonfinite,
                                   skipped)


def swa_update_(shadow, weights, count, skip_nonfinite=True, skipped=None):
    _ops.swa_update_(shadow, weights, *_count(count, shadow), skip_nonfinite, skipped)
    return shadow


def swa_update_foreach_(shadows, weights, count, skip_nonfinite=True, skipped=None):
    _ops.swa_update_foreach_(shadows, weights, *_count(count, shadows[0]), skip_nonfinite, skipped)


def _belay_args(alpha, beta, like):
    alpha_number, alpha_tensor = _rate(alpha, like)
    beta_number, beta_tensor = _rate(beta, like)
    return alpha_number, beta_number, alpha_tensor, beta_tensor


def belay_step_(weights, shadow, alpha, beta, skip_nonfinite=True, skipped=None):
    _ops.belay_step_(weights, shadow, *_belay_args(alpha, beta, weights), skip_nonfinite, skipped)
    return weights, shadow


def belay_step_foreach_(weights, shadows, alpha, beta, skip_nonfinite=True, skipped=None):
    _ops.belay_step_foreach_(
        weights, shadows, *_belay_args(alpha, beta, weights[0]), skip_nonfinite, skipped
    )


def two_point_average_(out, weights, snapshot):
    _ops.two_point_average_(out, weights, snapshot)
    return out


def two_point_average_foreach_(outs, weights, snapshots):
    _ops.two_point_average_foreach_(outs, weights, snapshots)


def swap_(weights, shadow, inverse=False):
    _ops.swap_(weights, shadow, bool(inverse))


def swap_foreach_(weights, shadows, inverse=False):
    _ops.swap_foreach_(weights, shadows, bool(inverse))

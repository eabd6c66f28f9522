"""The backend functions (see belay_kernels._backends) on top of the compiled ops, shared
by the ``cpp`` and ``cuda`` backends: the registered ops choose the CPU or CUDA kernel
from the tensors' device. One flat and one foreach function per op, written out.

The ops layer has already checked the arguments; this module only converts them to the
ops' schema (csrc/registration.cpp): a hyperparameter is a number, or a one-element tensor
passed alongside (converted to float64 / int64 on the tensors' device, where the kernel
reads it). The schema takes the scalars' numbers, then their tensors, then the flags.
"""

from __future__ import annotations

import itertools

import torch

from ..methods import BY_OP, DTYPE_PAIRS, MULTI_EMA
from ..reference import swap_supported
from ._library import FUSED_OP_NAMES

_PAIRS = frozenset(DTYPE_PAIRS)
# Each op by its flat or its foreach name.
_METHOD_OF = {name: m for m in BY_OP.values() for name in (m.op, m.foreach)}

# The backend registry calls unavailable_reason() (which loads the compiled module) before
# it hands out this module, so the ops exist by the time these functions run. A plain
# attribute keeps the functions traceable by torch.compile; the tests swap it for the
# simulated CUDA grid's ops (tests/_grid.py).
_ops = torch.ops.belay_kernels

# The compiled kernels read flat contiguous storage.
REQUIRES_CONTIGUOUS = True


def max_profiles() -> int:
    """The most shadows one compiled multi_ema_update_ call takes (csrc/profiles.h)."""
    from .. import _C

    return _C.MAX_PROFILES


def supports(op: str, dtypes) -> bool:
    """Which dtype rows (in the ops' argument order) have a compiled kernel. The fused
    optimizer ops take (parameters' dtype, shadows' dtype)."""
    if op in FUSED_OP_NAMES:
        return tuple(dtypes) in _PAIRS
    method = _METHOD_OF[op]
    if method is MULTI_EMA:
        *shadows, weights = dtypes
        return (
            1 <= len(shadows) <= max_profiles()
            and len(set(shadows)) == 1
            and (weights, shadows[0]) in _PAIRS
        )
    of = dict(zip(method.tensors, dtypes))
    weights_role, shadow_role = method.kernel_pair
    if method.exact:
        return swap_supported(of[weights_role], of[shadow_role])
    others_match = all(of[r] == of[weights_role] for r in method.tensors if r != shadow_role)
    return others_match and (of[weights_role], of[shadow_role]) in _PAIRS


def _number_or_tensor(value, like: torch.Tensor | None, dtype: torch.dtype):
    """(number, None) or (0, value as a one-element ``dtype`` tensor on like's device)."""
    if isinstance(value, torch.Tensor):
        on_cpu = value.device.type == "cpu" or like is None
        device = value.device if on_cpu else like.device
        return 0, value.to(device=device, dtype=dtype).reshape(1)
    return value, None


def _rate(value, like: torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
    """A rate as the schema takes it: ``float x, Tensor? x_tensor``."""
    number, tensor = _number_or_tensor(value, like, torch.float64)
    return float(number), tensor


def _count(value, like: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """A count as the schema takes it: ``int x, Tensor? x_tensor``."""
    number, tensor = _number_or_tensor(value, like, torch.int64)
    return int(number), tensor


def _first(tensors) -> torch.Tensor | None:
    """The tensor whose device a list's tensor hyperparameters move to."""
    return tensors[0] if len(tensors) else None


# The backend functions, one flat and one foreach per op, in the reference's argument
# order; each converts its scalars to the schema's and calls the op.


def ema_update_(shadow, weights, decay, skip_nonfinite=True, skipped=None):
    _ops.ema_update_(shadow, weights, *_rate(decay, shadow), skip_nonfinite, skipped)


def ema_update_foreach_(shadows, weights, decay, skip_nonfinite=True, skipped=None):
    decay, decay_tensor = _rate(decay, _first(shadows))
    _ops.ema_update_foreach_(shadows, weights, decay, decay_tensor, skip_nonfinite, skipped)


def swa_update_(shadow, weights, count, skip_nonfinite=True, skipped=None):
    _ops.swa_update_(shadow, weights, *_count(count, shadow), skip_nonfinite, skipped)


def swa_update_foreach_(shadows, weights, count, skip_nonfinite=True, skipped=None):
    count, count_tensor = _count(count, _first(shadows))
    _ops.swa_update_foreach_(shadows, weights, count, count_tensor, skip_nonfinite, skipped)


def belay_step_(weights, shadow, alpha, beta, skip_nonfinite=True, skipped=None):
    alpha, alpha_tensor = _rate(alpha, weights)
    beta, beta_tensor = _rate(beta, weights)
    _ops.belay_step_(
        weights, shadow, alpha, beta, alpha_tensor, beta_tensor, skip_nonfinite, skipped
    )


def belay_step_foreach_(weights, shadows, alpha, beta, skip_nonfinite=True, skipped=None):
    alpha, alpha_tensor = _rate(alpha, _first(weights))
    beta, beta_tensor = _rate(beta, _first(weights))
    _ops.belay_step_foreach_(
        weights, shadows, alpha, beta, alpha_tensor, beta_tensor, skip_nonfinite, skipped
    )


def two_point_average_(out, weights, snapshot):
    _ops.two_point_average_(out, weights, snapshot)


def two_point_average_foreach_(outs, weights, snapshots):
    _ops.two_point_average_foreach_(outs, weights, snapshots)


def swap_(weights, shadow, inverse=False):
    _ops.swap_(weights, shadow, bool(inverse))


def swap_foreach_(weights, shadows, inverse=False):
    _ops.swap_foreach_(weights, shadows, bool(inverse))


def _rates(decays, like):
    """The decays as the multi-EMA ops take them: numbers, and a tensor or None each."""
    pairs = [_rate(decay, like) for decay in decays]
    return [number for number, _ in pairs], [tensor for _, tensor in pairs]


def multi_ema_update_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    _ops.multi_ema_update_(
        list(shadows), weights, *_rates(decays, weights), skip_nonfinite, skipped
    )


def multi_ema_update_foreach_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    _ops.multi_ema_update_foreach_(
        list(itertools.chain.from_iterable(shadows)),  # profile after profile
        list(weights),
        *_rates(decays, _first(weights)),
        skip_nonfinite,
        skipped,
    )


# The fused optimizer step and average, in the reference's argument order: lists as
# lists, ``average_scalars`` as the schema's float[] (an SWA count is a whole number).


def adam_average_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    shadows,
    grad_scale,
    found_inf,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    maximize,
    average,
    average_scalars,
    skip_nonfinite=True,
    skipped=None,
):
    _ops.adam_average_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        shadows,
        grad_scale,
        found_inf,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(decoupled),
        bool(maximize),
        average,
        [float(x) for x in average_scalars],
        skip_nonfinite,
        skipped,
    )


def sgd_average_(
    params,
    grads,
    momentum_buffers,
    shadows,
    grad_scale,
    found_inf,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
    average,
    average_scalars,
    skip_nonfinite=True,
    skipped=None,
):
    _ops.sgd_average_(
        params,
        grads,
        momentum_buffers,
        shadows,
        grad_scale,
        found_inf,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        bool(first_step),
        average,
        [float(x) for x in average_scalars],
        skip_nonfinite,
        skipped,
    )


__all__ = [
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

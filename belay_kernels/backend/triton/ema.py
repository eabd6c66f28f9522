"""EMA: ``shadow <- lerp(shadow, weights, 1 - decay)``, one pass, any dtype pair."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...schedules import Warmup
from . import _launch
from ._blocks import (
    _host_float,
    _lerp_shadow,
    _place,
    _rate,
    _skip_block,
)
from .device_step import StepGate, _gate, _warmup_weight, gate_args


@triton.jit(
    do_not_specialize=["weight_bits", "gamma_bits", "power_bits", "min_decay_bits", "decay_bits"]
)
def _ema_update_kernel(
    table_ptr,
    owner_ptr,
    size,
    shadow_ptr,
    weights_ptr,
    weight_bits,
    decay_ptr,
    skipped_ptr,
    step_ptr,
    skip_ptr,
    first_step,
    every,
    gamma_bits,
    power_bits,
    min_decay_bits,
    decay_bits,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    DECAY_FROM_PTR: tl.constexpr,
    WARMUP: tl.constexpr,
    HAS_STEP: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, n, shadow_ptr, weights_ptr = _place(
        table_ptr, owner_ptr, size, (shadow_ptr, weights_ptr), IS_LIST, ALIGNED, BLOCK
    )
    active, k = _gate(step_ptr, skip_ptr, first_step, every, HAS_STEP, HAS_SKIP)
    if active:
        weight, valid = _rate(weight_bits, decay_ptr, DECAY_FROM_PTR, True, COMPUTE)
        if WARMUP:
            weight = _warmup_weight(
                k,
                _host_float(gamma_bits, tl.float64),
                _host_float(power_bits, tl.float64),
                _host_float(min_decay_bits, tl.float64),
                _host_float(decay_bits, tl.float64),
                COMPUTE,
            )
        if valid:
            _lerp_shadow(
                shadow_ptr,
                weights_ptr,
                start,
                n,
                weight,
                skipped_ptr,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTE,
                BLOCK,
            )
        else:
            _skip_block(start, n, skipped_ptr, HAS_SKIPPED, BLOCK)


def _common_args(decay, skip_nonfinite, skipped, gate, placeholder, dtypes):
    """``decay``: a rate, or a schedules.Warmup whose decay the kernel computes from the
    gate's update number (experimental: see device_step)."""
    warmup = decay if isinstance(decay, Warmup) else None
    if warmup is not None and gate is None:
        raise ValueError("a Warmup decay needs a StepGate: the decay follows gate.step.")
    schedule = warmup or Warmup()
    rate, from_ptr = _launch.rate_args(
        schedule.decay if warmup else decay, placeholder, one_minus=True
    )
    gate_positional, gate_flags = gate_args(gate, placeholder)
    args = (
        *rate,
        placeholder if skipped is None else skipped,
        *gate_positional,
        *(
            _launch.float_bits(value)
            for value in (schedule.gamma, schedule.power, schedule.min_decay, schedule.decay)
        ),
    )
    flags = dict(
        DECAY_FROM_PTR=from_ptr,
        WARMUP=warmup is not None,
        **gate_flags,
        **_launch.update_flags(skip_nonfinite, skipped, dtypes),
    )
    return args, flags


def ema_update_(
    shadow: torch.Tensor,
    weights: torch.Tensor,
    decay,
    skip_nonfinite=True,
    skipped=None,
    *,
    gate: StepGate | None = None,
) -> torch.Tensor:
    args, flags = _common_args(
        decay, skip_nonfinite, skipped, gate, shadow, (shadow.dtype, weights.dtype)
    )
    _launch.launch(_ema_update_kernel, (shadow, weights), args, flags)
    return shadow


def ema_update_foreach_(
    shadows, weights, decay, skip_nonfinite=True, skipped=None, *, gate: StepGate | None = None
):
    args, flags = _common_args(
        decay, skip_nonfinite, skipped, gate, shadows[0], (shadows[0].dtype, weights[0].dtype)
    )
    _launch.launch(_ema_update_kernel, [shadows, weights], args, flags)
    return shadows

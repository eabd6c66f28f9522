"""BELAY, post-step form, one pass: ``weights <- lerp(weights, shadow, beta)`` and
``shadow <- lerp(shadow, weights, alpha)``, both right-hand sides read before either
write; the non-finite policy guards the shadow."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._blocks import (
    _load,
    _offsets,
    _place,
    _rate,
    _skip_block,
    _spring_and_follow,
    _store,
)
from .device_step import StepGate, _gate, gate_args


@triton.jit
def _belay_block(
    weights_ptr,
    shadow_ptr,
    start,
    n,
    alpha,
    beta,
    skipped_ptr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = _offsets(start, BLOCK)
    weights = _load(weights_ptr, offs, n, MASKED).to(COMPUTE)
    shadow = _load(shadow_ptr, offs, n, MASKED).to(COMPUTE)
    new_weights, new_shadow = _spring_and_follow(
        weights, weights, shadow, alpha, beta, skipped_ptr, SKIP_NONFINITE, HAS_SKIPPED
    )
    _store(weights_ptr, offs, new_weights, n, MASKED)
    _store(shadow_ptr, offs, new_shadow, n, MASKED)


@triton.jit(do_not_specialize=["alpha_bits", "beta_bits"])
def _belay_step_kernel(
    table_ptr,
    owner_ptr,
    size,
    weights_ptr,
    shadow_ptr,
    alpha_bits,
    alpha_ptr,
    beta_bits,
    beta_ptr,
    skipped_ptr,
    step_ptr,
    skip_ptr,
    first_step,
    every,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    ALPHA_FROM_PTR: tl.constexpr,
    BETA_FROM_PTR: tl.constexpr,
    HAS_STEP: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, n, weights_ptr, shadow_ptr = _place(
        table_ptr, owner_ptr, size, (weights_ptr, shadow_ptr), IS_LIST, ALIGNED, BLOCK
    )
    active, k = _gate(step_ptr, skip_ptr, first_step, every, HAS_STEP, HAS_SKIP)
    if active:
        alpha, alpha_valid = _rate(alpha_bits, alpha_ptr, ALPHA_FROM_PTR, False, COMPUTE)
        beta, beta_valid = _rate(beta_bits, beta_ptr, BETA_FROM_PTR, False, COMPUTE)
        if alpha_valid & beta_valid:
            if start + BLOCK <= n:
                _belay_block(
                    weights_ptr,
                    shadow_ptr,
                    start,
                    n,
                    alpha,
                    beta,
                    skipped_ptr,
                    False,
                    SKIP_NONFINITE,
                    HAS_SKIPPED,
                    COMPUTE,
                    BLOCK,
                )
            else:
                _belay_block(
                    weights_ptr,
                    shadow_ptr,
                    start,
                    n,
                    alpha,
                    beta,
                    skipped_ptr,
                    True,
                    SKIP_NONFINITE,
                    HAS_SKIPPED,
                    COMPUTE,
                    BLOCK,
                )
        else:
            _skip_block(start, n, skipped_ptr, HAS_SKIPPED, BLOCK)


def _common_args(alpha, beta, skip_nonfinite, skipped, gate, placeholder, dtypes):
    alpha_args, alpha_from_ptr = _launch.rate_args(alpha, placeholder)
    beta_args, beta_from_ptr = _launch.rate_args(beta, placeholder)
    gate_positional, gate_flags = gate_args(gate, placeholder)
    args = (
        *alpha_args,
        *beta_args,
        placeholder if skipped is None else skipped,
        *gate_positional,
    )
    flags = dict(
        ALPHA_FROM_PTR=alpha_from_ptr,
        BETA_FROM_PTR=beta_from_ptr,
        **gate_flags,
        **_launch.update_flags(skip_nonfinite, skipped, dtypes),
    )
    return args, flags


def belay_step_(
    weights: torch.Tensor,
    shadow: torch.Tensor,
    alpha,
    beta,
    skip_nonfinite=True,
    skipped=None,
    *,
    gate: StepGate | None = None,
):
    args, flags = _common_args(
        alpha, beta, skip_nonfinite, skipped, gate, weights, (weights.dtype, shadow.dtype)
    )
    _launch.launch(_belay_step_kernel, (weights, shadow), args, flags)
    return weights, shadow


def belay_step_foreach_(
    weights,
    shadows,
    alpha,
    beta,
    skip_nonfinite=True,
    skipped=None,
    *,
    gate: StepGate | None = None,
):
    args, flags = _common_args(
        alpha, beta, skip_nonfinite, skipped, gate, weights[0], (weights[0].dtype, shadows[0].dtype)
    )
    _launch.launch(_belay_step_kernel, [weights, shadows], args, flags)
    return weights, shadows

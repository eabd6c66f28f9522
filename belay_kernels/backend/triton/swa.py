"""SWA: the running mean ``shadow <- lerp(shadow, weights, 1 / (count + 1))``, the weight
taken in float64 then rounded; count 0 copies. One pass, any dtype pair."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._blocks import _lerp_shadow, _place, _skip_block
from .device_step import StepGate, _gate, gate_args


@triton.jit(do_not_specialize=["count"])
def _swa_update_kernel(
    table_ptr,
    owner_ptr,
    size,
    shadow_ptr,
    weights_ptr,
    count,
    count_ptr,
    skipped_ptr,
    step_ptr,
    skip_ptr,
    first_step,
    every,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    COUNT_FROM_PTR: tl.constexpr,
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
        if COUNT_FROM_PTR:
            count = tl.load(count_ptr)
        count = count.to(tl.int64)
        valid = count >= 0  # a negative count held in a tensor: nothing written
        count = count + k
        weight_of_new = (1.0 / (count + 1).to(tl.float64)).to(COMPUTE)
        if valid:
            _lerp_shadow(
                shadow_ptr,
                weights_ptr,
                start,
                n,
                weight_of_new,
                skipped_ptr,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTE,
                BLOCK,
            )
        else:
            _skip_block(start, n, skipped_ptr, HAS_SKIPPED, BLOCK)


def _common_args(count, skip_nonfinite, skipped, gate, placeholder, dtypes):
    # a CPU count next to CUDA tensors is read here (ops refuses other devices)
    from_ptr = isinstance(count, torch.Tensor) and count.device == placeholder.device
    gate_positional, gate_flags = gate_args(gate, placeholder)
    args = (
        0 if from_ptr else int(count),
        count if from_ptr else placeholder,
        placeholder if skipped is None else skipped,
        *gate_positional,
    )
    flags = dict(
        COUNT_FROM_PTR=from_ptr,
        **gate_flags,
        **_launch.update_flags(skip_nonfinite, skipped, dtypes),
    )
    return args, flags


def swa_update_(
    shadow: torch.Tensor,
    weights: torch.Tensor,
    count,
    skip_nonfinite=True,
    skipped=None,
    *,
    gate: StepGate | None = None,
) -> torch.Tensor:
    """With a gate, the count is ``count + k`` for the gate's update number k."""
    args, flags = _common_args(
        count, skip_nonfinite, skipped, gate, shadow, (shadow.dtype, weights.dtype)
    )
    _launch.launch(_swa_update_kernel, (shadow, weights), args, flags)
    return shadow


def swa_update_foreach_(
    shadows, weights, count, skip_nonfinite=True, skipped=None, *, gate: StepGate | None = None
):
    args, flags = _common_args(
        count, skip_nonfinite, skipped, gate, shadows[0], (shadows[0].dtype, weights[0].dtype)
    )
    _launch.launch(_swa_update_kernel, [shadows, weights], args, flags)
    return shadows

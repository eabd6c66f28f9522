"""K EMAs of the same weights in one pass: ``shadow_k <- lerp(shadow_k, weights, 1 - decay_k)``,
the weights loaded once per block, each shadow loaded and stored once; bit for bit K
``ema_update_`` calls (the element update is _blocks._lerp_into, shared with the EMA).

The K shadows travel as one tuple argument of K pointers (the rates, device decays and
their flags as tuples of the same length), so one kernel covers every K with each
shadow's pointer keeping its own dtype and alignment facts; K is the tuple's length, a
compile-time constant, and is capped at MAX_PROFILES to bound the compiled variants
and the registers one program holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._checks import BelayInputError
from . import _launch
from ._blocks import (
    _column,
    _columns,
    _lerp_into,
    _load,
    _locate,
    _odd_words_bits,
    _offsets,
    _rate,
    _skip_block,
)

MAX_PROFILES = 8


@triton.jit
def _multi_ema_block(
    shadow_ptrs,
    weights_ptr,
    start,
    n,
    words,
    decay_ptrs,
    skipped_ptr,
    DECAY_FROM_PTR: tl.constexpr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = _offsets(start, BLOCK)
    weights = _load(weights_ptr, offs, n, MASKED)
    for k in tl.static_range(len(shadow_ptrs)):
        # read here, not once before the masked/unmasked split: holding K rates across the
        # block spilled registers with 8 device decays (bf16/fp32, sm_90)
        bits = _odd_words_bits(words[2 * k], words[2 * k + 1])
        rate, valid = _rate(bits, decay_ptrs[k], DECAY_FROM_PTR[k], True, COMPUTES[k])
        if valid:
            _lerp_into(
                shadow_ptrs[k],
                offs,
                n,
                weights,
                rate,
                skipped_ptr,
                MASKED,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTES[k],
            )
        else:
            _skip_block(start, n, skipped_ptr, HAS_SKIPPED, BLOCK)


@triton.jit
def _multi_ema_update_kernel(
    table_ptr,
    owner_ptr,
    size,
    shadow_ptrs,
    weights_ptr,
    words,
    decay_ptrs,
    skipped_ptr,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    DECAY_FROM_PTR: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    K: tl.constexpr = len(shadow_ptrs)
    tensor, start, n = _locate(table_ptr, owner_ptr, size, K + 1, IS_LIST, BLOCK)
    shadow_ptrs = _columns(table_ptr, shadow_ptrs, 0, tensor, size, IS_LIST, ALIGNED)
    weights_ptr = _column(table_ptr, weights_ptr, K, tensor, size, IS_LIST, ALIGNED)
    if start + BLOCK <= n:
        _multi_ema_block(
            shadow_ptrs,
            weights_ptr,
            start,
            n,
            words,
            decay_ptrs,
            skipped_ptr,
            DECAY_FROM_PTR,
            False,
            SKIP_NONFINITE,
            HAS_SKIPPED,
            COMPUTES,
            BLOCK,
        )
    else:
        _multi_ema_block(
            shadow_ptrs,
            weights_ptr,
            start,
            n,
            words,
            decay_ptrs,
            skipped_ptr,
            DECAY_FROM_PTR,
            True,
            SKIP_NONFINITE,
            HAS_SKIPPED,
            COMPUTES,
            BLOCK,
        )


def _check_profiles(k: int, decays) -> None:
    if not 1 <= k <= MAX_PROFILES:
        raise BelayInputError(
            f"the Triton multi_ema_update_ takes 1 to {MAX_PROFILES} shadows, got {k}; "
            f"split the profiles into calls of at most {MAX_PROFILES} shadows each."
        )
    if len(decays) != k:
        raise BelayInputError(
            f"multi_ema_update_ needs one decay per shadow ({k}), got {len(decays)} decays."
        )


def _args_and_flags(decays, skip_nonfinite, skipped, placeholder, weights_dtype, shadow_dtypes):
    words, pointers, from_ptr = [], [], []
    for decay in decays:
        (bits, pointer), on_device = _launch.rate_args(decay, placeholder, one_minus=True)
        words += _launch.odd_words(bits)
        pointers.append(pointer)
        from_ptr.append(on_device)
    args = (tuple(words), tuple(pointers), placeholder if skipped is None else skipped)
    flags = dict(
        DECAY_FROM_PTR=tuple(from_ptr),
        SKIP_NONFINITE=bool(skip_nonfinite),
        HAS_SKIPPED=skipped is not None,
        COMPUTES=tuple(_launch.compute_dtype(weights_dtype, d) for d in shadow_dtypes),
        **_launch.shape_flags(weights_dtype, *shadow_dtypes),
    )
    return args, flags


def multi_ema_update_(
    shadows, weights: torch.Tensor, decays, skip_nonfinite=True, skipped=None
) -> None:
    """``shadows``: K tensors shaped like ``weights``; ``decays``: K numbers or 0-d tensors."""
    _check_profiles(len(shadows), decays)
    args, flags = _args_and_flags(
        decays, skip_nonfinite, skipped, weights, weights.dtype, [s.dtype for s in shadows]
    )
    _launch.launch(
        _multi_ema_update_kernel, (*shadows, weights), args, flags, tuple_columns=len(shadows)
    )


def multi_ema_update_foreach_(shadows, weights, decays, skip_nonfinite=True, skipped=None) -> None:
    """``shadows``: K lists, each laid out like the list ``weights``, in one launch."""
    _check_profiles(len(shadows), decays)
    if any(len(profile) != len(weights) for profile in shadows):
        raise BelayInputError(
            f"every shadow list must hold one tensor per weights tensor ({len(weights)}), "
            f"got lists of {[len(p) for p in shadows]}."
        )
    if not weights:
        return
    args, flags = _args_and_flags(
        decays, skip_nonfinite, skipped, weights[0], weights[0].dtype, [p[0].dtype for p in shadows]
    )
    _launch.launch(
        _multi_ema_update_kernel, [*shadows, weights], args, flags, tuple_columns=len(shadows)
    )

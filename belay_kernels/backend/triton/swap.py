"""In-place swap of weights and shadow, exact, in one pass.

Same dtype: a plain exchange of bits (the kernel sees integer views of equal width, so
no value is ever converted). bf16 weights with an fp32 shadow: the bit packing of
:func:`belay_kernels.reference.swap_` on 16-bit and 32-bit integer views."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._blocks import _load, _offsets, _place, _store


@triton.jit
def _swap_bits(model_bits, slot_bits, INVERSE: tl.constexpr):
    """bf16 model word (uint32, low 16 bits used) and fp32 slot word (uint32) -> new
    words; the reference's packing (reference.packed_model_bits and its inverse): round
    to nearest with ties toward zero, so the low half of the slot tells exactly whether
    the model's half was rounded up, and NaN kept NaN."""
    SIGN: tl.constexpr = 0x8000
    INF: tl.constexpr = 0x7F80  # bf16 +inf; a magnitude above it is a NaN
    SPARE_NAN: tl.constexpr = 0x7F81  # the NaN high half that lends its code
    low = slot_bits & 0xFFFF
    high = slot_bits >> 16
    rounds_up = (low > 0x8000).to(tl.uint32)
    if INVERSE:
        sign = model_bits & SIGN
        magnitude = model_bits & 0x7FFF
        restored = tl.where(
            magnitude > INF,
            tl.where(magnitude == SPARE_NAN, sign | INF, model_bits),
            tl.where(magnitude == INF * (1 - rounds_up), sign | SPARE_NAN, model_bits - rounds_up),
        )
        shadow_high = tl.where(low != 0, restored, model_bits) & 0xFFFF
        new_model = high
        new_slot = (shadow_high << 16) | low
    else:
        sign = high & SIGN
        magnitude = high & 0x7FFF
        traded = tl.where(
            magnitude == INF,
            sign | SPARE_NAN,
            tl.where(magnitude == SPARE_NAN, sign | (INF * (1 - rounds_up)), high),
        )
        exchanged = (magnitude >= INF) & (low != 0)
        new_model = tl.where(exchanged, traded, high + rounds_up) & 0xFFFF
        new_slot = (model_bits << 16) | low
    return new_model, new_slot


@triton.jit
def _swap_block(
    weights_ptr,
    shadow_ptr,
    start,
    n,
    PACKED: tl.constexpr,
    INVERSE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = _offsets(start, BLOCK)
    model = _load(weights_ptr, offs, n, MASKED)
    slot = _load(shadow_ptr, offs, n, MASKED)
    if PACKED:
        # int16 and int32 views: reinterpret as unsigned, work in uint32.
        model_bits = model.to(tl.uint16, bitcast=True).to(tl.uint32)
        new_model, new_slot = _swap_bits(model_bits, slot.to(tl.uint32, bitcast=True), INVERSE)
        _store(weights_ptr, offs, new_model.to(tl.uint16).to(tl.int16, bitcast=True), n, MASKED)
        _store(shadow_ptr, offs, new_slot.to(tl.int32, bitcast=True), n, MASKED)
    else:
        _store(weights_ptr, offs, slot, n, MASKED)
        _store(shadow_ptr, offs, model, n, MASKED)


@triton.jit
def _swap_kernel(
    table_ptr,
    owner_ptr,
    size,
    weights_ptr,
    shadow_ptr,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    PACKED: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, n, weights_ptr, shadow_ptr = _place(
        table_ptr, owner_ptr, size, (weights_ptr, shadow_ptr), IS_LIST, ALIGNED, BLOCK
    )
    if start + BLOCK <= n:
        _swap_block(weights_ptr, shadow_ptr, start, n, PACKED, INVERSE, False, BLOCK)
    else:
        _swap_block(weights_ptr, shadow_ptr, start, n, PACKED, INVERSE, True, BLOCK)


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


def _flags(weights, shadow, inverse):
    return {
        "PACKED": weights.dtype != shadow.dtype,
        "INVERSE": bool(inverse),
        **_launch.shape_flags(weights.dtype, shadow.dtype),
    }


def swap_(weights: torch.Tensor, shadow: torch.Tensor, inverse: bool = False) -> None:
    flags = _flags(weights, shadow, inverse)
    _launch.launch(_swap_kernel, (_bits(weights), _bits(shadow)), (), flags)


def swap_foreach_(weights, shadows, inverse: bool = False) -> None:
    flags = _flags(weights[0], shadows[0], inverse)
    columns = [[_bits(t) for t in weights], [_bits(t) for t in shadows]]
    _launch.launch(_swap_kernel, columns, (), flags, owners=[weights, shadows])

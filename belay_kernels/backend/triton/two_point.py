"""Two-point average: ``out <- (weights + snapshot) / 2`` in opmath, one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._blocks import _load, _offsets, _place, _store


@triton.jit
def _two_point_block(
    out_ptr,
    weights_ptr,
    snapshot_ptr,
    start,
    n,
    MASKED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = _offsets(start, BLOCK)
    weights = _load(weights_ptr, offs, n, MASKED).to(COMPUTE)
    snapshot = _load(snapshot_ptr, offs, n, MASKED).to(COMPUTE)
    _store(out_ptr, offs, (weights + snapshot) * 0.5, n, MASKED)


@triton.jit
def _two_point_average_kernel(
    table_ptr,
    owner_ptr,
    size,
    out_ptr,
    weights_ptr,
    snapshot_ptr,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, n, out_ptr, weights_ptr, snapshot_ptr = _place(
        table_ptr, owner_ptr, size, (out_ptr, weights_ptr, snapshot_ptr), IS_LIST, ALIGNED, BLOCK
    )
    if start + BLOCK <= n:
        _two_point_block(out_ptr, weights_ptr, snapshot_ptr, start, n, False, COMPUTE, BLOCK)
    else:
        _two_point_block(out_ptr, weights_ptr, snapshot_ptr, start, n, True, COMPUTE, BLOCK)


def _flags(*dtypes):
    return {"COMPUTE": _launch.compute_dtype(*dtypes), **_launch.shape_flags(*dtypes)}


def two_point_average_(out: torch.Tensor, weights: torch.Tensor, snapshot: torch.Tensor):
    tensors = (out, weights, snapshot)
    flags = _flags(*(t.dtype for t in tensors))
    _launch.launch(_two_point_average_kernel, tensors, (), flags)
    return out


def two_point_average_foreach_(outs, weights, snapshots):
    columns = [outs, weights, snapshots]
    flags = _flags(*(column[0].dtype for column in columns))
    _launch.launch(_two_point_average_kernel, columns, (), flags)
    return outs

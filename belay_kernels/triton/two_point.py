"""Two-point average: ``out <- (weights + snapshot) / 2`` in opmath, one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._blocks import _load, _offsets, _store, _table_block, _table_pointer


@triton.jit
def _two_point_block(out_ptr, weights_ptr, snapshot_ptr, start, n, MASKED: tl.constexpr,
                     COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(start, BLOCK)
    weights = _load(weights_ptr, offs, n, MASKED).to(COMPUTE)
    snapshot = _load(snapshot_ptr, offs, n, MASKED).to(COMPUTE)
    _store(out_ptr, offs, (weights + snapshot) * 0.5, n, MASKED)


@triton.jit
def _two_point_program(out_ptr, weights_ptr, snapshot_ptr, start, n, COMPUTE: tl.constexpr,
                       BLOCK: tl.constexpr):
    if start + BLOCK <= n:
        _two_point_block(out_ptr, weights_ptr, snapshot_ptr, start, n, False, COMPUTE, BLOCK)
    else:
        _two_point_block(out_ptr, weights_ptr, snapshot_ptr, start, n, True, COMPUTE, BLOCK)


@triton.jit
def _two_point_average_kernel(out_ptr, weights_ptr, snapshot_ptr, n, COMPUTE: tl.constexpr,
                              BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    _two_point_program(out_ptr, weights_ptr, snapshot_ptr, start, n, COMPUTE, BLOCK)


@triton.jit
def _two_point_average_foreach_kernel(table_ptr, owner_ptr, num_tensors, out_ptr,
                                      weights_ptr, snapshot_ptr, ALIGNED: tl.constexpr,
                                      COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, n = _table_block(table_ptr, owner_ptr, num_tensors, 3, BLOCK)
    out_ptr = _table_pointer(table_ptr, out_ptr, 0, tensor, num_tensors, ALIGNED)
    weights_ptr = _table_pointer(table_ptr, weights_ptr, 1, tensor, num_tensors, ALIGNED)
    snapshot_ptr = _table_pointer(table_ptr, snapshot_ptr, 2, tensor, num_tensors, ALIGNED)
    _two_point_program(out_ptr, weights_ptr, snapshot_ptr, start, n, COMPUTE, BLOCK)


def _flags(*dtypes):
    return {"COMPUTE": _launch.compute_dtype(*dtypes), **_launch.shape_flags(*dtypes)}


def two_point_average_(out: torch.Tensor, weights: torch.Tensor, snapshot: torch.Tensor):
    tensors = (out, weights, snapshot)
    flags = _flags(*(t.dtype for t in tensors))
    _launch.launch_flat(_two_point_average_kernel, tensors, (), flags)
    return out


def two_point_average_foreach_(outs, weights, snapshots):
    columns = [outs, weights, snapshots]
    flags = _flags(*(column[0].dtype for column in columns))
    _launch.launch_foreach(_two_point_average_foreach_kernel, columns, (), flags)
    return outs

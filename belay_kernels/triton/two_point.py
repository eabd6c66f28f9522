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


def two_point_average_(out: torch.Tensor, weights: torch.Tensor, snapshot: torch.Tensor):
    n = out.numel()
    if n:
        dtypes = (out.dtype, weights.dtype, snapshot.dtype)
        block = _launch.block_size(*dtypes)
        _two_point_average_kernel[_launch.grid(n, block)](
            out, weights, snapshot, n, COMPUTE=_launch.compute_dtype(*dtypes), BLOCK=block,
            num_warps=_launch.NUM_WARPS)
    return out


def two_point_average_foreach(outs, weights, snapshots):
    table = _launch.PointerTable.of([outs, weights, snapshots])
    if table.num_blocks:
        dtypes = (outs[0].dtype, weights[0].dtype, snapshots[0].dtype)
        _two_point_average_foreach_kernel[(table.num_blocks,)](
            *table.launch_args(), ALIGNED=table.aligned, COMPUTE=_launch.compute_dtype(*dtypes),
            BLOCK=table.block, num_warps=_launch.NUM_WARPS)
    return outs

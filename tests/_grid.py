"""The one switch to the simulated CUDA grid, for the tests.

The compiled CPU module also registers a second op library, ``belay_kernels_grid``
(csrc/registration.cpp, csrc/cpu_loops.h): the same schemas, whose CPU kernels run the
CUDA kernels' bodies over a simulated grid of blocks and threads. Inside
:func:`simulated_grid`, backend ``"cpp"`` calls those ops: the functions of
:mod:`belay_kernels.backend._compiled` call their module's ``_ops``, which this swaps."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def simulated_grid(blocks: int, threads: int, chunk: int = 64):
    """Backend "cpp" runs the compiled CUDA bodies on a simulated grid of ``blocks`` blocks
    of ``threads`` threads inside the block, tensor lists cut into chunks of ``chunk``
    elements."""
    from belay_kernels import _C
    from belay_kernels.backend import _compiled

    _C._simulate_cuda_grid(blocks, threads, chunk)
    _compiled._ops = torch.ops.belay_kernels_grid
    try:
        yield
    finally:
        _compiled._ops = torch.ops.belay_kernels
        _C._simulate_cuda_grid(0, 0, 0)

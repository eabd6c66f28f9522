"""torch's intra-op thread count, set for one block of code."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's intra-op thread count set to ``n`` inside the block, restored after: tiny
    tensors run fastest on one thread, and a shared machine's spinning threads slow all."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)

"""The bytes each method must move: every input read once, every output written once.

GB/s figures divide these counts by the measured time, so a method that reads or
writes more than the minimum shows up as a lower GB/s rather than a flattering one.
Every implementation of a method (our backends and the peers) is charged the same
minimal count: a peer that makes extra passes over memory is slower, not "busier".
"""

from __future__ import annotations

import torch

from .. import methods as _table

METHODS = _table.NAMES

# method -> (operands read, operands written) for one call of the op.
TRAFFIC = {m.name: (m.read, m.written) for m in _table.METHODS}

# Which dtype each operand is stored in: the model's or the shadow's. The two-point
# snapshot is an exact copy of past weights and its output is a model, so both are kept
# in the weights' dtype (as belay_kernels.averagers.TwoPoint keeps them).
OPERAND_KIND = {role: m.storage(role) for m in _table.METHODS for role in m.tensors}

# Op calls in one timed step. A timed swap is what `averaged()` does around an
# evaluation: swap the shadow in, then swap it back (two exchanges).
CALLS_PER_STEP = {m.name: m.calls_per_step for m in _table.METHODS}


def operand_dtype(operand: str, weights_dtype: torch.dtype, shadow_dtype: torch.dtype):
    return weights_dtype if OPERAND_KIND[operand] == "weights" else shadow_dtype


def bytes_per_call(method: str, numel: int, weights_dtype, shadow_dtype) -> int:
    """Minimal bytes one call of ``method`` over ``numel`` elements moves."""
    reads, writes = TRAFFIC[method]
    itemsize = lambda op: operand_dtype(op, weights_dtype, shadow_dtype).itemsize  # noqa: E731
    return numel * (sum(itemsize(op) for op in reads) + sum(itemsize(op) for op in writes))


def bytes_per_step(method: str, numel: int, weights_dtype, shadow_dtype) -> int:
    """Minimal bytes one timed step of ``method`` moves (see CALLS_PER_STEP)."""
    return CALLS_PER_STEP[method] * bytes_per_call(method, numel, weights_dtype, shadow_dtype)


def copy_bytes(numel: int, dtype: torch.dtype) -> int:
    """A streaming copy reads the source once and writes the destination once."""
    return 2 * numel * dtype.itemsize


def working_set_bytes(method: str, numel: int, weights_dtype, shadow_dtype) -> int:
    """Bytes of all distinct operands of ``method`` (what must not sit in cache)."""
    reads, writes = TRAFFIC[method]
    return numel * sum(
        operand_dtype(op, weights_dtype, shadow_dtype).itemsize
        for op in dict.fromkeys(reads + writes)
    )

"""The backend functions (see belay_kernels._backends) on top of the compiled ops, shared
by the ``cpp`` and ``cuda`` backends: the registered ops choose the CPU or CUDA kernel
from the tensors' device. They are made from the method table, one pair per op.

The ops layer has already checked the arguments; this module only converts them to the
ops' schema (csrc/op_entries.h): a hyperparameter is a number, or a one-element tensor
passed alongside (converted to float64 / int64 on the tensors' device, where the kernel
reads it). The schema takes the scalars' numbers, then their tensors, then the flags.
"""

from __future__ import annotations

import contextlib

import torch

from ..methods import BY_OP, DTYPE_PAIRS, METHODS, MULTI_EMA
from ..reference import swap_supported

_PAIRS = frozenset(DTYPE_PAIRS)
# Each op by its flat or its foreach name.
_METHOD_OF = {name: m for m in BY_OP.values() for name in (m.op, m.foreach)}

# The backend registry calls unavailable_reason() (which loads the compiled module) before
# it hands out this module, so the ops exist by the time these functions run. A plain
# attribute keeps the functions traceable by torch.compile; simulated_grid() swaps it.
_ops = torch.ops.belay_kernels

# The compiled kernels read flat contiguous storage.
REQUIRES_CONTIGUOUS = True


def max_profiles() -> int:
    """The most shadows one compiled multi_ema_update_ call takes (csrc/profiles.h)."""
    from .. import _C

    return _C.MAX_PROFILES


def supports(op: str, dtypes) -> bool:
    """Which dtype rows (in the ops' argument order) have a compiled kernel."""
    method = _METHOD_OF[op]
    if method is MULTI_EMA:
        *shadows, weights = dtypes
        return (
            1 <= len(shadows) <= max_profiles()
            and len(set(shadows)) == 1
            and (weights, shadows[0]) in _PAIRS
        )
    of = dict(zip(method.tensors, dtypes))
    weights_role, shadow_role = method.kernel_pair
    if method.exact:
        return swap_supported(of[weights_role], of[shadow_role])
    others_match = all(of[r] == of[weights_role] for r in method.tensors if r != shadow_role)
    return others_match and (of[weights_role], of[shadow_role]) in _PAIRS


def _number_or_tensor(value, like: torch.Tensor | None, dtype: torch.dtype):
    """(number, None) or (0, value as a one-element ``dtype`` tensor on like's device)."""
    if isinstance(value, torch.Tensor):
        on_cpu = value.device.type == "cpu" or like is None
        device = value.device if on_cpu else like.device
        return 0, value.to(device=device, dtype=dtype).reshape(1)
    return value, None


_KINDS = {"rate": (float, torch.float64), "count": (int, torch.int64)}


def _schema_scalars(scalars, values, like) -> list:
    """The table's scalar values as the schema takes them: numbers, tensors, flags."""
    numbers, tensors, flags = [], [], []
    for scalar, value in zip(scalars, values):
        if scalar.kind == "flag":
            flags.append(bool(value))
            continue
        cast, dtype = _KINDS[scalar.kind]
        number, tensor = _number_or_tensor(value, like, dtype)
        numbers.append(cast(number))
        tensors.append(tensor)
    return numbers + tensors + flags


def _entry_points(method):
    """The flat and foreach backend functions of a table-shaped op, with the table's
    signature (tensors, scalars, then the skip policy), written as source once."""
    scalars = [s.name for s in method.scalars]
    policy = ["skip_nonfinite", "skipped"] if method.counts_skipped else []
    defaults = ["skip_nonfinite=True", "skipped=None"] if method.counts_skipped else []
    namespace: dict = {}
    for name, like in ((method.op, "{0}"), (method.foreach, "{0}[0] if len({0}) else None")):
        tensors = (
            list(method.tensors) if name == method.op else [f"{r}_list" for r in method.tensors]
        )
        values = "(" + "".join(f"{n}, " for n in scalars) + ")"
        source = (
            f"def {name}({', '.join(tensors + scalars + defaults)}):\n"
            f"    _ops.{name}({', '.join(tensors)}, *_schema_scalars("
            f"BY_OP[{method.op!r}].scalars, {values}, {like.format(tensors[0])}), "
            f"{', '.join(policy)})\n"
        )
        # In this module's globals, so that _ops is looked up as in hand-written code.
        exec(source, globals(), namespace)  # noqa: S102 (source from the method table only)
    return namespace[method.op], namespace[method.foreach]


def _rates(decays, like):
    """The decays as the multi-EMA ops take them: numbers, and a tensor or None each."""
    pairs = [_number_or_tensor(decay, like, torch.float64) for decay in decays]
    return [float(number) for number, _ in pairs], [tensor for _, tensor in pairs]


def multi_ema_update_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    _ops.multi_ema_update_(
        list(shadows), weights, *_rates(decays, weights), skip_nonfinite, skipped
    )


def multi_ema_update_foreach_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    flat = [t for profile in shadows for t in profile]  # profile after profile
    like = weights[0] if len(weights) else None
    _ops.multi_ema_update_foreach_(
        flat, list(weights), *_rates(decays, like), skip_nonfinite, skipped
    )


for _method in METHODS:
    globals()[_method.op], globals()[_method.foreach] = _entry_points(_method)
del _method

__all__ = [name for m in (*METHODS, MULTI_EMA) for name in (m.op, m.foreach)]


@contextlib.contextmanager
def simulated_grid(blocks: int, threads: int, chunk: int = 64):
    """Test machinery: inside it, the ``cpp`` backend runs the CUDA kernels' bodies on a
    simulated grid of ``blocks`` x ``threads`` (tensor lists in chunks of ``chunk``
    elements), through the ops of ``torch.ops.belay_kernels_grid``."""
    global _ops
    from .. import _C

    _C._simulate_cuda_grid(blocks, threads, chunk)
    _ops = torch.ops.belay_kernels_grid
    try:
        yield
    finally:
        _ops = torch.ops.belay_kernels
        _C._simulate_cuda_grid(0, 0, 0)

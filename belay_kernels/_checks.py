"""Argument checks shared by every op and averager.

Every check runs before any tensor is written, and every message says what was passed,
what was expected, and how to fix it. Checks read only metadata (shape, dtype, device,
addresses); a hyperparameter passed as a tensor is not read back, since that would
synchronise with the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONFINITE_POLICIES = ("skip", "propagate")


class BelayInputError(ValueError):
    """Bad input to a belay_kernels op or averager. Nothing was modified."""


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise BelayInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype not in FLOAT_DTYPES:
        raise BelayInputError(
            f"{name} has dtype {t.dtype}; averaging needs a floating-point tensor "
            f"(one of {', '.join(str(d) for d in FLOAT_DTYPES)}). Integer tensors such as "
            "BatchNorm's num_batches_tracked are copied, not averaged."
        )
    return t


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (0, 0)
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        step = (size - 1) * stride * t.element_size()
        if step < 0:
            lo += step
        else:
            hi += step
    return lo, hi + t.element_size()


def tensors_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` may share memory (conservative on strided views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a_lo, a_hi = _byte_span(a)
    b_lo, b_hi = _byte_span(b)
    return a_lo < b_hi and b_lo < a_hi


def check_pair(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Same shape, same device, floating dtypes, and no two tensors sharing memory."""
    for name, t in zip(names, tensors):
        check_float_tensor(name, t)
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != first.shape:
            raise BelayInputError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; they must match element for element."
            )
        if t.device != first.device:
            raise BelayInputError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                f"move one of them (e.g. {name}.to({str(first.device)!r}))."
            )
    for i, (name_a, a) in enumerate(zip(names, tensors)):
        for name_b, b in zip(names[i + 1 :], tensors[i + 1 :]):
            if tensors_overlap(a, b):
                raise BelayInputError(
                    f"{name_a} and {name_b} share memory; the update would read values it "
                    f"has already written. Give {name_b} its own storage (e.g. {name_a}.clone())."
                )


def check_unit_interval(name: str, value: object, device: torch.device) -> None:
    """A rate in [0, 1]: a Python number, or a 0-d floating tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise BelayInputError(
                f"{name} as a tensor must be a single floating-point value, got "
                f"shape {tuple(value.shape)} dtype {value.dtype}."
            )
        if value.device != device and value.device.type != "cpu":
            raise BelayInputError(
                f"{name} is on {value.device} but the tensors are on {device}; move it "
                f"({name}.to({str(device)!r})) or pass a CPU tensor or a number."
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BelayInputError(f"{name} must be a number in [0, 1], got {value!r}.")
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise BelayInputError(f"{name} must be in [0, 1], got {value!r}.")


def check_count(value: object, device: torch.device) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise BelayInputError(
                f"count as a tensor must be a single integer value, got shape "
                f"{tuple(value.shape)} dtype {value.dtype}."
            )
        if value.device != device and value.device.type != "cpu":
            raise BelayInputError(
                f"count is on {value.device} but the tensors are on {device}; move it "
                f"(count.to({str(device)!r})) or pass a CPU tensor or an int."
            )
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BelayInputError(
            f"count is how many models the shadow already averages: an int >= 0, got {value!r}."
        )


def check_nonfinite(policy: object) -> bool:
    """Returns True for 'skip'."""
    if policy not in NONFINITE_POLICIES:
        raise BelayInputError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}.")
    return policy == "skip"


def check_skipped(skipped: object, device: torch.device) -> None:
    if skipped is None:
        return
    if (
        not isinstance(skipped, torch.Tensor)
        or skipped.dtype != torch.int64
        or skipped.numel() != 1
        or skipped.device != device
    ):
        got = (
            f"{skipped.dtype} tensor of shape {tuple(skipped.shape)} on {skipped.device}"
            if isinstance(skipped, torch.Tensor)
            else type(skipped).__name__
        )
        raise BelayInputError(
            f"skipped must be a one-element int64 tensor on {device} (e.g. "
            f"torch.zeros((), dtype=torch.int64, device={str(device)!r})), got {got}."
        )

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
    """True when ``a`` and ``b`` may share memory (conservative on strided views). Meta
    tensors hold no memory (all report address 0), so they share none."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.is_meta:
        return False
    a_lo, a_hi = _byte_span(a)
    b_lo, b_hi = _byte_span(b)
    return a_lo < b_hi and b_lo < a_hi


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` may share memory (stride 0 from ``expand()``, or an
    ``as_strided`` layout that folds onto itself). Exact for every layout that slicing,
    transposing and permuting produce; conservative for the rest."""
    reach = 0  # the largest offset the dims with smaller strides reach
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_written(name: str, t: torch.Tensor) -> None:
    """A tensor the op writes must give every element its own memory."""
    if has_internal_overlap(t):
        raise BelayInputError(
            f"{name} (shape {tuple(t.shape)}, strides {tuple(t.stride())}) has elements that "
            "share memory, e.g. from expand(); the op writes it, so each element needs its "
            f"own memory. Pass a tensor with its own storage ({name}.contiguous() is one)."
        )


def check_rows_disjoint(
    names: Sequence[str], rows: Sequence[Sequence[torch.Tensor]], written: Sequence[int]
) -> None:
    """No tensor that any row writes (columns ``written``) shares memory with any other
    tensor of the call, in any row: a later row would read what an earlier one wrote.
    Reading one tensor twice is fine. One sort by address, so long lists stay cheap."""
    spans = []
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if t.numel() > 0 and not t.is_meta:
                lo, hi = _byte_span(t)
                spans.append((str(t.device), lo, hi, j in written, f"{names[j]}[{i}]"))
    spans.sort(key=lambda span: span[:2])
    furthest = {}  # device -> (hi, name) of the span reaching furthest so far, any / written
    for device, lo, hi, is_written, name in spans:
        any_hi, any_name = furthest.get((device, False), (0, ""))
        w_hi, w_name = furthest.get((device, True), (0, ""))
        other = any_name if is_written and any_hi > lo else w_name if w_hi > lo else None
        if other is not None:
            raise BelayInputError(
                f"{other} and {name} share memory; the call would read or write values it "
                f"has already written. Give each tensor its own storage (e.g. {name}.clone())."
            )
        if hi > any_hi:
            furthest[(device, False)] = (hi, name)
        if is_written and hi > w_hi:
            furthest[(device, True)] = (hi, name)


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


# The largest count: count + 1 must still fit the kernels' int64.
MAX_COUNT = 2**63 - 2
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_scalar_tensor(name, value, dtypes, kind, device) -> None:
    """One value (shape () or (1,), so it broadcasts against any tensor) of ``dtypes``, on
    ``device`` or the CPU. Its value is not read here (no host sync): the kernels guard it."""
    if value.numel() != 1 or value.dim() > 1 or value.dtype not in dtypes:
        raise BelayInputError(
            f"{name} as a tensor must hold one {kind} value, shape () or (1,), got shape "
            f"{tuple(value.shape)} dtype {value.dtype} (e.g. torch.tensor(..., "
            f"dtype={dtypes[-1]}))."
        )
    if device is not None and value.device != device and value.device.type != "cpu":
        raise BelayInputError(
            f"{name} is on {value.device} but the tensors are on {device}; move it "
            f"({name}.to({str(device)!r})) or pass a CPU tensor or a number."
        )


def check_unit_interval(name: str, value: object, device: torch.device | None) -> None:
    """A rate in [0, 1]: a Python number, or a one-value floating tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        _check_scalar_tensor(name, value, FLOAT_DTYPES, "floating-point", device)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BelayInputError(f"{name} must be a number in [0, 1], got {value!r}.")
    if (isinstance(value, float) and math.isnan(value)) or not 0 <= value <= 1:
        raise BelayInputError(f"{name} must be in [0, 1], got {value!r}.")


def check_count(value: object, device: torch.device | None) -> None:
    if isinstance(value, torch.Tensor):
        _check_scalar_tensor("count", value, INT_DTYPES, "integer", device)
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise BelayInputError(
            "count is how many models the shadow already averages: an int in "
            f"[0, 2**63 - 2], got {value!r}."
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

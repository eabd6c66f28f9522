"""Kernel launches planned once: the checked tensor rows of an op, grouped by the backend
function that runs them.

The functional ops (:mod:`belay_kernels.ops`) plan and launch at every call. An averager
plans when it is built (and again only when its tensors change, see
:mod:`belay_kernels.bound`), so that its ``step()`` only computes the step's scalars and
calls each :class:`Launch`: one call per flat buffer, one multi-tensor call per list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _backends, distributed
from ._checks import BelayInputError, check_pair, check_rows_disjoint, check_written
from .methods import BY_OP, MULTI_EMA

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True, slots=True)
class Launch:
    """One call of a backend function: ``kernel(*tensors, <the step's scalars>, skipped)``
    for an op that counts skipped elements, ``kernel(*tensors, <scalars>)`` otherwise.
    ``tensors`` are the op's tensor arguments in its order: tensors, or for the foreach
    variant one list per role (the multi-EMA op: the K shadows as one list, then the
    weights)."""

    kernel: Callable
    tensors: tuple
    skipped: torch.Tensor | None


def checked_rows(
    names: Sequence[str], args: Sequence[TensorOrList], written: Sequence[int]
) -> list[tuple[torch.Tensor, ...]]:
    """Turn (tensor, tensor, ...) or (list, list, ...) into checked rows of tensors; the
    columns ``written`` are the ones the op writes."""
    args = distributed.local_args(names, args)  # DTensors: their local shards
    if all(isinstance(a, torch.Tensor) for a in args):
        rows = [tuple(args)]
        check_pair(names, rows[0])
        for j in written:
            check_written(names[j], rows[0][j])
        return rows
    lists = []
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor) or not isinstance(a, Sequence):
            raise BelayInputError(
                f"{name} must be a tensor or a list of tensors like the others, "
                f"got {type(a).__name__}."
            )
        lists.append(list(a))
    lengths = {len(lst) for lst in lists}
    if len(lengths) != 1:
        counts = ", ".join(f"{n}: {len(lst)}" for n, lst in zip(names, lists))
        raise BelayInputError(f"the tensor lists differ in length ({counts}).")
    rows = list(zip(*lists))
    for i, row in enumerate(rows):
        check_pair([f"{n}[{i}]" for n in names], row)
        for j in written:
            check_written(f"{names[j]}[{i}]", row[j])
    check_rows_disjoint(names, rows, written)
    devices = {row[0].device for row in rows}
    if len(devices) > 1:
        raise BelayInputError(
            f"one call covers one device, but the lists span {sorted(map(str, devices))}; "
            "call once per device."
        )
    return rows


def roles(op: str, columns: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``op``'s tensor roles as its checks name them, and the columns it writes, for a call
    with ``columns`` tensor columns (the multi-EMA op: K shadows, ``shadows[0]``, ...,
    then the weights)."""
    method = BY_OP[op]
    if method is MULTI_EMA:
        k = columns - 1
        return (*(f"shadows[{p}]" for p in range(k)), "weights"), tuple(range(k))
    return method.tensors, method.written_columns


def launches(
    op: str, rows: Sequence[tuple[torch.Tensor, ...]], backend: str, skipped=None
) -> list[Launch]:
    """The launches that run ``op`` on checked ``rows``: rows of one device type, dtypes
    and layout go to one backend function, its foreach variant when there are several.
    Every group's backend is resolved before this returns, so a refusal comes before any
    launch runs."""
    _backends.check_name(backend)  # also when there is nothing to run
    method = BY_OP[op]
    groups: dict[tuple, list] = {}
    for row in rows:
        key = (
            row[0].device.type,
            tuple(t.dtype for t in row),
            all(t.is_contiguous() for t in row),
        )
        groups.setdefault(key, []).append(row)
    resolved = [
        (_backends.resolve(backend, op, device_type, dtypes, contiguous), group)
        for (device_type, dtypes, contiguous), group in groups.items()
    ]
    planned = []
    for module, group in resolved:
        foreach = getattr(module, method.foreach, None)
        if foreach is not None and len(group) > 1:
            columns = [list(column) for column in zip(*group)]
            planned.append(Launch(foreach, _arguments(method, columns), skipped))
        else:
            planned += [
                Launch(getattr(module, op), _arguments(method, row), skipped) for row in group
            ]
    return planned


def run(op: str, rows, backend: str, scalars: tuple, skipped=None) -> None:
    """Plan ``op`` on checked ``rows`` and run every launch, outside autograd (the
    functional ops' path): ``kernel(*tensors, *scalars)``, and then the skipped counter for
    an op that counts. Every backend is resolved before the first launch runs."""
    planned = launches(op, rows, backend, skipped)
    counts = BY_OP[op].counts_skipped
    with torch.no_grad():
        for launch in planned:
            if counts:
                launch.kernel(*launch.tensors, *scalars, launch.skipped)
            else:
                launch.kernel(*launch.tensors, *scalars)


def _arguments(method, row_or_columns) -> tuple:
    """An op's tensor arguments from a row (or columns): the multi-EMA op takes its K
    shadows as one list."""
    if method is MULTI_EMA:
        return (list(row_or_columns[:-1]), row_or_columns[-1])
    return tuple(row_or_columns)

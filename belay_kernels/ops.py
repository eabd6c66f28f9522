"""Functional in-place ops on flat tensors: check the arguments once, then dispatch.

Each op takes either tensors or equal-length lists of tensors (the tensor-list path, for
parameters that cannot live in a flat buffer), and ``backend="auto"`` or a backend name
from :func:`belay_kernels.backends`. All checks run before any memory is written; a
failing check raises :class:`BelayInputError` and leaves every tensor untouched.

The math of each op is in :mod:`belay_kernels.reference`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

from . import _backends, distributed
from ._checks import (
    BelayInputError,
    check_count,
    check_nonfinite,
    check_pair,
    check_rows_disjoint,
    check_skipped,
    check_unit_interval,
    check_written,
)
from .methods import BY_OP, MULTI_EMA
from .reference import SWAP_PAIRS, swap_supported

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _checked_rows(
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


def _checked(names, tensors, written, nonfinite, skipped):
    """Rows, their device, and the non-finite flag, for the ops that update a shadow."""
    rows = _checked_rows(names, tensors, written)
    device = rows[0][0].device if rows else torch.device("cpu")
    skip = check_nonfinite(nonfinite)
    check_skipped(skipped, device)
    return rows, device, skip


# Inside all_checked_first(), the ops of this thread queue their checked plans here.
_deferred = threading.local()


@contextlib.contextmanager
def all_checked_first() -> Iterator[None]:
    """Ops called inside the block check their arguments and choose their backends, but
    run nothing; when the block ends without an exception, every planned kernel runs, in
    call order. So a bad argument to any of the calls leaves all their tensors untouched
    (what an averager's step() needs). The calls must not read what an earlier one writes."""
    outer = getattr(_deferred, "plans", None)
    _deferred.plans = plans = []
    try:
        yield
    finally:
        _deferred.plans = outer
    if outer is not None:  # nested: the outermost block runs them
        outer.extend(plans)
        return
    for plan in plans:
        plan()


def _plan(op: str, rows, backend: str) -> list[tuple]:
    """(backend module, rows) for every group of rows that go to the same module."""
    _backends.check_name(backend)  # also when there is nothing to run
    groups: dict[tuple, list] = {}
    for row in rows:
        key = (
            row[0].device.type,
            tuple(t.dtype for t in row),
            all(t.is_contiguous() for t in row),
        )
        groups.setdefault(key, []).append(row)
    # Resolve every group before running any, so a refusal leaves all tensors untouched.
    return [
        (_backends.resolve(backend, op, device_type, dtypes, contiguous), group)
        for (device_type, dtypes, contiguous), group in groups.items()
    ]


def _dispatch(op: str, rows, args: tuple, backend: str) -> None:
    """Run ``op`` on every row (or queue it, inside all_checked_first())."""
    plan = _plan(op, rows, backend)

    def run() -> None:
        with torch.no_grad():
            for module, group in plan:
                foreach = getattr(module, BY_OP[op].foreach, None)
                if foreach is not None and len(group) > 1:
                    foreach(*(list(column) for column in zip(*group)), *args)
                else:
                    fn = getattr(module, op)
                    for row in group:
                        fn(*row, *args)

    _run_or_defer(run)


def _run_or_defer(run) -> None:
    """Run now, or queue inside all_checked_first()."""
    plans = getattr(_deferred, "plans", None)
    if plans is None:
        run()
    else:
        plans.append(run)


def ema_update_(
    shadow: TensorOrList,
    weights: TensorOrList,
    *,
    decay: float | torch.Tensor,
    nonfinite: str = "skip",
    skipped: torch.Tensor | None = None,
    backend: str = "auto",
) -> TensorOrList:
    """``shadow <- shadow + (1 - decay) (weights - shadow)``, in place."""
    rows, device, skip = _checked(
        ("shadow", "weights"), (shadow, weights), (0,), nonfinite, skipped
    )
    check_unit_interval("decay", decay, device)
    _dispatch("ema_update_", rows, (decay, skip, skipped), backend)
    return shadow


def multi_ema_update_(
    shadows: Sequence[TensorOrList],
    weights: TensorOrList,
    *,
    decays: Sequence[float | torch.Tensor],
    nonfinite: str = "skip",
    skipped: torch.Tensor | None = None,
    backend: str = "auto",
) -> Sequence[TensorOrList]:
    """K EMAs of the same weights from one read of them: for each k,
    ``shadows[k] <- shadows[k] + (1 - decays[k]) (weights - shadows[k])``, bit for bit as
    K :func:`ema_update_` calls (``skipped`` counts each profile's kept elements).
    ``shadows`` holds K tensors (or K lists like ``weights``); ``decays`` one decay each."""
    if isinstance(shadows, torch.Tensor) or not isinstance(shadows, Sequence) or not shadows:
        raise BelayInputError(
            "shadows must be a non-empty list of K shadows (each a tensor or a list of "
            f"tensors shaped like weights), got {type(shadows).__name__}"
            + (" of length 0" if isinstance(shadows, Sequence) and not shadows else "")
            + "."
        )
    if (
        isinstance(decays, torch.Tensor)
        or not isinstance(decays, Sequence)
        or len(decays) != len(shadows)
    ):
        raise BelayInputError(
            f"decays must be a list of one decay per shadow ({len(shadows)}), got {decays!r}."
        )
    k = len(shadows)
    names = tuple(f"shadows[{i}]" for i in range(k)) + ("weights",)
    rows, device, skip = _checked(names, (*shadows, weights), tuple(range(k)), nonfinite, skipped)
    for i, decay in enumerate(decays):
        check_unit_interval(f"decays[{i}]", decay, device)
    plan = _plan(MULTI_EMA.op, rows, backend)
    decays = list(decays)

    def run() -> None:
        with torch.no_grad():
            for module, group in plan:
                foreach = getattr(module, MULTI_EMA.foreach, None)
                if foreach is not None and len(group) > 1:
                    columns = [list(column) for column in zip(*group)]
                    foreach(columns[:k], columns[k], decays, skip, skipped)
                else:
                    for row in group:
                        module.multi_ema_update_(list(row[:k]), row[k], decays, skip, skipped)

    _run_or_defer(run)
    return shadows


def swa_update_(
    shadow: TensorOrList,
    weights: TensorOrList,
    *,
    count: int | torch.Tensor,
    nonfinite: str = "skip",
    skipped: torch.Tensor | None = None,
    backend: str = "auto",
) -> TensorOrList:
    """Equal running mean: ``shadow <- shadow + (weights - shadow) / (count + 1)``, where
    ``count`` is how many models the shadow already holds (0 copies). The caller
    increments its count afterwards."""
    rows, device, skip = _checked(
        ("shadow", "weights"), (shadow, weights), (0,), nonfinite, skipped
    )
    check_count(count, device)
    _dispatch("swa_update_", rows, (count, skip, skipped), backend)
    return shadow


def belay_step_(
    weights: TensorOrList,
    shadow: TensorOrList,
    *,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    nonfinite: str = "skip",
    skipped: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[TensorOrList, TensorOrList]:
    """BELAY after the optimizer's step, both sides read before either write:
    ``weights <- weights + beta (shadow - weights)`` and
    ``shadow <- shadow + alpha (weights_before - shadow)``."""
    rows, device, skip = _checked(
        ("weights", "shadow"), (weights, shadow), (0, 1), nonfinite, skipped
    )
    check_unit_interval("alpha", alpha, device)
    check_unit_interval("beta", beta, device)
    _dispatch("belay_step_", rows, (alpha, beta, skip, skipped), backend)
    return weights, shadow


def two_point_average(
    weights: TensorOrList,
    snapshot: TensorOrList,
    *,
    out: TensorOrList | None = None,
    backend: str = "auto",
) -> TensorOrList:
    """``(weights + snapshot) / 2``, into ``out`` (a new tensor like ``weights`` if None)."""
    if out is None:
        if isinstance(weights, torch.Tensor):
            out = torch.empty_like(weights, memory_format=torch.contiguous_format)
        else:
            out = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    method = BY_OP["two_point_average_"]
    rows = _checked_rows(method.tensors, (out, weights, snapshot), method.written_columns)
    _dispatch(method.op, rows, (), backend)
    return out


def swap_(
    weights: TensorOrList,
    shadow: TensorOrList,
    *,
    inverse: bool = False,
    backend: str = "auto",
) -> None:
    """Exchange weights and shadow in place, exactly; ``inverse=True`` swaps back.

    For one dtype the swap is its own inverse. For bf16 weights with an fp32 shadow the
    model receives the shadow rounded to bf16 and both are restored bit for bit by the
    inverse (see :func:`belay_kernels.reference.swap_`)."""
    method = BY_OP["swap_"]
    rows = _checked_rows(method.tensors, (weights, shadow), method.written_columns)
    for row in rows:
        if not swap_supported(row[0].dtype, row[1].dtype):
            raise BelayInputError(
                f"no exact in-place swap for {row[0].dtype} weights with a {row[1].dtype} "
                f"shadow; supported: {', '.join(SWAP_PAIRS)}. Use copy_to() for evaluation, "
                "or choose shadow_dtype to match the weights."
            )
    _dispatch(method.op, rows, (bool(inverse),), backend)

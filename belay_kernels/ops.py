"""Functional in-place ops on flat tensors: check the arguments once, then dispatch.

Each op takes either tensors or equal-length lists of tensors (the tensor-list path, for
parameters that cannot live in a flat buffer), and ``backend="auto"`` or a backend name
from :func:`belay_kernels.backends`. All checks run before any memory is written; a
failing check raises :class:`BelayInputError` and leaves every tensor untouched.

The math of each op is in :mod:`belay_kernels.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import (
    BelayInputError,
    check_count,
    check_nonfinite,
    check_skipped,
    check_unit_interval,
)
from .plan import checked_rows, roles, run
from .reference import SWAP_PAIRS, swap_supported

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _checked(names, tensors, written, nonfinite, skipped):
    """Rows, their device, and the non-finite flag, for the ops that update a shadow."""
    rows = checked_rows(names, tensors, written)
    device = rows[0][0].device if rows else torch.device("cpu")
    skip = check_nonfinite(nonfinite)
    check_skipped(skipped, device)
    return rows, device, skip


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
    run("ema_update_", rows, backend, (decay, skip), skipped)
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
    names, written = roles("multi_ema_update_", len(shadows) + 1)
    rows, device, skip = _checked(names, (*shadows, weights), written, nonfinite, skipped)
    for i, decay in enumerate(decays):
        check_unit_interval(f"decays[{i}]", decay, device)
    run("multi_ema_update_", rows, backend, (list(decays), skip), skipped)
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
    run("swa_update_", rows, backend, (count, skip), skipped)
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
    run("belay_step_", rows, backend, (alpha, beta, skip), skipped)
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
    rows = checked_rows(("out", "weights", "snapshot"), (out, weights, snapshot), (0,))
    run("two_point_average_", rows, backend, ())
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
    rows = checked_rows(("weights", "shadow"), (weights, shadow), (0, 1))
    for row in rows:
        if not swap_supported(row[0].dtype, row[1].dtype):
            raise BelayInputError(
                f"no exact in-place swap for {row[0].dtype} weights with a {row[1].dtype} "
                f"shadow; supported: {', '.join(SWAP_PAIRS)}. Use copy_to() for evaluation, "
                "or choose shadow_dtype to match the weights."
            )
    run("swap_", rows, backend, (bool(inverse),))

"""The ``torch`` backend: the reference's ops, run without full-size temporaries.

:mod:`belay_kernels.reference` is the spec and computes out of place: every call allocates
several temporaries the size of the buffer, and on a large buffer their page faults cost
more than the arithmetic. This module gives the reference's results bit for bit
(``tests/test_torch_backend.py``, ``tests/test_fingerprints.py``) in one of two ways:

- **in place**, where the reference's new shadow is one ``lerp`` of the shadow toward the
  weights in their own dtype: an EMA or SWA step on fp32 or fp64 tensors with a number
  weight that does not round to 1 (the reference copies there), K such EMAs of one
  weights tensor too; under the non-finite skip the whole tensor when no incoming weight
  is NaN or infinite (then the skip keeps nothing), else, on the CPU, chunk by chunk,
  putting the old bits back where a weight is not finite;
- otherwise **the reference op itself, on matching chunks** of ``CPU_CHUNK`` elements
  (``DEVICE_CHUNK`` off the CPU). Every op is elementwise and its skipped counts add up
  over chunks, so chunking changes no bit, while the reference's temporaries exist only
  chunk-sized, in cache: peak memory grows by a few chunks, not by buffers.

On the CPU the chunk loop runs on ``CHUNK_THREADS`` threads: each chunk-sized call would
otherwise open a parallel region of its own, whose start costs more than it saves on a
chunk this small (and stalls whenever a core is busy elsewhere). The whole-tensor in-place
ops keep torch's thread count. The thread count is process-wide in torch, so ops run
concurrently from several Python threads see the change while a chunk loop runs.

Non-contiguous tensors cannot be cut into flat chunks: they run the reference whole. Lists
run tensor by tensor, except the in-place EMA/SWA lerp of one-dtype lists, which is one
``torch._foreach_lerp_`` (what timm's ModelEmaV3 does).
"""

from __future__ import annotations

import contextlib

import torch

from .. import reference
from ..reference import DEVICE_TYPES, one_minus, opmath_dtype, rounds_to_one, swa_weight

__all__ = ["DEVICE_TYPES"]  # the backend API; the ops below complete it

# A chunk's temporaries (a few per op, 512 KiB each in fp32) stay in a core's L2/L3 cache,
# while each torch call stays long enough that its microseconds of overhead do not show.
# Off the CPU there is no cache to fit: the chunk only bounds the scratch.
CPU_CHUNK = 1 << 17
DEVICE_CHUNK = 1 << 22
CHUNK_THREADS = 1


def _flat(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


@contextlib.contextmanager
def _chunk_threads(device: torch.device):
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= CHUNK_THREADS:
        yield
        return
    torch.set_num_threads(CHUNK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _per_chunk(op, tensors: tuple[torch.Tensor, ...], *args) -> None:
    """The reference ``op`` on matching chunks of the (contiguous) ``tensors``."""
    device = tensors[0].device
    size = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    n = tensors[0].numel()
    if n <= size:
        op(*tensors, *args)
        return
    flat = [t.view(-1) for t in tensors]
    with _chunk_threads(device):
        for start in range(0, n, size):
            op(*(t[start : start + size] for t in flat), *args)


def _surely_finite(t: torch.Tensor) -> bool:
    """True only if no element of the non-empty ``t`` is NaN or infinite. A NaN or an
    infinity makes a sum non-finite (an overflow only sends the caller to its exact slow
    path), and an fp32/fp64 sum reads the tensor once, faster than ``aminmax``; a 16-bit
    sum would overflow on ordinary weights, so those take ``aminmax``, which cannot."""
    if t.dtype in (torch.float32, torch.float64):
        return bool(torch.isfinite(t.sum()))
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _skip_needed(weights: torch.Tensor, skip_nonfinite: bool) -> bool:
    """The skip, unless the weights surely hold no NaN or infinity (then it keeps nothing,
    and the reference gives the same bits without it). Asked on the CPU only, where
    reading the answer costs no device synchronisation."""
    if not skip_nonfinite or weights.device.type != "cpu":
        return skip_nonfinite
    return weights.numel() > 0 and not _surely_finite(weights)


def _lerps_in_place(shadow: torch.Tensor, weights: torch.Tensor, weight) -> bool:
    """Whether the reference's new shadow, when it keeps no element, is
    ``shadow.lerp_(weights, weight)``: one dtype that is the math's own (the reference computes
    16-bit tensors in fp32 and stores them by its own NaN rule) and a number weight that
    does not round to 1."""
    op = opmath_dtype(shadow, weights)
    return (
        shadow.dtype == weights.dtype == op
        and not isinstance(weight, torch.Tensor)
        and not rounds_to_one(weight, op)
    )


def _lerps_(weights, shadows, rates, skip, skipped) -> None:
    """``shadow.lerp_(weights, rate)`` for each shadow; under ``skip`` every element whose
    weight is not finite gets its old bits back (the reference's keep, done in place: the
    lerp elsewhere is the reference's own). The few kept elements are found only in a
    chunk that has any, and the host reads the answer: CPU chunks only."""
    if not shadows:
        return
    keep = ~torch.isfinite(weights) if skip and not _surely_finite(weights) else None
    held = [s[keep] for s in shadows] if keep is not None else ()
    for s, rate in zip(shadows, rates):
        s.lerp_(weights, rate)
    for s, old in zip(shadows, held):
        s[keep] = old
        if skipped is not None:
            skipped.add_(old.numel())


def _lerpable(shadow, weights, weight, skip) -> bool:
    """Whether :func:`_lerps_` gives the reference's bits: see :func:`_lerps_in_place`."""
    return (not skip or weights.device.type == "cpu") and _lerps_in_place(shadow, weights, weight)


def _shadow_lerp_(spec, weight, shadow, weights, hyper, skip_nonfinite, skipped):
    """EMA and SWA: in place when the lerp is the whole update (and the skip keeps the few
    non-finite elements chunk by chunk), else ``spec`` per chunk."""
    if not _flat(shadow, weights):
        return spec(shadow, weights, hyper, skip_nonfinite, skipped)
    skip = _skip_needed(weights, skip_nonfinite)
    if not _lerpable(shadow, weights, weight, skip):
        _per_chunk(spec, (shadow, weights), hyper, skip, skipped)
    elif skip:
        _per_chunk(lambda s, w: _lerps_(w, (s,), (weight,), True, skipped), (shadow, weights))
    else:
        shadow.lerp_(weights, weight)  # whole: torch's own threads
    return shadow


def _number_weight(weight_of, hyper):
    """The reference's lerp weight for a number hyperparameter; a tensor stays a tensor
    (its lerp is never the in-place one)."""
    return hyper if isinstance(hyper, torch.Tensor) else weight_of(hyper)


def ema_update_(shadow, weights, decay, skip_nonfinite=True, skipped=None):
    weight = _number_weight(one_minus, decay)
    return _shadow_lerp_(
        reference.ema_update_, weight, shadow, weights, decay, skip_nonfinite, skipped
    )


def swa_update_(shadow, weights, count, skip_nonfinite=True, skipped=None):
    weight = _number_weight(swa_weight, count)
    return _shadow_lerp_(
        reference.swa_update_, weight, shadow, weights, count, skip_nonfinite, skipped
    )


def _shadow_lerp_foreach_(flat_op, weight, shadows, weights, hyper, skip_nonfinite, skipped):
    """One ``_foreach_lerp_`` when every row lerps in place, else ``flat_op`` per row."""
    if all(_lerps_in_place(s, w, weight) for s, w in zip(shadows, weights)) and not any(
        _skip_needed(w, skip_nonfinite) for w in weights
    ):
        torch._foreach_lerp_(list(shadows), list(weights), weight)
        return
    for s, w in zip(shadows, weights):
        flat_op(s, w, hyper, skip_nonfinite, skipped)


def ema_update_foreach_(shadows, weights, decay, skip_nonfinite=True, skipped=None):
    weight = _number_weight(one_minus, decay)
    _shadow_lerp_foreach_(ema_update_, weight, shadows, weights, decay, skip_nonfinite, skipped)


def swa_update_foreach_(shadows, weights, count, skip_nonfinite=True, skipped=None):
    weight = _number_weight(swa_weight, count)
    _shadow_lerp_foreach_(swa_update_, weight, shadows, weights, count, skip_nonfinite, skipped)


def multi_ema_update_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    """K EMAs of one weights tensor, chunk by chunk: each chunk of the weights is read from
    memory once and stays in cache while every profile takes its step from it."""
    shadows, decays = list(shadows), list(decays)
    if not _flat(weights, *shadows):
        reference.multi_ema_update_(shadows, weights, decays, skip_nonfinite, skipped)
        return
    skip = _skip_needed(weights, skip_nonfinite)
    rates = [_number_weight(one_minus, d) for d in decays]
    in_place = [_lerpable(s, weights, r, skip) for s, r in zip(shadows, rates)]
    spec = [k for k, fast in enumerate(in_place) if not fast]
    lerped = [k for k, fast in enumerate(in_place) if fast]

    def chunk(w, *chunks):
        _lerps_(w, [chunks[k] for k in lerped], [rates[k] for k in lerped], skip, skipped)
        if spec:
            reference.multi_ema_update_(
                [chunks[k] for k in spec], w, [decays[k] for k in spec], skip, skipped
            )

    _per_chunk(chunk, (weights, *shadows))


def multi_ema_update_foreach_(shadows, weights, decays, skip_nonfinite=True, skipped=None):
    """:func:`multi_ema_update_` per tensor; ``shadows`` holds K lists laid out like ``weights``."""
    for i, w in enumerate(weights):
        multi_ema_update_([profile[i] for profile in shadows], w, decays, skip_nonfinite, skipped)


def belay_step_(weights, shadow, alpha, beta, skip_nonfinite=True, skipped=None):
    if not _flat(weights, shadow):
        return reference.belay_step_(weights, shadow, alpha, beta, skip_nonfinite, skipped)
    skip = _skip_needed(weights, skip_nonfinite)
    _per_chunk(reference.belay_step_, (weights, shadow), alpha, beta, skip, skipped)
    return weights, shadow


def two_point_average_(out, weights, snapshot):
    if not _flat(out, weights, snapshot):
        return reference.two_point_average_(out, weights, snapshot)
    _per_chunk(reference.two_point_average_, (out, weights, snapshot))
    return out


def swap_(weights, shadow, inverse=False):
    if not _flat(weights, shadow):
        return reference.swap_(weights, shadow, inverse)
    _per_chunk(reference.swap_, (weights, shadow), inverse)
    return None


# --- the fused optimizer's ops (see reference.adam_average_) ----------------------------
# The fallback where no compiled kernel runs: the reference's optimizer step, whose ops are
# in place already (torch's own single-tensor step; torch's foreach ops would not do:
# on the CPU some round a 16-bit tensor's scalar differently), then the average through
# this backend's ops. Several passes over memory, not one. Reading the state steps and
# GradScaler's found_inf costs a device synchronisation off the CPU.


def _befores(params, average):
    """The weights from before the optimizer's step, which only the poster's form reads."""
    return [p.clone() for p in params] if average == "poster" else None


def _average_foreach_(average, scalars, params, befores, shadows, skip_nonfinite, skipped):
    n = len(params)
    if average == "ema" and len(scalars) == 1:
        ema_update_foreach_(shadows, params, scalars[0], skip_nonfinite, skipped)
    elif average == "ema":
        profiles = [shadows[k * n : (k + 1) * n] for k in range(len(scalars))]
        multi_ema_update_foreach_(profiles, params, list(scalars), skip_nonfinite, skipped)
    elif average == "swa":
        swa_update_foreach_(shadows, params, int(scalars[0]), skip_nonfinite, skipped)
    elif average == "belay":
        for w, s in zip(params, shadows):
            belay_step_(w, s, scalars[0], scalars[1], skip_nonfinite, skipped)
    elif average == "poster":
        for w, b, s in zip(params, befores, shadows):
            if _flat(w, b, s):
                skip = _skip_needed(b, skip_nonfinite)
                _per_chunk(reference.belay_poster_, (w, b, s), *scalars, skip, skipped)
            else:
                reference.belay_poster_(w, b, s, *scalars, skip_nonfinite, skipped)


def adam_average_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, shadows, grad_scale,
    found_inf, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, average,
    average_scalars, skip_nonfinite=True, skipped=None,
):  # fmt: skip
    if not params or reference.gradscaler_skips(grads, grad_scale, found_inf):
        return
    befores = _befores(params, average)
    reference.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                    beta1, beta2, eps, weight_decay, decoupled, maximize)  # fmt: skip
    _average_foreach_(average, average_scalars, params, befores, shadows, skip_nonfinite, skipped)


def sgd_average_(
    params, grads, momentum_buffers, shadows, grad_scale, found_inf, lr, momentum, dampening,
    weight_decay, nesterov, maximize, first_step, average, average_scalars, skip_nonfinite=True,
    skipped=None,
):  # fmt: skip
    if not params or reference.gradscaler_skips(grads, grad_scale, found_inf):
        return
    befores = _befores(params, average)
    reference.sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                   nesterov, maximize, first_step)  # fmt: skip
    _average_foreach_(average, average_scalars, params, befores, shadows, skip_nonfinite, skipped)

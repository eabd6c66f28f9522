"""The pure-PyTorch reference: the spec that every other backend is tested against.

Every function here updates flat (or same-shaped) tensors in place. The math runs in
``opmath``: float64 when either tensor is float64, float32 otherwise. Results are stored
back in each tensor's own dtype, so a bf16 model with an fp32 shadow is handled exactly
as a kernel that loads, upcasts, computes and downcasts would handle it.

These functions do not validate their arguments: :mod:`belay_kernels.ops` does that once,
for every backend, before any memory is touched. Scalar hyperparameters may be Python
numbers or 0-d tensors on the tensors' device (the form a CUDA graph needs).

The formulas, one per method (``s`` shadow, ``w`` weights, all read before any write):

====================  ==========================================================
EMA                   ``s <- lerp(s, w, 1 - decay)``
K EMAs                ``s_k <- lerp(s_k, w, 1 - decay_k)``, k = 1..K, one read of ``w``
SWA                   ``s <- lerp(s, w, 1 / (count + 1))`` (count 0 copies)
BELAY (post-step)     ``w <- lerp(w, s, beta)`` and ``s <- lerp(s, w, alpha)``
two-point average     ``out <- (w + snapshot) / 2``
====================  ==========================================================

Scalars are rounded to opmath before use; ``1 - decay`` is computed in float64 first.
``lerp`` is ``torch.lerp``: ``a + t (b - a)`` for ``t < 0.5`` and ``b - (b - a)(1 - t)``
otherwise, so a weight of 0 keeps; a weight of exactly 1 (after rounding to opmath)
copies ``b``, even over a non-finite ``a`` (where ``torch.lerp`` gives NaN). The EMA
therefore rounds exactly as ``torch._foreach_lerp_`` does (timm's ModelEmaV3,
``AveragedModel``).

Non-finite policy: with ``skip_nonfinite`` an element whose incoming weight is NaN or
inf keeps its previous shadow value, and the number of such elements is added to
``skipped`` (an int64 tensor) when one is given.

A hyperparameter held in a tensor is not read on the host; when it is out of range (a
NaN or negative decay, a negative count) the call leaves every tensor as it was and
counts every element in ``skipped``, whatever the non-finite policy.

A NaN stored into bf16 or fp16 is the canonical quiet NaN (0x7fc0, 0x7e00), so its bits
do not depend on where torch's conversion happened to run vectorized (the flat and the
list path agree bit for bit). The compiled kernels store the same bf16 NaN; into fp16
the CPU kernels keep the NaN's sign, and x86 arithmetic makes negative NaNs (0xfe00), so
there a NaN matches the reference as a NaN, not in its sign bit.
"""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor

# The reference runs wherever torch does.
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})


def opmath_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the math runs in: float64 if any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def one_minus(x: Scalar) -> Scalar:
    """``1 - x`` in float64, before any rounding to opmath: a Python number and a float64
    device tensor of the same value give the same rate, and ``EMA(decay=1 - alpha)`` gets
    the very rate ``Belay(alpha=alpha)`` uses."""
    if isinstance(x, torch.Tensor):
        return 1 - x.to(torch.float64)
    return 1.0 - x


def _up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: Scalar) -> torch.Tensor:
    """``torch.lerp``, except that a weight of exactly 1 copies ``end``. ``weight`` is a
    number or a tensor already in the math's dtype; a number counts as 1 when it rounds
    to 1 there, as it does in the kernels."""
    if isinstance(weight, torch.Tensor):
        return torch.where(weight == 1, end, torch.lerp(start, end, weight))
    if rounds_to_one(weight, start.dtype):
        return end.clone()
    return torch.lerp(start, end, weight)


def rounds_to_one(weight: float, dtype: torch.dtype) -> bool:
    """Whether a number weight is exactly 1 once rounded to ``dtype`` (then lerp copies)."""
    return torch.tensor(weight, dtype=dtype).item() == 1


def _is_rate(x: torch.Tensor) -> torch.Tensor:
    """Whether a tensor rate is in [0, 1] (False for NaN), on the device: no host sync."""
    return (x >= 0) & (x <= 1)


# The quiet NaN the compiled kernels store (c10's conversions), per 16-bit dtype.
_CANONICAL_NAN = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


def _store(target: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """``target.copy_(value)``; a NaN narrowed into bf16/fp16 gets the canonical bits.
    Where ``valid`` (a 0-d bool tensor) is False, ``target`` keeps its own bits, NaN
    payloads included, as the kernels that then write nothing keep them."""
    if valid is not None:
        narrowed = torch.empty_like(target)
        _store(narrowed, value)
        target.copy_(torch.where(valid, narrowed, target))
        return
    target.copy_(value)
    canonical = _CANONICAL_NAN.get(target.dtype)
    if canonical is not None and value.dtype != target.dtype:
        target.view(torch.int16).masked_fill_(torch.isnan(value), canonical)


def _kept(
    weights: torch.Tensor, skip_nonfinite: bool, valid: torch.Tensor | None
) -> torch.Tensor | None:
    """Where the shadow keeps its old value: non-finite incoming weights (under skip) and,
    for an out-of-range tensor hyperparameter (``valid`` False), everywhere. None: nowhere."""
    keep = ~torch.isfinite(weights) if skip_nonfinite else None
    if valid is not None:
        everywhere = (~valid).expand(weights.shape)
        keep = everywhere if keep is None else keep | everywhere
    return keep


def _keep_where(
    keep: torch.Tensor | None, old: torch.Tensor, new: torch.Tensor, skipped: torch.Tensor | None
) -> torch.Tensor:
    if keep is None:
        return new
    if skipped is not None:
        skipped.add_(keep.sum())
    return torch.where(keep, old, new)


def _shadow_update_(
    shadow: torch.Tensor,
    weights: torch.Tensor,
    new_shadow_fn,
    skip_nonfinite: bool,
    skipped: torch.Tensor | None,
    valid: torch.Tensor | None = None,
    upcast: dict | None = None,
) -> torch.Tensor:
    op = opmath_dtype(shadow, weights)
    s = _up(shadow, op)
    # ``upcast`` lets several shadows share one upcast of the weights
    if upcast is None:
        w = _up(weights, op)
    else:
        w = upcast[op] = upcast[op] if op in upcast else _up(weights, op)
    new = new_shadow_fn(s, w)
    new = _keep_where(_kept(w, skip_nonfinite, valid), s, new, skipped)
    _store(shadow, new, valid)
    return shadow


def ema_update_(
    shadow: torch.Tensor,
    weights: torch.Tensor,
    decay: Scalar,
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """``shadow <- lerp(shadow, weights, 1 - decay)``, ``1 - decay`` taken in float64."""
    return _ema_into_(shadow, weights, decay, skip_nonfinite, skipped, None)


def _ema_into_(shadow, weights, decay, skip_nonfinite, skipped, upcast) -> torch.Tensor:
    rate = one_minus(decay)
    valid = None
    if isinstance(rate, torch.Tensor):
        valid = _is_rate(decay.reshape(()))
        rate = rate.reshape(()).to(opmath_dtype(shadow, weights))
    return _shadow_update_(
        shadow, weights, lambda s, w: _lerp(s, w, rate), skip_nonfinite, skipped, valid, upcast
    )


def multi_ema_update_(
    shadows: list[torch.Tensor],
    weights: torch.Tensor,
    decays: list[Scalar],
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """K EMAs of the same weights, which are read (and upcast) once: bit for bit
    ``ema_update_(shadows[k], weights, decays[k], skip_nonfinite, skipped)`` for each k,
    so ``skipped`` counts each profile's kept elements (K per non-finite weight)."""
    upcast: dict = {}
    for shadow, decay in zip(shadows, decays):
        _ema_into_(shadow, weights, decay, skip_nonfinite, skipped, upcast)
    return list(shadows)


def swa_update_(
    shadow: torch.Tensor,
    weights: torch.Tensor,
    count: int | torch.Tensor,
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Equal running mean; ``count`` is how many models the shadow already holds:
    ``lerp(shadow, weights, 1 / (count + 1))``, the weight taken in float64 then rounded
    to opmath. Weight 1 (count 0) copies exactly. This is the mean
    ``shadow + (weights - shadow) / (count + 1)`` rounded as ``AveragedModel`` rounds it."""

    valid = None
    if isinstance(count, torch.Tensor):
        count = count.reshape(())
        valid = count >= 0
        weight_of_new = 1 / (count.to(torch.float64) + 1)
        weight_of_new = weight_of_new.to(opmath_dtype(shadow, weights))
    else:
        weight_of_new = swa_weight(count)

    def new_shadow(s, w):
        return _lerp(s, w, weight_of_new)

    return _shadow_update_(shadow, weights, new_shadow, skip_nonfinite, skipped, valid)


def swa_weight(count: int) -> float:
    """SWA's weight of the incoming model when ``count`` models are already averaged."""
    return 1 / (count + 1)


def belay_step_(
    weights: torch.Tensor,
    shadow: torch.Tensor,
    alpha: Scalar,
    beta: Scalar,
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BELAY, post-step form: the spring pulls the model toward the shadow, and the
    shadow takes an EMA step toward the model. Both right-hand sides read the values
    from before this call: ``w <- lerp(w, s, beta)``, ``s <- lerp(s, w, alpha)``."""
    op = opmath_dtype(weights, shadow)
    w, s = _up(weights, op), _up(shadow, op)
    valid = None
    rates = []
    for rate in (alpha, beta):
        if isinstance(rate, torch.Tensor):
            rate = rate.reshape(())
            valid = _is_rate(rate) if valid is None else valid & _is_rate(rate)
            rate = rate.to(op)
        rates.append(rate)
    alpha, beta = rates
    new_w = _lerp(w, s, beta)
    new_s = _lerp(s, w, alpha)
    new_s = _keep_where(_kept(w, skip_nonfinite, valid), s, new_s, skipped)
    _store(weights, new_w, valid)  # an out-of-range rate: the weights stay too
    _store(shadow, new_s, valid)
    return weights, shadow


def two_point_average_(
    out: torch.Tensor, weights: torch.Tensor, snapshot: torch.Tensor
) -> torch.Tensor:
    """``out <- (weights + snapshot) / 2``, computed in opmath."""
    op = opmath_dtype(out, weights, snapshot)
    _store(out, (_up(weights, op) + _up(snapshot, op)) * 0.5)
    return out


# --- swap -------------------------------------------------------------------------------
# ``averaged()`` puts the shadow into the model for evaluation and must restore both
# tensors bit for bit afterwards, with no second copy of the model. For one dtype that is
# a plain exchange. For bf16 weights with an fp32 shadow it is an exact bit packing: an
# fp32 word is the bf16 word of its high half plus 16 low bits, so
#   model slot  <- the shadow rounded to bf16 (to nearest, ties toward zero)
#   shadow slot <- (live bf16 bits << 16) | (the shadow's low 16 bits)
# and the inverse recovers both words exactly: the low half says whether the high half
# was rounded up. Ties toward zero (not to even) keep that test unambiguous.
#
# NaN stays NaN. Rounding a NaN's high half up would carry into the sign or exponent
# (the GPU's canonical NaN 0x7FFFFFFF would become -0.0), so high halves with an all-ones
# exponent are never rounded; a NaN whose mantissa sits only in the low half (0x7F800001)
# would then truncate to inf, so it takes the bf16 code of high half 0x7F81 instead. The
# mapping stays one-to-one for each low half, and for that some NaN must give up its NaN
# code: counting codes, 2 * 0xFFFF fp32 NaNs have no bf16 NaN left. Those are the words
# 0x7F81xxxx and 0xFF81xxxx with xxxx != 0, signaling NaNs that arithmetic (which makes
# quiet NaNs) and bf16->fp32 conversion (xxxx = 0) never produce; they show as +-inf
# (xxxx <= 0x8000) or +-0 (xxxx > 0x8000) in the model, and are restored exactly.

SWAP_PAIRS = (
    "same dtype",
    "bfloat16 weights with a float32 shadow",
)


def swap_supported(weights_dtype: torch.dtype, shadow_dtype: torch.dtype) -> bool:
    return weights_dtype == shadow_dtype or (
        weights_dtype == torch.bfloat16 and shadow_dtype == torch.float32
    )


_LOW_HALF = 0xFFFF
_HALF_WAY = 0x8000
_SIGN = 0x8000
_INF = 0x7F80  # bf16 +inf; a magnitude above it is a NaN
_SPARE_NAN = 0x7F81  # the NaN high half that lends its code (see above)


def _wrap_to_signed(bits: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret unsigned ``width``-bit values (held in int64) as signed ``dtype``."""
    return torch.where(bits >= 2 ** (width - 1), bits - 2**width, bits).to(dtype)


def packed_model_bits(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The bf16 word the model receives for the fp32 shadow word ``(high << 16) | low``
    (int64 tensors of 16-bit values): rounded, NaN kept NaN (see above)."""
    rounds_up = (low > _HALF_WAY).to(torch.int64)
    sign = high & _SIGN
    traded = torch.where(
        (high & 0x7FFF) == _INF,
        sign | _SPARE_NAN,
        torch.where((high & 0x7FFF) == _SPARE_NAN, sign | _INF * (1 - rounds_up), high),
    )
    exchanged = ((high & 0x7FFF) >= _INF) & (low != 0)
    return torch.where(exchanged, traded, high + rounds_up)


def packed_shadow_high(model: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`packed_model_bits` for each low half: the shadow's high half
    from the model's bf16 word."""
    rounds_up = (low > _HALF_WAY).to(torch.int64)
    sign, magnitude = model & _SIGN, model & 0x7FFF
    restored = torch.where(
        magnitude > _INF,
        torch.where(magnitude == _SPARE_NAN, sign | _INF, model),
        torch.where(magnitude == _INF * (1 - rounds_up), sign | _SPARE_NAN, model - rounds_up),
    )
    return torch.where(low != 0, restored, model) & _LOW_HALF


def swap_(weights: torch.Tensor, shadow: torch.Tensor, inverse: bool = False) -> None:
    """Exchange ``weights`` and ``shadow`` (``inverse=True`` undoes a mixed-dtype swap)."""
    if weights.dtype == shadow.dtype:
        held = weights.clone()
        weights.copy_(shadow)
        shadow.copy_(held)
        return
    model_bits = weights.view(torch.int16).to(torch.int64) & _LOW_HALF
    slot_bits = shadow.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = slot_bits & _LOW_HALF
    high = slot_bits >> 16
    if not inverse:
        # model <- rounded shadow; slot <- live weights in the high half, shadow's low half
        new_model = packed_model_bits(high, low)
        new_slot = (model_bits << 16) | low
    else:
        new_model = high
        new_slot = (packed_shadow_high(model_bits, low) << 16) | low
    weights.view(torch.int16).copy_(_wrap_to_signed(new_model, 16, torch.int16))
    shadow.view(torch.int32).copy_(_wrap_to_signed(new_slot, 32, torch.int32))


# --- an optimizer's step and the average in one pass ------------------------------------
# ``adam_average_`` and ``sgd_average_`` are the fused optimizer's ops
# (:mod:`belay_kernels.fused`): the step of ``torch.optim.Adam``/``AdamW`` or ``SGD``,
# rounded op for op as torch's single-tensor implementation (``foreach=False``) rounds it,
# then the averager's update of the new weights. Every list is laid out like ``params``,
# except ``shadows``: K profiles of n tensors each, profile after profile.
#
# ``average`` names the update and ``average_scalars`` holds its numbers:
#   "none"    no update (a step on which the averager does not update)
#   "ema"     K decays: ``multi_ema_update_`` (for K = 1, ``ema_update_``)
#   "swa"     [count]: ``swa_update_``
#   "belay"   [alpha, beta]: ``belay_step_`` after the step (the post-step form)
#   "poster"  [alpha, beta]: the poster's form, :func:`belay_poster_`
#
# ``grad_scale`` and ``found_inf`` are torch.amp.GradScaler's (0-d float32 tensors on the
# parameters' device, or None): a nonzero ``found_inf`` leaves every tensor as it was,
# state steps included; otherwise the gradients are first unscaled in place, multiplied by
# ``1 / grad_scale`` taken in float64 then rounded to float32 (as ``GradScaler.unscale_``).

AVERAGE_KINDS = ("none", "ema", "swa", "belay", "poster")


def belay_poster_(
    weights: torch.Tensor,
    before: torch.Tensor,
    shadow: torch.Tensor,
    alpha: float,
    beta: float,
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BELAY as the poster writes it. ``weights`` hold ``w1 + eta f(w1)``, the optimizer's
    step already taken, and ``before`` the weights ``w1`` from before that step::

        w1 <- (1 - beta) (w1 + eta f(w1)) + beta w2    = lerp(weights, shadow, beta)
        w2 <- (1 - alpha) w2 + alpha w1                 = lerp(shadow, before, alpha)

    The shadow follows the weights from before the step (the post-step form,
    :func:`belay_step_`, follows them after it). The non-finite skip tests ``before``."""
    op = opmath_dtype(weights, shadow)
    w, b, s = _up(weights, op), _up(before, op), _up(shadow, op)
    new_w = _lerp(w, s, beta)
    new_s = _keep_where(_kept(b, skip_nonfinite, None), s, _lerp(s, b, alpha), skipped)
    _store(weights, new_w)
    _store(shadow, new_s)
    return weights, shadow


def average_(
    average: str,
    average_scalars: list[float],
    params: list[torch.Tensor],
    befores: list[torch.Tensor] | None,
    shadows: list[torch.Tensor],
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> None:
    """The averager's update after the optimizer's step: ``params`` hold the new weights,
    ``befores`` (for "poster" only) the weights from before it."""
    n = len(params)
    for i, param in enumerate(params):
        if average == "ema":
            profiles = [shadows[k * n + i] for k in range(len(average_scalars))]
            multi_ema_update_(profiles, param, list(average_scalars), skip_nonfinite, skipped)
        elif average == "swa":
            swa_update_(shadows[i], param, int(average_scalars[0]), skip_nonfinite, skipped)
        elif average == "belay":
            alpha, beta = average_scalars
            belay_step_(param, shadows[i], alpha, beta, skip_nonfinite, skipped)
        elif average == "poster":
            alpha, beta = average_scalars
            belay_poster_(param, befores[i], shadows[i], alpha, beta, skip_nonfinite, skipped)


def unscale_factor(grad_scale: torch.Tensor) -> torch.Tensor:
    """What GradScaler multiplies the gradients by: ``1 / scale`` in float64, as float32."""
    return grad_scale.double().reciprocal().float()


def gradscaler_skips(grads, grad_scale, found_inf) -> bool:
    """Whether GradScaler found an inf (then nothing is written); else unscale in place."""
    if found_inf is not None and bool(found_inf.item()):
        return True
    if grad_scale is not None:
        factor = unscale_factor(grad_scale)
        for g in grads:
            g.mul_(factor.to(g.device))
    return False


def adam_average_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    shadows: list[torch.Tensor],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    average: str,
    average_scalars: list[float],
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> None:
    """Adam (``decoupled=False``) or AdamW, then the average (see the section's comment).
    ``max_exp_avg_sqs`` is empty, or holds AMSGrad's maxima; ``state_steps`` are torch's
    per-parameter step counts (0-d float32 tensors), incremented here."""
    if gradscaler_skips(grads, grad_scale, found_inf):
        return
    befores = [p.clone() for p in params] if average == "poster" else None
    adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
          beta2, eps, weight_decay, decoupled, maximize)  # fmt: skip
    average_(average, average_scalars, params, befores, shadows, skip_nonfinite, skipped)


def adam_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
    weight_decay, decoupled, maximize,
) -> None:  # fmt: skip
    """torch's single-tensor Adam/AdamW step, op for op (in place, tensor by tensor)."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        step_t += 1
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if max_exp_avg_sqs:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_average_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    shadows: list[torch.Tensor],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    average: str,
    average_scalars: list[float],
    skip_nonfinite: bool = True,
    skipped: torch.Tensor | None = None,
) -> None:
    """SGD, then the average. ``momentum_buffers`` is empty when ``momentum`` is 0; with
    ``first_step`` they are new and take the (decayed) gradient, as torch's do."""
    if gradscaler_skips(grads, grad_scale, found_inf):
        return
    befores = [p.clone() for p in params] if average == "poster" else None
    sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
         maximize, first_step)  # fmt: skip
    average_(average, average_scalars, params, befores, shadows, skip_nonfinite, skipped)


def sgd_(
    params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
    first_step,
) -> None:  # fmt: skip
    """torch's single-tensor SGD step, op for op (in place, tensor by tensor)."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)

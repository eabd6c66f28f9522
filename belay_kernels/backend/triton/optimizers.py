"""An optimizer's step and the averager's update in one pass (reference.adam_average_,
reference.sgd_average_): each program loads its block of the parameter, gradient,
optimizer state and shadows once, takes the step in registers, then the average of the
new weights, and stores each tensor once.

Every list goes out in one launch through a pointer table (_launch.launch), whatever
the number of tensors; all the tensors travel as one tuple of pointers (param, grad,
the optimizer's state, then the shadows, profile after profile), so one kernel covers
every optimizer option and every average kind with each pointer keeping its dtype.

Nothing is read on the host: GradScaler's ``found_inf`` and ``grad_scale`` are read by
the kernels, and Adam's step counts are advanced and read on the device. The step counts
go up in a launch of their own before the step: every program of a tensor needs the
count of this step, and within one launch no program can know that the others have
read the old count before one of them writes the new one.

The math runs in fp32 (fp64 when a tensor is fp64), in registers. Every tensor that the
reference's torch ops make or update in place (the decayed gradient, the moments, the
denominator, the momentum buffer, the decayed weights) is a value the kernel rounds to
that tensor's dtype where the reference rounds it (_as_stored: nothing for fp32), so
bf16 weights and state step as the reference's do; a 16-bit rounding left out there
changes a bf16 momentum buffer by an ulp of the gradient, many ulps of a small buffer.
Divisions and square roots are correctly rounded, as the CPU's are (_sqrt, _div).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._checks import (
    BelayInputError,
    check_count,
    check_float_tensor,
    check_rows_disjoint,
    check_skipped,
    check_unit_interval,
)
from ...reference import AVERAGE_KINDS, swa_weight
from . import _launch
from ._blocks import (
    _columns,
    _host_float,
    _lerp,
    _lerp_into,
    _load,
    _locate,
    _odd_words_bits,
    _offsets,
    _row_scalar,
    _spring_and_follow,
    _store,
)
from .multi_ema import MAX_PROFILES

# Column order in the pointer tuple: param, grad, the optimizer's state (Adam: exp_avg,
# exp_avg_sq, then max_exp_avg_sq with AMSGrad; SGD: the momentum buffer when momentum is
# nonzero), then the shadows.
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
# A ceiling on registers per thread, passed to ptxas (maxnreg). The correctly rounded
# divisions and square roots have slow paths that ptxas calls, and with those calls and
# no ceiling it kept a kernel to 64 registers and spilled (Adam with AMSGrad and BELAY,
# fp32, sm_90); given a ceiling it takes what it needs (72 there). See aot.fused_cases.
MAX_REGISTERS = 128

# What the kernels do with the shadows: "lerp" moves each toward the new weights by its
# rate (the EMA's K profiles, and SWA's one), "belay" and "poster" are BELAY's two forms.
_KERNEL_AVERAGE = {
    "none": "none",
    "ema": "lerp",
    "swa": "lerp",
    "belay": "belay",
    "poster": "poster",
}


# --- per-element pieces ------------------------------------------------------------------


@triton.jit
def _as_stored(value, ptr, COMPUTE: tl.constexpr):
    """``value`` rounded to ptr's dtype and back: a tensor of that dtype in the reference."""
    return value.to(ptr.dtype.element_ty).to(COMPUTE)


@triton.jit
def _sqrt(x):
    """Correctly rounded square root: fp32's tl.sqrt is approximate on a GPU, fp64's is not
    (and sqrt_rn takes fp32 only)."""
    if x.dtype == tl.float64:
        root = tl.sqrt(x)
    else:
        root = tl.sqrt_rn(x)
    return root


@triton.jit
def _div(a, b):
    """Correctly rounded division: fp32's ``/`` is approximate on a GPU, fp64's is not."""
    if a.dtype == tl.float64:
        quotient = a / b
    else:
        quotient = tl.div_rn(a, b)
    return quotient


@triton.jit
def _amp_active(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """False where GradScaler found an inf or NaN: then nothing is written."""
    active = tl.full([], 1, tl.int1)
    if HAS_FOUND_INF:
        active = tl.load(found_inf_ptr) == 0
    return active


@triton.jit
def _unscale_factor(grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """GradScaler.unscale_'s factor, ``1 / scale`` in fp64 rounded to fp32 (1 without a scale)."""
    factor = tl.full([], 1.0, tl.float32)
    if HAS_GRAD_SCALE:
        factor = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32)
    return factor


@triton.jit
def _gradient(
    grad_ptr,
    offs,
    n,
    factor,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """The gradient the step follows. With a scale the gradient is unscaled and written
    back in its dtype first, as GradScaler.unscale_ leaves it (its product rounded to fp32,
    or taken in fp64 for an fp64 gradient, as torch multiplies by a 0-d fp32 tensor)."""
    grad = _load(grad_ptr, offs, n, MASKED)
    if HAS_GRAD_SCALE:
        grad = (grad.to(COMPUTE) * factor.to(COMPUTE)).to(grad_ptr.dtype.element_ty)
        _store(grad_ptr, offs, grad, n, MASKED)
    grad = grad.to(COMPUTE)
    if MAXIMIZE:
        grad = -grad
    return grad


@triton.jit
def _rate(words, index: tl.constexpr, COMPUTE: tl.constexpr):
    """The average's rate ``index``, passed as two odd words (_launch.odd_words)."""
    return _host_float(_decoded(words)[index], COMPUTE)


@triton.jit
def _decoded(words):
    """The int64 float64 bits of each number passed as two odd words (decoded to a float
    by _host_float where it is used)."""
    out = ()
    for k in tl.static_range(len(words) // 2):
        out = out + (_odd_words_bits(words[2 * k], words[2 * k + 1]),)
    return out


@triton.jit
def _average_and_store(
    ptrs,
    offs,
    n,
    old_weights,
    new_weights,
    words,
    skipped_ptr,
    AVERAGE: tl.constexpr,
    FIRST_SHADOW: tl.constexpr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTES: tl.constexpr,
):
    """Store the stepped weights and update the shadows from them (as the reference does,
    from the weights as stored: rounded to their dtype). ``old_weights``: the weights
    loaded before the step, in their dtype; ``new_weights``: after it, in the step's math."""
    param_ptr = ptrs[PARAM]
    new_weights = new_weights.to(param_ptr.dtype.element_ty)
    if AVERAGE == "belay" or AVERAGE == "poster":
        shadow_ptr = ptrs[FIRST_SHADOW]
        compute: tl.constexpr = COMPUTES[0]
        weights = new_weights.to(compute)
        followed = weights
        if AVERAGE == "poster":
            followed = old_weights.to(compute)
        shadow = _load(shadow_ptr, offs, n, MASKED).to(compute)
        sprung, new_shadow = _spring_and_follow(
            weights,
            followed,
            shadow,
            _rate(words, 0, compute),
            _rate(words, 1, compute),
            skipped_ptr,
            SKIP_NONFINITE,
            HAS_SKIPPED,
        )
        _store(param_ptr, offs, sprung, n, MASKED)
        _store(shadow_ptr, offs, new_shadow, n, MASKED)
    else:
        _store(param_ptr, offs, new_weights, n, MASKED)
        if AVERAGE == "lerp":
            for k in tl.static_range(len(COMPUTES)):
                _lerp_into(
                    ptrs[FIRST_SHADOW + k],
                    offs,
                    n,
                    new_weights,
                    _rate(words, k, COMPUTES[k]),
                    skipped_ptr,
                    MASKED,
                    SKIP_NONFINITE,
                    HAS_SKIPPED,
                    COMPUTES[k],
                )


# --- Adam / AdamW ------------------------------------------------------------------------
# The hyperparameters are decoded where they are used, inside the block, not before the
# full/tail split: holding them (and the fp64 bias corrections) across the block's loads
# spilled registers on sm_80 (bf16 weights, and fp64; measured before MAX_REGISTERS).
# The bias corrections and the unscale factor are the exception: their fp64 math (IEEE
# divisions, whose slow paths ptxas calls) taken among the block's loads spilled on
# sm_90; taken once, before any load, only three fp32 values stay live.


@triton.jit
def _bias_corrections(step_ptr, lr_bits, log2_beta1_bits, log2_beta2_bits, COMPUTE: tl.constexpr):
    """(step_size, bc2_sqrt) from this step's count, taken in fp64 as the reference takes
    them from ``step_t.item()`` (``beta ** step`` as ``exp2(step * log2(beta))``, the
    logarithm taken on the host), then rounded to COMPUTE as torch rounds a Python scalar."""
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1 - tl.exp2(step * _host_float(log2_beta1_bits, tl.float64))
    bias_correction2 = 1 - tl.exp2(step * _host_float(log2_beta2_bits, tl.float64))
    step_size = _host_float(lr_bits, tl.float64) / bias_correction1
    return step_size.to(COMPUTE), _sqrt(bias_correction2).to(COMPUTE)


@triton.jit
def _adam_block(
    ptrs,
    start,
    n,
    step_size,
    bc2_sqrt,
    factor,
    bits,
    words,
    skipped_ptr,
    AMSGRAD: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    AVERAGE: tl.constexpr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    COMPUTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay = bits
    offs = _offsets(start, BLOCK)
    param_ptr, exp_avg_ptr, exp_avg_sq_ptr = ptrs[PARAM], ptrs[2], ptrs[3]
    old_weights = _load(param_ptr, offs, n, MASKED)
    grad = _gradient(ptrs[GRAD], offs, n, factor, MAXIMIZE, HAS_GRAD_SCALE, MASKED, COMPUTE)
    weights = old_weights.to(COMPUTE)
    if WEIGHT_DECAY:
        weight_decay = _host_float(weight_decay, COMPUTE)
        if DECOUPLED:  # weight_decay holds 1 - lr * weight_decay here
            weights = _as_stored(weights * weight_decay, param_ptr, COMPUTE)
        else:
            grad = _as_stored(tl.fma(weights, weight_decay, grad), ptrs[GRAD], COMPUTE)
    exp_avg = _load(exp_avg_ptr, offs, n, MASKED).to(COMPUTE)
    exp_avg = _lerp(exp_avg, grad, _host_float(one_minus_beta1, COMPUTE))
    exp_avg = _as_stored(exp_avg, exp_avg_ptr, COMPUTE)
    exp_avg_sq = _load(exp_avg_sq_ptr, offs, n, MASKED).to(COMPUTE)
    exp_avg_sq = _as_stored(exp_avg_sq * _host_float(beta2, COMPUTE), exp_avg_sq_ptr, COMPUTE)
    exp_avg_sq = exp_avg_sq + _host_float(one_minus_beta2, COMPUTE) * grad * grad
    exp_avg_sq = _as_stored(exp_avg_sq, exp_avg_sq_ptr, COMPUTE)
    _store(exp_avg_ptr, offs, exp_avg, n, MASKED)
    _store(exp_avg_sq_ptr, offs, exp_avg_sq, n, MASKED)
    second = exp_avg_sq
    if AMSGRAD:
        max_ptr = ptrs[4]
        most = _load(max_ptr, offs, n, MASKED).to(COMPUTE)
        second = tl.maximum(most, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        _store(max_ptr, offs, second, n, MASKED)
    # denom = (sqrt(v) / bc2_sqrt) + eps, each op a tensor in v's dtype in the reference
    denom = _as_stored(_sqrt(second), exp_avg_sq_ptr, COMPUTE)
    denom = _as_stored(_div(denom, bc2_sqrt), exp_avg_sq_ptr, COMPUTE)
    denom = _as_stored(denom + _host_float(eps, COMPUTE), exp_avg_sq_ptr, COMPUTE)
    new_weights = weights - step_size * _div(exp_avg, denom)
    _average_and_store(
        ptrs,
        offs,
        n,
        old_weights,
        new_weights,
        words,
        skipped_ptr,
        AVERAGE,
        4 + AMSGRAD,
        MASKED,
        SKIP_NONFINITE,
        HAS_SKIPPED,
        COMPUTES,
    )


@triton.jit
def _adam_average_kernel(
    table_ptr,
    owner_ptr,
    size,
    ptrs,
    state_step_ptr,
    found_inf_ptr,
    grad_scale_ptr,
    skipped_ptr,
    bits,
    words,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    AVERAGE: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    COMPUTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``bits``: lr, 1 - beta1, beta2, 1 - beta2, log2(beta1), log2(beta2), eps and the
    weight decay (1 - lr * weight_decay when DECOUPLED), each a float64 as two odd words
    (_launch.odd_words: plain bits in a tuple would respecialize the kernel)."""
    tensor, start, n = _locate(table_ptr, owner_ptr, size, len(ptrs), IS_LIST, BLOCK)
    ptrs = _columns(table_ptr, ptrs, 0, tensor, size, IS_LIST, ALIGNED)
    state_step_ptr = _row_scalar(table_ptr, state_step_ptr, 0, tensor, size, len(ptrs), IS_LIST)
    if _amp_active(found_inf_ptr, HAS_FOUND_INF):
        lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay = _decoded(
            bits
        )
        step_size, bc2_sqrt = _bias_corrections(state_step_ptr, lr, log2_beta1, log2_beta2, COMPUTE)
        hyper = (one_minus_beta1, beta2, one_minus_beta2, eps, decay)
        factor = _unscale_factor(grad_scale_ptr, HAS_GRAD_SCALE)
        if start + BLOCK <= n:
            _adam_block(
                ptrs,
                start,
                n,
                step_size,
                bc2_sqrt,
                factor,
                hyper,
                words,
                skipped_ptr,
                AMSGRAD,
                WEIGHT_DECAY,
                DECOUPLED,
                MAXIMIZE,
                HAS_GRAD_SCALE,
                AVERAGE,
                False,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTE,
                COMPUTES,
                BLOCK,
            )
        else:
            _adam_block(
                ptrs,
                start,
                n,
                step_size,
                bc2_sqrt,
                factor,
                hyper,
                words,
                skipped_ptr,
                AMSGRAD,
                WEIGHT_DECAY,
                DECOUPLED,
                MAXIMIZE,
                HAS_GRAD_SCALE,
                AVERAGE,
                True,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTE,
                COMPUTES,
                BLOCK,
            )


@triton.jit
def _advance_steps_kernel(
    table_ptr,
    owner_ptr,
    size,
    ptrs,
    found_inf_ptr,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``state_step += 1`` for each tensor (one program each), unless found_inf is set."""
    tensor, start, n = _locate(table_ptr, owner_ptr, size, 1, IS_LIST, BLOCK)
    (step_ptr,) = _columns(table_ptr, ptrs, 0, tensor, size, IS_LIST, ALIGNED)
    if _amp_active(found_inf_ptr, HAS_FOUND_INF):
        tl.store(step_ptr, tl.load(step_ptr) + 1)


# --- SGD ---------------------------------------------------------------------------------


@triton.jit
def _sgd_block(
    ptrs,
    start,
    n,
    factor,
    bits,
    words,
    skipped_ptr,
    MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    AVERAGE: tl.constexpr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    COMPUTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lr, momentum, one_minus_dampening, weight_decay = bits
    offs = _offsets(start, BLOCK)
    old_weights = _load(ptrs[PARAM], offs, n, MASKED)
    grad = _gradient(ptrs[GRAD], offs, n, factor, MAXIMIZE, HAS_GRAD_SCALE, MASKED, COMPUTE)
    weights = old_weights.to(COMPUTE)
    if WEIGHT_DECAY:
        weight_decay = _host_float(weight_decay, COMPUTE)
        grad = _as_stored(tl.fma(weights, weight_decay, grad), ptrs[GRAD], COMPUTE)
    if MOMENTUM:
        buf_ptr = ptrs[2]
        momentum = _host_float(momentum, COMPUTE)
        if FIRST_STEP:  # a new buffer takes the gradient (nothing to load)
            buf = grad
        else:
            buf = _load(buf_ptr, offs, n, MASKED).to(COMPUTE)
            buf = _as_stored(buf * momentum, buf_ptr, COMPUTE)
            buf = tl.fma(grad, _host_float(one_minus_dampening, COMPUTE), buf)
        buf = _as_stored(buf, buf_ptr, COMPUTE)
        _store(buf_ptr, offs, buf, n, MASKED)
        if NESTEROV:
            grad = _as_stored(tl.fma(buf, momentum, grad), ptrs[GRAD], COMPUTE)
        else:
            grad = buf
    new_weights = tl.fma(grad, -_host_float(lr, COMPUTE), weights)
    _average_and_store(
        ptrs,
        offs,
        n,
        old_weights,
        new_weights,
        words,
        skipped_ptr,
        AVERAGE,
        2 + MOMENTUM,
        MASKED,
        SKIP_NONFINITE,
        HAS_SKIPPED,
        COMPUTES,
    )


@triton.jit
def _sgd_average_kernel(
    table_ptr,
    owner_ptr,
    size,
    ptrs,
    found_inf_ptr,
    grad_scale_ptr,
    skipped_ptr,
    bits,
    words,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    AVERAGE: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    COMPUTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``bits``: lr, momentum, 1 - dampening and the weight decay, as in the Adam kernel."""
    tensor, start, n = _locate(table_ptr, owner_ptr, size, len(ptrs), IS_LIST, BLOCK)
    ptrs = _columns(table_ptr, ptrs, 0, tensor, size, IS_LIST, ALIGNED)
    if _amp_active(found_inf_ptr, HAS_FOUND_INF):
        factor = _unscale_factor(grad_scale_ptr, HAS_GRAD_SCALE)
        if start + BLOCK <= n:
            _sgd_block(
                ptrs,
                start,
                n,
                factor,
                _decoded(bits),
                words,
                skipped_ptr,
                MOMENTUM,
                FIRST_STEP,
                NESTEROV,
                WEIGHT_DECAY,
                MAXIMIZE,
                HAS_GRAD_SCALE,
                AVERAGE,
                False,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTE,
                COMPUTES,
                BLOCK,
            )
        else:
            _sgd_block(
                ptrs,
                start,
                n,
                factor,
                _decoded(bits),
                words,
                skipped_ptr,
                MOMENTUM,
                FIRST_STEP,
                NESTEROV,
                WEIGHT_DECAY,
                MAXIMIZE,
                HAS_GRAD_SCALE,
                AVERAGE,
                True,
                SKIP_NONFINITE,
                HAS_SKIPPED,
                COMPUTE,
                COMPUTES,
                BLOCK,
            )


# --- host side: checks -------------------------------------------------------------------


def _check_number(name: str, value: object, low: float, high: float = math.inf, open_high=False):
    """A Python number in [low, high] ([low, high) with ``open_high``), as torch.optim checks."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BelayInputError(f"{name} must be a Python number, got {value!r}.")
    above = value >= high if open_high else value > high
    if math.isnan(value) or value < low or above:
        interval = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
        raise BelayInputError(f"{name} must be in {interval}, got {value!r}.")


def _check_average(average, scalars, num_shadows: int, n: int) -> int:
    """The average's scalars and shadow count; returns the number of shadows per tensor.
    "none" updates no shadow: it ignores whatever shadows and scalars it is given."""
    if average not in AVERAGE_KINDS:
        raise BelayInputError(f"average must be one of {AVERAGE_KINDS}, got {average!r}.")
    if average == "none":
        return 0
    scalars = list(scalars)
    if average == "ema":
        profiles = len(scalars)
        if not 1 <= profiles <= MAX_PROFILES:
            raise BelayInputError(
                f"the Triton fused EMA takes 1 to {MAX_PROFILES} decays, got {profiles}."
            )
        for k, decay in enumerate(scalars):
            _check_host_scalar(f"decay {k}", decay)
            check_unit_interval(f"decay {k}", decay, None)
    else:
        wanted = {"swa": 1, "belay": 2, "poster": 2}[average]
        if len(scalars) != wanted:
            raise BelayInputError(
                f'average "{average}" takes {wanted} scalars, got {len(scalars)}: {scalars!r}.'
            )
        profiles = 1
        if average == "swa":
            _check_host_scalar("count", scalars[0])
            check_count(_integral(scalars[0]), None)
        for name, rate in zip(("alpha", "beta"), scalars if wanted == 2 else ()):
            _check_host_scalar(name, rate)
            check_unit_interval(name, rate, None)
    if num_shadows != profiles * n:
        raise BelayInputError(
            f'average "{average}" needs {profiles} shadow(s) per parameter, '
            f"{profiles * n} in all (profile after profile), got {num_shadows}."
        )
    return profiles


def _integral(count: object) -> object:
    """A count given as a whole float (``average_scalars`` is a list of floats) as an int."""
    if isinstance(count, float) and count.is_integer():
        return int(count)
    return count


def _check_host_scalar(name: str, value: object) -> None:
    if isinstance(value, torch.Tensor):
        raise BelayInputError(
            f"{name} must be a Python number for the fused Triton step, got a tensor; "
            f"pass {name}.item() (read once on the host)."
        )


def _check_amp(name: str, value, device: torch.device) -> None:
    if value is None:
        return
    if (
        not isinstance(value, torch.Tensor)
        or value.numel() != 1
        or value.dtype != torch.float32
        or value.device != device
    ):
        raise BelayInputError(
            f"{name} must be GradScaler's one-element float32 tensor on {device}, got {value!r}."
        )


def _check_lists(columns: dict, n: int, device_types, grads_written: bool) -> None:
    """Every list as long as ``params``; each column one dtype, one device, contiguous;
    each row one shape; no written tensor sharing memory with any other."""
    params = columns["params"]
    for name, column in columns.items():
        if len(column) != n:
            raise BelayInputError(
                f"{name} must hold {n} tensors (one per parameter), got {len(column)}."
            )
        for i, t in enumerate(column):
            check_float_tensor(f"{name}[{i}]", t)
            if t.shape != params[i].shape:
                raise BelayInputError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has shape "
                    f"{tuple(params[i].shape)}; they must match element for element."
                )
            if t.device != params[0].device:
                raise BelayInputError(
                    f"{name}[{i}] is on {t.device} but params[0] is on {params[0].device}; "
                    "every tensor of the step must be on one device."
                )
            if not t.is_contiguous():
                raise BelayInputError(
                    f"{name}[{i}] is not contiguous; the Triton kernels read flat storage "
                    f"(pass {name}[{i}].contiguous(), or use another backend)."
                )
            if t.dtype != column[0].dtype:
                raise BelayInputError(
                    f"{name} mixes dtypes ({column[0].dtype} and {t.dtype} at {i}); one "
                    "launch takes one dtype per list: group the tensors by dtype."
                )
    if params[0].device.type not in device_types:
        raise BelayInputError(
            f"the Triton backend runs on {sorted(device_types)} tensors, got {params[0].device}."
        )
    names = list(columns)
    rows = [[columns[name][i] for name in names] for i in range(n)]
    # everything but the gradients is written, and they are too when they get unscaled
    written = [j for j, name in enumerate(names) if grads_written or name != "grads"]
    check_rows_disjoint(names, rows, written)


def _check_steps(state_steps, n: int, device: torch.device) -> None:
    if len(state_steps) != n:
        raise BelayInputError(f"state_steps must hold {n} tensors, got {len(state_steps)}.")
    for i, step in enumerate(state_steps):
        if (
            not isinstance(step, torch.Tensor)
            or step.numel() != 1
            or step.dtype not in (torch.float32, torch.float64)
            or step.device != device
            or step.dtype != state_steps[0].dtype
        ):
            raise BelayInputError(
                f"state_steps[{i}] must be a one-element float32 (or float64) tensor on "
                f"{device}, like the others, got {step!r}; the step count is advanced and "
                "read on the device (torch.optim keeps it there with capturable=True)."
            )


# --- host side: launches -----------------------------------------------------------------


def _words(*values: float) -> tuple[int, ...]:
    """Each number as two odd words (_launch.odd_words), decoded by _decoded."""
    return tuple(w for value in values for w in _launch.odd_words(_launch.float_bits(value)))


def _average_args(average: str, scalars) -> tuple[int, ...]:
    """The average's rates as odd words (see _launch.odd_words): the EMA's 1 - decay per
    profile, SWA's 1 / (count + 1), BELAY's alpha and beta; "none" passes one unused rate,
    since a kernel argument cannot be an empty tuple."""
    if average == "ema":
        rates = [1.0 - float(d) for d in scalars]
    elif average == "swa":
        rates = [swa_weight(int(scalars[0]))]
    elif average == "none":
        rates = [0.0]
    else:
        rates = [float(r) for r in scalars]
    return _words(*rates)


def _common_flags(average, columns, shadow_columns, skip_nonfinite, skipped, found_inf, grad_scale):
    params = columns[0]
    dtypes = [column[0].dtype for column in (*columns, *shadow_columns)]
    return dict(
        HAS_FOUND_INF=found_inf is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        AVERAGE=_KERNEL_AVERAGE[average],
        SKIP_NONFINITE=bool(skip_nonfinite),
        HAS_SKIPPED=skipped is not None,
        COMPUTE=_launch.compute_dtype(*(column[0].dtype for column in columns)),
        COMPUTES=tuple(_launch.compute_dtype(params[0].dtype, s[0].dtype) for s in shadow_columns),
        maxnreg=MAX_REGISTERS,
        **_launch.shape_flags(*dtypes),
    )


def _profiles(shadows, n: int, profiles: int) -> list[list[torch.Tensor]]:
    return [list(shadows[k * n : (k + 1) * n]) for k in range(profiles)]


def _advance_steps(state_steps, found_inf) -> None:
    flags = {
        "HAS_FOUND_INF": found_inf is not None,
        "BLOCK": _launch.block_size(state_steps[0].dtype),
        "num_warps": 1,
    }
    placeholder = state_steps[0]
    args = (placeholder if found_inf is None else found_inf,)
    _launch.launch(_advance_steps_kernel, [list(state_steps)], args, flags, tuple_columns=1)


def adam_average_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    shadows,
    grad_scale,
    found_inf,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    maximize,
    average,
    average_scalars,
    skip_nonfinite=True,
    skipped=None,
) -> None:
    """reference.adam_average_ in two launches (the step counts, then the step and the
    average); the checks run before either."""
    from . import DEVICE_TYPES

    n = len(params)
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        _check_number(name, value, 0.0)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        _check_number(name, value, 0.0, 1.0, open_high=True)
    profiles = _check_average(average, average_scalars, len(shadows), n)
    if n == 0:
        return
    amsgrad = len(max_exp_avg_sqs) > 0
    columns = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        columns["max_exp_avg_sqs"] = max_exp_avg_sqs
    shadow_columns = _profiles(shadows, n, profiles)
    named = dict(columns, **{f"shadows (profile {k})": s for k, s in enumerate(shadow_columns)})
    _check_lists(named, n, DEVICE_TYPES, grads_written=grad_scale is not None)
    device = params[0].device
    _check_steps(state_steps, n, device)
    _check_amp("grad_scale", grad_scale, device)
    _check_amp("found_inf", found_inf, device)
    check_skipped(skipped, device)

    _advance_steps(state_steps, found_inf)
    placeholder = state_steps[0]
    args = (
        placeholder if found_inf is None else found_inf,
        placeholder if grad_scale is None else grad_scale,
        placeholder if skipped is None else skipped,
        _words(
            lr,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            math.log2(beta1) if beta1 > 0 else -math.inf,
            math.log2(beta2) if beta2 > 0 else -math.inf,
            eps,
            1.0 - lr * weight_decay if decoupled else weight_decay,
        ),
        _average_args(average, average_scalars),
    )
    optimizer_columns = list(columns.values())
    flags = dict(
        AMSGRAD=amsgrad,
        WEIGHT_DECAY=weight_decay != 0,
        DECOUPLED=bool(decoupled),
        MAXIMIZE=bool(maximize),
        **_common_flags(
            average,
            optimizer_columns,
            shadow_columns,
            skip_nonfinite,
            skipped,
            found_inf,
            grad_scale,
        ),
    )
    all_columns = [list(c) for c in (*optimizer_columns, *shadow_columns)]
    _launch.launch(
        _adam_average_kernel,
        all_columns,
        args,
        flags,
        tuple_columns=len(all_columns),
        row_scalars=[list(state_steps)],
    )


def sgd_average_(
    params,
    grads,
    momentum_buffers,
    shadows,
    grad_scale,
    found_inf,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
    average,
    average_scalars,
    skip_nonfinite=True,
    skipped=None,
) -> None:
    """reference.sgd_average_ in one launch; the checks run before it."""
    from . import DEVICE_TYPES

    n = len(params)
    for name, value in (
        ("lr", lr),
        ("momentum", momentum),
        ("dampening", dampening),
        ("weight_decay", weight_decay),
    ):
        _check_number(name, value, 0.0)
    if nesterov and (momentum == 0 or dampening != 0):
        raise BelayInputError("nesterov momentum needs momentum > 0 and dampening 0, as torch's.")
    if (momentum != 0) != bool(momentum_buffers) and n:
        raise BelayInputError(
            f"momentum_buffers must hold one tensor per parameter when momentum is nonzero, "
            f"and be empty when it is 0; got {len(momentum_buffers)} for momentum {momentum}."
        )
    profiles = _check_average(average, average_scalars, len(shadows), n)
    if n == 0:
        return
    columns = {"params": params, "grads": grads}
    if momentum != 0:
        columns["momentum_buffers"] = momentum_buffers
    shadow_columns = _profiles(shadows, n, profiles)
    named = dict(columns, **{f"shadows (profile {k})": s for k, s in enumerate(shadow_columns)})
    _check_lists(named, n, DEVICE_TYPES, grads_written=grad_scale is not None)
    device = params[0].device
    _check_amp("grad_scale", grad_scale, device)
    _check_amp("found_inf", found_inf, device)
    check_skipped(skipped, device)

    placeholder = params[0]
    args = (
        placeholder if found_inf is None else found_inf,
        placeholder if grad_scale is None else grad_scale,
        placeholder if skipped is None else skipped,
        _words(lr, momentum, 1.0 - dampening, weight_decay),
        _average_args(average, average_scalars),
    )
    optimizer_columns = list(columns.values())
    flags = dict(
        MOMENTUM=momentum != 0,
        FIRST_STEP=bool(first_step),
        NESTEROV=bool(nesterov),
        WEIGHT_DECAY=weight_decay != 0,
        MAXIMIZE=bool(maximize),
        **_common_flags(
            average,
            optimizer_columns,
            shadow_columns,
            skip_nonfinite,
            skipped,
            found_inf,
            grad_scale,
        ),
    )
    all_columns = [list(c) for c in (*optimizer_columns, *shadow_columns)]
    _launch.launch(_sgd_average_kernel, all_columns, args, flags, tuple_columns=len(all_columns))

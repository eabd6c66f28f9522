"""The opt-in ``inductor`` backend: the reference itself, compiled by ``torch.compile``.

For devices without our kernels, inductor fuses the reference's out-of-place temporaries
into one generated kernel per op. One compiled function per (op, device type, dtypes):
each gets its own code object, so dynamo's recompile limit counts per dtype pair, and
sizes are dynamic, so a second model size reuses the graph. Tensors are passed flat and
hyperparameters as 0-d tensors (the reference treats numbers and tensors alike), so
neither the rank nor a changing decay recompiles. Compiling costs seconds per graph;
:func:`usage` (shown by ``backends()``) reports what it cost.

Results agree with the reference to the shared tolerance, not bit for bit: inductor
generates its own lerp and may contract multiply-adds differently from eager torch.
Tensors of fewer than two elements run on the eager ``torch`` backend (a compiled graph
specialises sizes 0 and 1), and so do swaps: they move memory and compute nothing a
generated kernel would fuse away.

Compilation is opt-in: the backend is available only with ``BELAY_KERNELS_COMPILE=1`` in
the environment when it is first asked for. ``auto`` then takes it for an (op, device
type, dtypes) only where it measured the compiled op faster than the eager ``torch``
backend (:func:`faster_than_eager`); on a device with our kernels those come first.
"""

from __future__ import annotations

import os
import sys
import time
import types

import torch

from .. import reference
from ..methods import BY_OP
from . import torch as torch_backend

DEVICE_TYPES = reference.DEVICE_TYPES - {"meta"}
REQUIRES_CONTIGUOUS = True
ALLOW_ENV = "BELAY_KERNELS_COMPILE"

_compiled: dict[tuple, object] = {}
_compile_s: dict[tuple, float] = {}  # the first call of each key: compiling and one run
_verdicts: dict[tuple, tuple[bool, str]] = {}


def compilation_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "") == "1"


def unavailable_reason() -> str | None:
    if not compilation_allowed():
        return (
            f"opt-in (compiling costs seconds per op and dtype pair): set {ALLOW_ENV}=1 to "
            "use backend='inductor' and let auto measure it"
        )
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python"
    except Exception as exc:  # keep the error, report it on demand
        return f"{type(exc).__name__}: {exc}"
    return None


def usage() -> str:
    """What has been compiled so far, and what it cost."""
    if not _compile_s:
        return "nothing compiled yet"
    return f"{len(_compile_s)} graphs compiled, {sum(_compile_s.values()):.1f} s in all"


def _function(op: str, tensors) -> tuple[tuple, object]:
    key = (op, tensors[0].device.type, tuple(t.dtype for t in tensors))
    fn = _compiled.get(key)
    if fn is None:
        spec = getattr(reference, op)

        def run(*args):
            return spec(*args)

        name = "_".join([op, key[1], *(str(d).removeprefix("torch.") for d in key[2])])
        code = run.__code__.replace(co_name=name, co_qualname=name)
        own = types.FunctionType(code, run.__globals__, name, None, run.__closure__)
        fn = _compiled[key] = torch.compile(own, dynamic=True)
    return key, fn


def _as_tensor(value, dtype, device) -> torch.Tensor:
    return (
        value
        if isinstance(value, torch.Tensor)
        else torch.tensor(value, dtype=dtype, device=device)
    )


def _run(op: str, tensors, scalars, flags) -> None:
    if tensors[0].numel() < 2:
        getattr(torch_backend, op)(*tensors, *scalars, *flags)
        return
    device = tensors[0].device
    kinds = {"rate": torch.float64, "count": torch.int64}
    scalars = [_as_tensor(v, kinds[s.kind], device) for v, s in zip(scalars, BY_OP[op].scalars)]
    key, fn = _function(op, tensors)
    flat = [t.view(-1) for t in tensors]
    started = time.perf_counter()
    fn(*flat, *scalars, *flags)
    if key not in _compile_s:
        _compile_s[key] = time.perf_counter() - started


# The backend functions, in the reference's argument order.


def ema_update_(shadow, weights, decay, skip_nonfinite=True, skipped=None):
    _run("ema_update_", (shadow, weights), (decay,), (skip_nonfinite, skipped))
    return shadow


def swa_update_(shadow, weights, count, skip_nonfinite=True, skipped=None):
    _run("swa_update_", (shadow, weights), (count,), (skip_nonfinite, skipped))
    return shadow


def belay_step_(weights, shadow, alpha, beta, skip_nonfinite=True, skipped=None):
    _run("belay_step_", (weights, shadow), (alpha, beta), (skip_nonfinite, skipped))
    return weights, shadow


def two_point_average_(out, weights, snapshot):
    _run("two_point_average_", (out, weights, snapshot), (), ())
    return out


# The swap moves memory and computes nothing: the eager torch backend runs it.
swap_ = torch_backend.swap_


# --- whether auto should take it ---------------------------------------------------------

MEASURE_ELEMENTS = 1 << 22
_MEASURE_REPEATS = 5


def _median_s(fn, device: torch.device) -> float:
    times = []
    for _ in range(_MEASURE_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _sample_call(module, op: str, dtypes, device: torch.device):
    """One call of ``op`` on ``MEASURE_ELEMENTS`` elements with the method table's
    typical hyperparameters and the default non-finite skip."""
    method = BY_OP[op]
    tensors = [torch.rand(MEASURE_ELEMENTS, device=device).to(d) for d in dtypes]
    args = [s.typical for s in method.scalars] + ([True, None] if method.counts_skipped else [])
    fn = getattr(module, op)
    return lambda: fn(*tensors, *args)


def faster_than_eager(op: str, device_type: str, dtypes) -> tuple[bool, str]:
    """Whether auto takes this backend for ``op``, and why: the compiled op must measure
    faster than the eager ``torch`` backend here, on ``MEASURE_ELEMENTS`` elements (once
    per op, device type and dtypes; the first call compiles)."""
    if BY_OP[op].exact:
        return False, "an exact op (the swap) runs the eager torch backend either way"
    key = (op, device_type, tuple(dtypes))
    if key not in _verdicts:
        device = torch.device(device_type)
        try:
            compiled = _sample_call(sys.modules[__name__], op, dtypes, device)
            eager = _sample_call(torch_backend, op, dtypes, device)
            compiled()
            eager()
            t_compiled, t_eager = _median_s(compiled, device), _median_s(eager, device)
        except Exception as exc:  # a failed compile leaves auto on the eager path
            _verdicts[key] = (False, f"compiling failed: {type(exc).__name__}: {exc}")
        else:
            _verdicts[key] = (
                t_compiled < t_eager,
                f"measured {t_compiled * 1e3:.2f} ms compiled vs {t_eager * 1e3:.2f} ms eager "
                f"on {MEASURE_ELEMENTS} elements",
            )
    return _verdicts[key]


def verdicts() -> dict[tuple, tuple[bool, str]]:
    return dict(_verdicts)

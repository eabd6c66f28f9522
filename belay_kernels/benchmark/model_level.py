"""Model-level mode: average the parameters of real architectures through each
library's own API, and report the step time and the op calls per step."""

from __future__ import annotations

import copy
import gc

import torch

from . import architectures
from .flat_cases import BELAY_ALPHA, BELAY_BETA, DECAY
from .opcount import count_kernel_launches, count_op_calls
from .peers import PEER_METHODS, Unsupported, one_phrase, peer_step
from .sweep import DTYPE_PAIRS, add_speedups, chosen_backends
from .timing import time_step
from .traffic import bytes_per_step


def model_step_bytes(method, numel, weights_dtype, shadow_dtype) -> int:
    """Minimal bytes of one model-level step. The two-point row times ``averaged()``:
    the average (in the weights' dtype) plus a swap round trip of it."""
    if method == "two_point":
        return bytes_per_step("two_point", numel, weights_dtype, weights_dtype) + bytes_per_step(
            "swap", numel, weights_dtype, weights_dtype
        )
    return bytes_per_step(method, numel, weights_dtype, shadow_dtype)


TWO_POINT_GAP = 100
TORCH_REFERENCE = "belay_kernels[torch]"


def our_averager_step(method: str, backend: str, model, shadow_dtype: torch.dtype):
    """One step of our averager class for ``method`` (belay_kernels.averagers)."""
    try:
        from .. import averagers
    except ImportError as exc:
        raise Unsupported(f"belay_kernels.averagers is not available ({exc})") from exc
    common = {"shadow_dtype": shadow_dtype, "backend": backend}
    if method == "ema":
        return averagers.EMA(model, decay=DECAY, **common).step
    if method == "swa":
        return averagers.SWA(model, **common).step
    if method == "belay":
        return averagers.Belay(model, alpha=BELAY_ALPHA, beta=BELAY_BETA, **common).step
    if method in ("two_point", "swap"):
        # The two-point average is computed when evaluating: time averaged() (compute
        # the average, swap it in, swap back). Its snapshot and average are kept in the
        # weights' dtype, the class's default. For swap, time an EMA's averaged().
        if method == "two_point":
            averager = averagers.TwoPoint(model, gap=TWO_POINT_GAP, backend=backend)
        else:
            averager = averagers.EMA(model, decay=DECAY, **common)

        def round_trip():
            with averager.averaged():
                pass

        return round_trip
    raise Unsupported(f"no averager class runs {method}: the model level times averagers")


def _checked(build):
    try:
        step = build()
        step()
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"failed: {one_phrase(exc)}") from exc
    return step


def run_models(*, device, models, methods, pairs, peers, min_run_time, log=print, backends=None):
    rows = []
    backends = chosen_backends(device, backends)
    for name in models:
        for pair in pairs:
            weights_dtype, shadow_dtype = DTYPE_PAIRS[pair]
            model = architectures.build(name, weights_dtype, device)
            params = [p for p in model.parameters() if p.is_floating_point()]
            numel = sum(p.numel() for p in params)
            for method in methods:
                nbytes = model_step_bytes(method, numel, weights_dtype, shadow_dtype)
                impls = [
                    (
                        f"belay_kernels[{b}]",
                        "ours",
                        lambda b=b: our_averager_step(
                            method,
                            b,
                            copy.deepcopy(model),
                            shadow_dtype,
                        ),
                    )
                    for b in backends
                ] + [
                    # every library gets its own copy: our averagers move the model's
                    # tensors into flat buffers, which must not leak into the next one
                    (
                        peer,
                        "peer",
                        lambda p=peer: peer_step(p, method, copy.deepcopy(model), shadow_dtype),
                    )
                    # the torch.compile peer is timed in the sweep only
                    for peer in peers
                    if method in PEER_METHODS.get(peer, ())
                ]
                for impl, kind, build in impls:
                    row = {
                        "mode": "model",
                        "model": name,
                        "tensors": len(params),
                        "numel": numel,
                        "method": method,
                        "dtypes": pair,
                        "impl": impl,
                        "kind": kind,
                        "bytes": nbytes,
                        "note": "",
                    }
                    try:
                        step = _checked(build)
                    except Unsupported as exc:
                        row["note"] = str(exc)
                        rows.append(row)
                        log(f"  {name} {pair} {method} {impl}: -- ({exc})")
                        continue
                    timing = time_step(
                        lambda: step,
                        device=device,
                        state_bytes=nbytes,
                        min_run_time=min_run_time,
                        rotate=False,
                    )
                    row.update(
                        median_ms=timing.median_s * 1e3,
                        p20_ms=timing.p20_s * 1e3,
                        p80_ms=timing.p80_s * 1e3,
                        samples=timing.samples,
                        gbps=nbytes / timing.median_s / 1e9,
                        ops_per_step=count_op_calls(step),
                        kernels_per_step=count_kernel_launches(step),
                    )
                    rows.append(row)
                    log(
                        f"  {name} {pair} {method} {impl}: {row['median_ms']:.2f} ms, "
                        f"{row['ops_per_step']} op calls"
                    )
                    del step
                    gc.collect()
            del model, params
            gc.collect()
    add_speedups(rows, key=("mode", "model", "method", "dtypes"))
    add_speedup_vs_reference(rows)
    return rows


def add_speedup_vs_reference(rows) -> None:
    """``speedup_vs_torch_reference``: our pure-PyTorch backend's time / this row's."""
    reference = {
        (r["model"], r["method"], r["dtypes"]): r["median_ms"]
        for r in rows
        if r["impl"] == TORCH_REFERENCE and "median_ms" in r
    }
    for row in rows:
        key = (row["model"], row["method"], row["dtypes"])
        if row["kind"] == "ours" and "median_ms" in row and key in reference:
            row["speedup_vs_torch_reference"] = reference[key] / row["median_ms"]

"""The size sweep: every method x dtype pair x size, on every backend and peer."""

from __future__ import annotations

import gc

import torch

from . import compiled
from .flat_cases import available_backends, backend_supports, make_operands, our_step
from .peers import PEER_METHODS, FlatModel, Unsupported, peer_step
from .timing import last_level_cache_bytes, time_step
from .traffic import bytes_per_step, working_set_bytes

DTYPE_PAIRS = {
    "fp32/fp32": (torch.float32, torch.float32),
    "bf16/fp32": (torch.bfloat16, torch.float32),
    "fp16/fp32": (torch.float16, torch.float32),
    "bf16/bf16": (torch.bfloat16, torch.bfloat16),
    "fp16/fp16": (torch.float16, torch.float16),
    "fp64/fp64": (torch.float64, torch.float64),
}
# What a run times unless told: the pairs training uses most.
DEFAULT_DTYPE_PAIRS = ("fp32/fp32", "bf16/fp32")


def _record(method, pair, numel, impl, kind, nbytes, timing=None, note="", compile_s=None):
    row = {
        "mode": "sweep",
        "method": method,
        "dtypes": pair,
        "numel": numel,
        "impl": impl,
        "kind": kind,
        "bytes": nbytes,
        "note": note,
    }
    if compile_s is not None:
        row["compile_s"] = compile_s
    if timing is not None:
        row.update(
            median_ms=timing.median_s * 1e3,
            p20_ms=timing.p20_s * 1e3,
            p80_ms=timing.p80_s * 1e3,
            samples=timing.samples,
            gbps=nbytes / timing.median_s / 1e9,
        )
    return row


def run_sweep(*, device, sizes, methods, pairs, peers, min_run_time, log=print, backends=None):
    rows = []
    backends = chosen_backends(device, backends)
    cache = last_level_cache_bytes(device)
    for pair in pairs:
        weights_dtype, shadow_dtype = DTYPE_PAIRS[pair]
        for method in methods:
            reasons = {
                b: backend_supports(method, b, weights_dtype, shadow_dtype, device)
                for b in backends
            }
            for numel in sizes:
                nbytes = bytes_per_step(method, numel, weights_dtype, shadow_dtype)
                state = working_set_bytes(method, numel, weights_dtype, shadow_dtype)
                first = len(rows)
                for backend in backends:
                    impl = f"belay_kernels[{backend}]"
                    if reasons[backend]:
                        rows.append(
                            _record(
                                method, pair, numel, impl, "ours", nbytes, note=reasons[backend]
                            )
                        )
                        log(_progress(rows[-1]))
                        continue
                    make = lambda b=backend: our_step(  # noqa: E731
                        method,
                        b,
                        make_operands(method, numel, weights_dtype, shadow_dtype, device),
                    )
                    timing = time_step(
                        make, device=device, state_bytes=state, min_run_time=min_run_time
                    )
                    rows.append(_record(method, pair, numel, impl, "ours", nbytes, timing))
                    log(_progress(rows[-1]))
                for peer in peers:
                    if method not in peer_methods(peer):
                        continue
                    time_peer = _time_compiled if peer in compiled.COMPILED_PEERS else _time_peer
                    row = time_peer(
                        peer,
                        method,
                        pair,
                        numel,
                        nbytes,
                        state,
                        device,
                        weights_dtype,
                        shadow_dtype,
                        min_run_time,
                    )
                    rows.append(row)
                    log(_progress(row))
                for row in rows[first:]:
                    row["working_set_bytes"] = state
                    row["fits_in_cache"] = state <= cache
                if numel >= 10_000_000:  # give large buffers back before the next size
                    gc.collect()
    add_speedups(rows)
    add_speedups(rows, field="speedup_vs_torch_compile", only=compiled.COUNTED)
    return rows


def chosen_backends(device, names=None) -> list[str]:
    """Our backends that run on ``device``, in registry order; only ``names`` if given."""
    return [b for b in available_backends(device) if names is None or b in names]


def peer_methods(peer: str) -> tuple[str, ...]:
    return compiled.COMPILED_PEERS.get(peer) or PEER_METHODS.get(peer, ())


def points_per_case(*, device, methods, peers, backends=None, mode="sweep") -> int:
    """How many rows (and log lines) run_sweep makes per (dtype pair, size), and
    run_models (mode "models", which has no torch.compile peer) per (model, dtype pair)."""
    if mode != "sweep":
        peers = [p for p in peers if p not in compiled.COMPILED_PEERS]
    ours = len(chosen_backends(device, backends))
    return sum(ours + sum(method in peer_methods(p) for p in peers) for method in methods)


def _time_peer(
    peer, method, pair, numel, nbytes, state, device, weights_dtype, shadow_dtype, min_run_time
):
    def make():
        weights = make_operands("ema", numel, weights_dtype, weights_dtype, device)["weights"]
        return peer_step(peer, method, FlatModel(weights), shadow_dtype)

    try:
        timing = time_step(make, device=device, state_bytes=state, min_run_time=min_run_time)
    except Unsupported as exc:
        return _record(method, pair, numel, peer, "peer", nbytes, note=str(exc))
    return _record(method, pair, numel, peer, "peer", nbytes, timing)


def _time_compiled(
    peer, method, pair, numel, nbytes, state, device, weights_dtype, shadow_dtype, min_run_time
):
    """The torch.compile peer on our operands, compiled afresh for this point; the first
    call's time is its ``compile_s``, timed apart from the steps."""
    compile_s = []
    compiled.fresh_compile()

    def make():
        operands = make_operands(method, numel, weights_dtype, shadow_dtype, device)
        step = compiled.compiled_step(peer, method, operands)
        if not compile_s:  # the other copies reuse the code compiled here
            compile_s.append(compiled.checked_first_call(step, method, operands, device))
        return step

    try:
        timing = time_step(make, device=device, state_bytes=state, min_run_time=min_run_time)
    except Unsupported as exc:
        return _record(method, pair, numel, peer, "peer", nbytes, note=str(exc))
    return _record(method, pair, numel, peer, "peer", nbytes, timing, compile_s=compile_s[0])


def add_speedups(
    rows, key=("mode", "method", "dtypes", "numel"), field="speedup_vs_best_peer", only=None
) -> None:
    """Each timed row of ours gets ``field``: the best peer's time / ours for the same
    point (only the peer ``only``, if given), and for the best peer, its name."""
    best = {}
    for row in rows:
        if row["kind"] == "peer" and "median_ms" in row and only in (None, row["impl"]):
            k = tuple(row.get(f) for f in key)
            if k not in best or row["median_ms"] < best[k][0]:
                best[k] = (row["median_ms"], row["impl"])
    for row in rows:
        k = tuple(row.get(f) for f in key)
        if "median_ms" in row and k in best and (only is None or row["kind"] == "ours"):
            if only is None:
                row["best_peer"] = best[k][1]
            row[field] = best[k][0] / row["median_ms"]


def _progress(row) -> str:
    if "median_ms" not in row:
        return f"  {row['method']:9s} {row['dtypes']} n={row['numel']:.0e} {row['impl']}: -- ({row['note']})"
    compile_s = f", compiled in {row['compile_s']:.1f} s" if "compile_s" in row else ""
    return (
        f"  {row['method']:9s} {row['dtypes']} n={row['numel']:.0e} {row['impl']}: "
        f"{row['median_ms']:.3f} ms, {row['gbps']:.1f} GB/s{compile_s}"
    )

"""The size sweep: every method x dtype pair x size, on every backend and peer."""

from __future__ import annotations

import gc

import torch

from .flat_cases import available_backends, backend_supports, make_operands, our_step
from .peers import PEER_METHODS, FlatModel, Unsupported, peer_step
from .timing import last_level_cache_bytes, time_step
from .traffic import bytes_per_step, working_set_bytes

DTYPE_PAIRS = {
    "fp32/fp32": (torch.float32, torch.float32),
    "bf16/fp32": (torch.bfloat16, torch.float32),
}


def _record(method, pair, numel, impl, kind, nbytes, timing=None, note=""):
    row = {
        "mode": "sweep", "method": method, "dtypes": pair, "numel": numel, "impl": impl,
        "kind": kind, "bytes": nbytes, "note": note,
    }
    if timing is not None:
        row.update(
            median_ms=timing.median_s * 1e3, p20_ms=timing.p20_s * 1e3,
            p80_ms=timing.p80_s * 1e3, samples=timing.samples,
            gbps=nbytes / timing.median_s / 1e9,
        )
    return row


def run_sweep(*, device, sizes, methods, pairs, peers, min_run_time, log=print):
    rows = []
    backends = available_backends(device)
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
                        rows.append(_record(method, pair, numel, impl, "ours", nbytes,
                                            note=reasons[backend]))
                        log(_progress(rows[-1]))
                        continue
                    make = lambda b=backend: our_step(  # noqa: E731
                        method, b,
                        make_operands(method, numel, weights_dtype, shadow_dtype, device),
                    )
                    timing = time_step(make, device=device, state_bytes=state,
                                       min_run_time=min_run_time)
                    rows.append(_record(method, pair, numel, impl, "ours", nbytes, timing))
                    log(_progress(rows[-1]))
                for peer in peers:
                    if method not in PEER_METHODS[peer]:
                        continue
                    row = _time_peer(peer, method, pair, numel, nbytes, state, device,
                                     weights_dtype, shadow_dtype, min_run_time)
                    rows.append(row)
                    log(_progress(row))
                for row in rows[first:]:
                    row["working_set_bytes"] = state
                    row["fits_in_cache"] = state <= cache
                if numel >= 10_000_000:  # give large buffers back before the next size
                    gc.collect()
    add_speedups(rows)
    return rows


def points_per_case(*, device, methods, peers) -> int:
    """How many rows (and log lines) run_sweep makes per (dtype pair, size), and
    run_models per (model, dtype pair)."""
    backends = available_backends(device)
    return sum(len(backends) + sum(method in PEER_METHODS[p] for p in peers)
               for method in methods)


def _time_peer(peer, method, pair, numel, nbytes, state, device, weights_dtype,
               shadow_dtype, min_run_time):
    def make():
        weights = make_operands("ema", numel, weights_dtype, weights_dtype, device)["weights"]
        return peer_step(peer, method, FlatModel(weights), shadow_dtype)

    try:
        timing = time_step(make, device=device, state_bytes=state, min_run_time=min_run_time)
    except Unsupported as exc:
        return _record(method, pair, numel, peer, "peer", nbytes, note=str(exc))
    return _record(method, pair, numel, peer, "peer", nbytes, timing)


def add_speedups(rows, key=("mode", "method", "dtypes", "numel")) -> None:
    """Each timed row of ours gets ``speedup_vs_best_peer`` (best peer time / ours) for
    the same point, and the fastest peer's name."""
    best = {}
    for row in rows:
        if row["kind"] == "peer" and "median_ms" in row:
            k = tuple(row.get(f) for f in key)
            if k not in best or row["median_ms"] < best[k][0]:
                best[k] = (row["median_ms"], row["impl"])
    for row in rows:
        k = tuple(row.get(f) for f in key)
        if "median_ms" in row and k in best:
            row["best_peer"] = best[k][1]
            row["speedup_vs_best_peer"] = best[k][0] / row["median_ms"]


def _progress(row) -> str:
    if "median_ms" not in row:
        return f"  {row['method']:9s} {row['dtypes']} n={row['numel']:.0e} {row['impl']}: -- ({row['note']})"
    return (
        f"  {row['method']:9s} {row['dtypes']} n={row['numel']:.0e} {row['impl']}: "
        f"{row['median_ms']:.3f} ms, {row['gbps']:.1f} GB/s"
    )

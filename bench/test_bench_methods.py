"""pytest-benchmark suite: every method on every available backend and every peer, at
one small size. Run with ``pytest bench --benchmark-only``.

Environment: ``BELAY_BENCH_SIZE`` (elements, default 1e5; CI uses a tiny size as a smoke
test) and ``BELAY_BENCH_DEVICE`` (default cuda when available). Nothing here asserts a
time: the numbers are for reading, the assertions only check that each step ran.
GB/s from the counted bytes is stored in each result's ``extra_info``.
"""

from __future__ import annotations

import os

import pytest
import torch

from belay_kernels.benchmark.flat_cases import (
    available_backends,
    backend_supports,
    make_operands,
    our_step,
)
from belay_kernels.benchmark.fused import SETUPS as FUSED_SETUPS
from belay_kernels.benchmark.fused import build_case as build_fused_case
from belay_kernels.benchmark.fused import bytes_per_param as fused_bytes_per_param
from belay_kernels.benchmark.fused import make_weights as make_fused_weights
from belay_kernels.benchmark.fused import row_names as fused_row_names
from belay_kernels.benchmark.peers import PEER_METHODS, FlatModel, Unsupported, peer_step
from belay_kernels.benchmark.sweep import DTYPE_PAIRS
from belay_kernels.benchmark.traffic import METHODS, bytes_per_step

SIZE = int(float(os.environ.get("BELAY_BENCH_SIZE", "1e5")))
DEVICE = torch.device(
    os.environ.get("BELAY_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
)


def _run(benchmark, step, method, pair):
    weights_dtype, shadow_dtype = DTYPE_PAIRS[pair]
    nbytes = bytes_per_step(method, SIZE, weights_dtype, shadow_dtype)
    if DEVICE.type == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize()

    benchmark.extra_info.update(numel=SIZE, bytes=nbytes, device=str(DEVICE))
    benchmark(step)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = nbytes / median / 1e9 if median else None


@pytest.mark.parametrize("pair", list(DTYPE_PAIRS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", available_backends(DEVICE))
def test_ours(benchmark, backend, method, pair):
    weights_dtype, shadow_dtype = DTYPE_PAIRS[pair]
    reason = backend_supports(method, backend, weights_dtype, shadow_dtype, DEVICE)
    if reason:
        pytest.skip(reason)
    operands = make_operands(method, SIZE, weights_dtype, shadow_dtype, DEVICE)
    _run(benchmark, our_step(method, backend, operands), method, pair)


@pytest.mark.parametrize("pair", list(DTYPE_PAIRS))
@pytest.mark.parametrize(
    "peer,method", [(p, m) for p, methods in PEER_METHODS.items() for m in methods]
)
def test_peer(benchmark, peer, method, pair):
    weights_dtype, shadow_dtype = DTYPE_PAIRS[pair]
    weights = make_operands("ema", SIZE, weights_dtype, weights_dtype, DEVICE)["weights"]
    try:
        step = peer_step(peer, method, FlatModel(weights), shadow_dtype)
    except Unsupported as exc:
        pytest.skip(str(exc))
    _run(benchmark, step, method, pair)


@pytest.mark.parametrize("setup", list(FUSED_SETUPS))
@pytest.mark.parametrize("impl", fused_row_names())
def test_fused_step(benchmark, impl, setup, tmp_path):
    """One AdamW step with an averager (``belay-kernels bench --mode fused``'s rows), on
    the CPU: fused by belay_kernels.fuse, and the unfused pairs and peers it is compared to."""
    if DEVICE.type != "cpu":
        pytest.skip("--mode fused times the CPU only")
    weights_dtype, shadow_dtype = FUSED_SETUPS[setup]
    start = make_fused_weights(SIZE, weights_dtype)
    try:
        case = build_fused_case(impl, start, shadow_dtype, str(tmp_path))
    except ImportError as exc:
        pytest.skip(f"not installed: {exc}")
    nbytes = fused_bytes_per_param(impl, setup) * start.numel
    benchmark.extra_info.update(numel=start.numel, bytes=nbytes, device="cpu", backend=case.backend)
    benchmark(case.step)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = nbytes / median / 1e9 if median else None

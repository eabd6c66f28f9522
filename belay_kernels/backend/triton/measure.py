"""Measure the Triton kernels on a CUDA device: the device's copy bandwidth, each
kernel's achieved bandwidth, and the launches one averaging step costs.

Meant to be called by ``belay-kernels bench`` on a GPU machine::

    from belay_kernels.backend.triton.measure import measure
    results = measure("cuda")           # a dict, JSON-serialisable

or run alone: ``python -m belay_kernels.backend.triton.measure [--numel N] [--runs R]``.

Bytes are counted explicitly: each input element read once and each output element
written once (the same count the static PTX check asserts), so GB/s = counted bytes /
median time. The copy bandwidth comes from a large device-to-device ``copy_`` in the
same run (bytes read + written), so each kernel is also reported as a fraction of it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

from ... import methods as method_table
from ...methods import DTYPE_PAIRS
from ...reference import swap_supported
from ...samples import random_like_model
from . import aot
from .device_step import StepGate, advance_step_
from .ema import ema_update_, ema_update_foreach_

METHODS = tuple(m.op for m in method_table.METHODS)
_METHOD = {m.name: m for m in aot.METHODS}


def time_cuda(fn: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    """Median, p20 and p80 in milliseconds of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(runs)
    ]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in pairs)
    return {
        "median_ms": statistics.median(times),
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1))],
    }


def copy_bandwidth(device, numel: int, runs: int, warmup: int) -> dict[str, float]:
    """A large fp32 device-to-device copy: bytes read + written over the median time."""
    source = torch.rand(numel, device=device)
    target = torch.empty_like(source)
    timing = time_cuda(lambda: target.copy_(source), runs, warmup)
    moved = 2 * numel * source.element_size()
    return {"numel": numel, "bytes": moved, **timing, "gbps": moved / timing["median_ms"] / 1e6}


def _step_fn(op: str, weights: torch.Tensor, shadow: torch.Tensor, extra: torch.Tensor):
    """One call of the table method ``op``'s Triton function with its typical scalars."""
    method = method_table.BY_OP[op]
    function = getattr(importlib.import_module(f".{method.name}", __package__), op)
    by_role = {"weights": weights, "shadow": shadow, "snapshot": shadow, "out": extra}
    arguments = [by_role[role] for role in method.tensors] + [s.typical for s in method.scalars]
    return lambda: function(*arguments)


def kernel_bandwidth(
    device,
    numel: int,
    runs: int,
    warmup: int,
    methods: Sequence[str],
    pairs: Sequence[tuple[torch.dtype, torch.dtype]],
) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for method in methods:
        for weights_dtype, shadow_dtype in pairs:
            if method_table.BY_OP[method].exact and not swap_supported(weights_dtype, shadow_dtype):
                continue
            case = aot.Case(_METHOD[method], weights_dtype, shadow_dtype)
            per_element = case.bytes_per_element(case.method.inputs) + case.bytes_per_element(
                case.method.outputs
            )
            sample = random_like_model(min(numel, 1 << 20), torch.float32, generator=generator)
            sample = sample.to(device)
            weights = sample.repeat(numel // sample.numel() + 1)[:numel].to(weights_dtype)
            shadow = (weights.float() * 0.5).to(shadow_dtype)
            extra = torch.empty_like(weights)
            timing = time_cuda(_step_fn(method, weights, shadow, extra), runs, warmup)
            rows.append(
                {
                    "kernel": method,
                    "weights_dtype": str(weights_dtype).removeprefix("torch."),
                    "shadow_dtype": str(shadow_dtype).removeprefix("torch."),
                    "numel": numel,
                    "bytes_per_element": per_element,
                    **timing,
                    "gbps": per_element * numel / timing["median_ms"] / 1e6,
                }
            )
            del weights, shadow, extra
    return rows


def count_launches(fn: Callable[[], object]) -> int:
    """GPU work items (kernels, copies) one call of ``fn`` issues, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # compile and build any pointer table first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def launches_per_step(device, num_tensors: int = 64) -> list[dict]:
    """Launches per step() for a flat buffer, a tensor list, and a gated (graph-ready)
    step that also advances the device-side step counter; plus whether that gated step
    captures into a CUDA graph and replays with the counter advancing on the device."""
    shadow = torch.rand(1 << 20, device=device)
    weights = torch.rand_like(shadow)
    shadows = [torch.rand(4099 + i, device=device) for i in range(num_tensors)]
    weight_list = [torch.rand_like(s) for s in shadows]
    gate = StepGate.on(device, skip=torch.zeros(1, device=device))

    def gated_step():
        ema_update_foreach_(shadows, weight_list, 0.999, gate=gate)
        advance_step_(gate)

    return [
        {
            "step": "EMA, one flat buffer",
            "launches": count_launches(lambda: ema_update_(shadow, weights, 0.999)),
        },
        {
            "step": f"EMA, a list of {num_tensors} tensors",
            "launches": count_launches(lambda: ema_update_foreach_(shadows, weight_list, 0.999)),
        },
        {
            "step": f"EMA gated on a step tensor and found_inf, a list of {num_tensors} "
            "tensors, + advance_step_",
            "launches": count_launches(gated_step),
        },
        {
            "step": "the gated step, captured in a CUDA graph",
            "graph_capture": _graph_capture_check(gated_step, gate),
        },
    ]


def _graph_capture_check(step: Callable[[], object], gate: StepGate) -> str:
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm up outside the capture: compile, build pointer tables
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        before = int(gate.step)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        advanced = int(gate.step) - before
        return "ok" if advanced == 2 else f"replayed, but the step advanced by {advanced}, not 2"
    except Exception as exc:  # reported, not hidden: the bench prints it
        return f"failed: {type(exc).__name__}: {exc}"


def measure(
    device: str | torch.device = "cuda",
    *,
    numel: int = 1 << 27,
    runs: int = 50,
    warmup: int = 5,
    methods: Sequence[str] = METHODS,
    pairs: Sequence[tuple[torch.dtype, torch.dtype]] = DTYPE_PAIRS,
) -> dict:
    """Copy bandwidth, per-kernel bandwidth and launches per step on a CUDA ``device``."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"measure() needs a CUDA device, got {device} "
            f"(torch.cuda.is_available() = {torch.cuda.is_available()})."
        )
    with torch.cuda.device(device):
        copy = copy_bandwidth(device, numel, runs, warmup)
        kernels = kernel_bandwidth(device, numel, runs, warmup, methods, pairs)
        for row in kernels:
            row["fraction_of_copy"] = row["gbps"] / copy["gbps"]
        import triton

        return {
            "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "copy": copy,
            "kernels": kernels,
            "launches": launches_per_step(device),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the Triton kernels on a GPU.")
    parser.add_argument("--numel", type=int, default=1 << 27)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = measure("cuda", numel=args.numel, runs=args.runs)
    copy = results["copy"]
    print(f"{results['device']}: device copy {copy['gbps']:.0f} GB/s")
    for row in results["kernels"]:
        print(
            f"{row['kernel']:20s} {row['weights_dtype']:>8s}/{row['shadow_dtype']:<8s} "
            f"{row['median_ms']:8.3f} ms  {row['gbps']:7.0f} GB/s  "
            f"{row['fraction_of_copy']:5.0%} of copy"
        )
    for row in results["launches"]:
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

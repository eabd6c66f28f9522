"""Benchmark of the compiled kernels against pure torch, in one process on this machine.

Each case times a fused op and its torch counterpart on the same buffers, alternating
them so that a noisy neighbour slows both alike, and reports the median time (p20-p80),
the GB/s from explicitly counted bytes (each input read once, each output written once)
and that as a fraction of the streaming bandwidth: the best of torch's copy, triad and
in-place scale on fp32 buffers of the same length, timed in the same alternation as the
case, so both see the same load. It also measures how far peak memory rises during one
call of the fused op and of its torch peer.

    PYTHONPATH=. python bench/bench_extension.py [--numel 67108864] [--repeats 15]
        [--device cpu|cuda] [--json bench/results/extension-cpu.json] [--only BELAY]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from belay_kernels import backends, reference
from belay_kernels.backend._library import ops as compiled_ops

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _stats(times):
    q = statistics.quantiles(times, n=5)  # p20, p40, p60, p80
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3]}


def measure(fns: dict, device, repeats: int) -> dict:
    """Interleaved timings of several callables; one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn, device))
    return {name: _stats(t) for name, t in times.items()}


def streaming_kernels(numel, device):
    """torch's streaming kernels on fp32 buffers of the same length, and the bytes each
    moves: copy (read 1, write 1), triad (read 2, write 1), in-place scale (read 1,
    write 1 in place)."""
    a, b, c = (torch.rand(numel, device=device) for _ in range(3))
    return {
        "stream: copy": (8 * numel, lambda: a.copy_(b)),
        "stream: triad": (12 * numel, lambda: torch.add(b, c, alpha=0.5, out=a)),
        "stream: scale in place": (8 * numel, lambda: a.mul_(1.0)),
    }


def peak_growth_bytes(fn, device) -> int:
    """How far peak memory rises above the level before ``fn`` while it runs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # Linux: writing 5 to clear_refs resets VmHWM (peak resident set) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cases(numel, device):
    """(name, bytes moved by the fused op, {label: callable}); the fused op is first."""
    ops = compiled_ops()
    g = torch.Generator(device=device).manual_seed(0)

    def buf(dtype):
        return torch.randn(numel, generator=g, device=device).to(dtype)

    def ema(shadow, weights, skip_nonfinite=False):
        """The fused EMA and the best pure-torch way: lerp_, after a cast where the
        weights' dtype differs from the shadow's."""
        rate = 1 - 0.999
        if weights.dtype == shadow.dtype:
            peer = "torch lerp_", lambda: shadow.lerp_(weights, rate)
        else:
            peer = "torch cast + lerp_", lambda: shadow.lerp_(weights.to(shadow.dtype), rate)
        return {
            "fused": lambda: ops.ema_update_(shadow, weights, 0.999, None, skip_nonfinite, None),
            peer[0]: peer[1],
        }

    w, s = buf(F32), buf(F32)
    yield (
        "BELAY fp32 (skip non-finite)",
        16 * numel,
        {
            "fused": lambda: ops.belay_step_(w, s, 0.01, 0.001, None, None, True, None),
            "torch reference": lambda: reference.belay_step_(w, s, 0.01, 0.001, True, None),
        },
    )
    yield (
        "BELAY fp32 (propagate)",
        16 * numel,
        {
            "fused": lambda: ops.belay_step_(w, s, 0.01, 0.001, None, None, False, None),
            "torch reference": lambda: reference.belay_step_(w, s, 0.01, 0.001, False, None),
        },
    )
    wb = buf(BF16)
    yield "EMA bf16 weights, fp32 shadow (propagate)", 10 * numel, ema(s, wb)
    yield "EMA bf16 weights, fp32 shadow (skip non-finite)", 10 * numel, ema(s, wb, True)
    yield "EMA fp32 (propagate)", 12 * numel, ema(s, w)
    yield "EMA fp32 (skip non-finite)", 12 * numel, ema(s, w, True)
    yield (
        "SWA fp32",
        12 * numel,
        {
            "fused": lambda: ops.swa_update_(s, w, 7, None, True, None),
            "torch reference": lambda: reference.swa_update_(s, w, 7, True, None),
        },
    )
    out = torch.empty_like(w)
    yield (
        "two-point average fp32",
        12 * numel,
        {
            "fused": lambda: ops.two_point_average_(out, w, s),
            "torch reference": lambda: reference.two_point_average_(out, w, s),
        },
    )
    snapshot = buf(F32)
    out_b = torch.empty_like(wb)
    yield (
        "two-point average bf16 weights, fp32 snapshot",
        8 * numel,
        {
            "fused": lambda: ops.two_point_average_(out_b, wb, snapshot),
            "torch reference": lambda: reference.two_point_average_(out_b, wb, snapshot),
        },
    )
    yield (
        "swap fp32",
        16 * numel,
        {
            "fused": lambda: ops.swap_(w, s, False),
            "torch reference": lambda: reference.swap_(w, s, False),
        },
    )
    yield (
        "swap bf16 weights, fp32 shadow",
        12 * numel,
        {
            "fused": lambda: ops.swap_(wb, s, False),
            "torch reference": lambda: reference.swap_(wb, s, False),
        },
    )
    # More dtype pairs: BELAY with bf16 weights, 16-bit shadows, fp16 throughout.
    sb, wh, sh = buf(BF16), buf(F16), buf(F16)
    yield (
        "BELAY bf16 weights, fp32 shadow",
        12 * numel,
        {
            "fused": lambda: ops.belay_step_(wb, s, 0.01, 0.001, None, None, False, None),
            "torch reference": lambda: reference.belay_step_(wb, s, 0.01, 0.001, False, None),
        },
    )
    yield "EMA bf16 weights, bf16 shadow", 6 * numel, ema(sb, wb)
    yield "EMA fp16 weights, fp32 shadow", 10 * numel, ema(s, wh)
    yield "EMA fp16 weights, fp16 shadow", 6 * numel, ema(sh, wh)
    out_h = torch.empty_like(wh)
    yield (
        "two-point average fp16",
        6 * numel,
        {
            "fused": lambda: ops.two_point_average_(out_h, wh, sh),
            "torch reference": lambda: reference.two_point_average_(out_h, wh, sh),
        },
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    status = backends()["cuda" if device.type == "cuda" else "cpp"]
    if not status.startswith("available"):
        print(f"the compiled backend is {status}")
        return 1

    load_before = os.getloadavg()
    stream = streaming_kernels(args.numel, device)
    print(
        f"device {device}, {torch.get_num_threads()} threads, {args.numel:,} elements, "
        f"{args.repeats} repeats; each case's streaming bandwidth is the best of torch's "
        "copy, triad and in-place scale, timed alternately with it"
    )
    results = []
    print(
        f"{'case':48s} {'fused ms (p20-p80)':>22s} {'GB/s':>6s} {'stream':>6s} "
        f"{'%':>5s}  ratio to torch"
    )
    for name, nbytes, fns in cases(args.numel, device):
        if args.only not in name:
            continue
        peer_name = next(k for k in fns if k != "fused")
        timing = measure({**fns, **{k: fn for k, (_, fn) in stream.items()}}, device, args.repeats)
        stream_bytes_per_s = {
            k.removeprefix("stream: "): n / timing[k]["median_s"] for k, (n, _) in stream.items()
        }
        best_stream = max(stream_bytes_per_s.values())
        fused, peer = timing["fused"], timing[peer_name]
        growth = peak_growth_bytes(fns["fused"], device)
        peer_growth = peak_growth_bytes(fns[peer_name], device)
        row = {
            "case": name,
            "bytes": nbytes,
            "fused": fused,
            peer_name: peer,
            "fused_gb_s": nbytes / fused["median_s"] / 1e9,
            "streaming_bytes_per_s": stream_bytes_per_s,
            "fraction_of_stream": nbytes / fused["median_s"] / best_stream,
            "speedup_vs_" + peer_name.replace(" ", "_"): peer["median_s"] / fused["median_s"],
            "peak_growth_bytes": growth,
            "peak_growth_fraction_of_buffer": growth / (args.numel * 4),
            "peer_peak_growth_bytes": peer_growth,
        }
        results.append(row)
        print(
            f"{name:48s} {fused['median_s'] * 1e3:7.1f} ({fused['p20_s'] * 1e3:6.1f}-"
            f"{fused['p80_s'] * 1e3:6.1f}) {row['fused_gb_s']:6.1f} {best_stream / 1e9:6.1f} "
            f"{100 * row['fraction_of_stream']:4.0f}%  {peer['median_s'] / fused['median_s']:5.2f}x "
            f"{peer_name} ({peer['median_s'] * 1e3:.1f} ms); peak +{growth / 2**20:.1f} MiB "
            f"(torch +{peer_growth / 2**20:.0f} MiB)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": _cpu_model(),
                    "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "load_average_before_after": [load_before, os.getloadavg()],
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": str(device),
                    "numel": args.numel,
                    "repeats": args.repeats,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

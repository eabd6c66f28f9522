"""Time one step: median, p20 and p80 after warm-up, over buffers that do not fit in cache.

A step is built by ``make_step()`` (fresh tensors every call). When one step's working
set fits in the last-level cache (CPU L3, GPU L2), several independent copies are built
and the timer rotates through them, so every step streams from memory as it would in
training, where the model is far larger than any cache.

CPU: :class:`torch.utils.benchmark.Timer` (``timeit`` over blocks of calls) with torch's\nthreads.
CUDA: one pair of CUDA events around every step.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.benchmark as torch_benchmark

MIN_SAMPLES = 7
# A step slower than this gets fewer samples and one warm-up call: the pure-PyTorch
# reference takes seconds per step on a 124M-parameter model on a 2-core machine.
SLOW_STEP_S = 0.5
MIN_SAMPLES_SLOW = 3
MAX_ROTATION = 64


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    samples: int

    @classmethod
    def from_samples(cls, seconds) -> Timing:
        values = np.asarray(seconds, dtype=float)
        p20, median, p80 = np.percentile(values, [20, 50, 80])
        return cls(float(median), float(p20), float(p80), int(values.size))


def _parse_cache_size(text: str) -> int:
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cpu_last_level_cache_bytes() -> int:
    """Largest cache the CPU reports (sysfs); 32 MiB when it reports none."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            sizes.append(_parse_cache_size(path.read_text()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return cpu_last_level_cache_bytes()


def rotation_copies(state_bytes: int, device: torch.device) -> int:
    """How many copies of a step's tensors together exceed twice the last-level cache."""
    cache = last_level_cache_bytes(device)
    return max(1, min(MAX_ROTATION, math.ceil(2 * cache / max(state_bytes, 1))))


def time_step(
    make_step: Callable[[], Callable[[], object]],
    *,
    device: torch.device,
    state_bytes: int,
    min_run_time: float,
    rotate: bool = True,
) -> Timing:
    copies = rotation_copies(state_bytes, device) if rotate else 1
    steps = [make_step() for _ in range(copies)]
    # warm-up: first-touch page faults, lazy inits, autotuning; twice unless slow
    started = time.perf_counter()
    for step in steps:
        step()
    per_step = (time.perf_counter() - started) / copies
    if per_step < SLOW_STEP_S:
        for step in steps:
            step()
    if device.type == "cuda":
        return _time_cuda(steps, min_run_time)
    return _time_cpu(steps, min_run_time, per_step)


# One CPU sample is the mean over a block of calls lasting about this long, so the
# timer's own overhead (a few microseconds) stays below 1% even for 10 us steps.
BLOCK_S = 0.002


def _time_cpu(steps, min_run_time: float, per_step_guess: float) -> Timing:
    rotation = itertools.cycle(steps)

    def run_next():
        next(rotation)()

    timer = torch_benchmark.Timer(
        stmt="run_next()",
        globals={"run_next": run_next},
        num_threads=torch.get_num_threads(),
    )
    calls_per_block = max(1, round(BLOCK_S / max(per_step_guess, 1e-7)))
    wanted = MIN_SAMPLES_SLOW if per_step_guess > SLOW_STEP_S else MIN_SAMPLES
    samples, spent = [], 0.0
    while len(samples) < wanted or spent < min_run_time:
        block = timer.timeit(calls_per_block)
        samples.append(block.mean)
        spent += block.mean * calls_per_block
    return Timing.from_samples(samples)


def _time_cuda(steps, min_run_time: float) -> Timing:
    torch.cuda.synchronize()
    probe_start = torch.cuda.Event(enable_timing=True)
    probe_end = torch.cuda.Event(enable_timing=True)
    probe_start.record()
    for step in steps:
        step()
    probe_end.record()
    torch.cuda.synchronize()
    per_step = max(probe_start.elapsed_time(probe_end) / 1e3 / len(steps), 1e-6)
    count = max(MIN_SAMPLES, min(10_000, int(min_run_time / per_step)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for i in range(count):
        starts[i].record()
        steps[i % len(steps)]()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def streaming_bandwidth(
    device: torch.device, *, numel: int, min_run_time: float
) -> tuple[float, Timing]:
    """GB/s of one large ``copy_`` (bytes read + bytes written): the roof every
    memory-bound method here is measured against."""
    from .traffic import copy_bytes

    def make_copy():
        source = torch.rand(numel, device=device)
        destination = torch.empty_like(source)
        return lambda: destination.copy_(source)

    timing = time_step(
        make_copy,
        device=device,
        state_bytes=copy_bytes(numel, torch.float32),
        min_run_time=min_run_time,
    )
    return copy_bytes(numel, torch.float32) / timing.median_s / 1e9, timing

"""``belay-kernels bench --mode overhead``: what one ``step()`` costs the host.

The tensors are so small (16x16 fp32, the weights of bias-free ``nn.Linear(16, 16)``
layers) that the arithmetic is negligible and the time is the Python and dispatch around
it. Through the public API only (an averager's constructor and ``step()``), so the same
benchmark times any implementation of the step path. At one torch thread by default.

Layouts: a flat buffer (``flatten=True``, the default) over 2 and 148 tensors, and tensor
lists (``flatten=False``) of 148 and 1000 tensors; 148 is GPT-2 small's parameter count.
Every averager gets a fresh model. Peers on the same layout: ``torch._foreach_lerp_`` of a
pre-made shadow list towards the parameters' tensors (one call, no checks: the floor a
Python step can reach), and timm's ``ModelEmaV3.update(model)``. The peers do not flatten:
on a ``flat:N`` layout they still go over the N tensors, as they would in training.

Timing: each implementation is warmed up, then timed call by call with
``time.perf_counter`` around each ``step()``; the calls are spread over several rounds, the
implementations of a layout interleaved within each round (in a rotating order), so that a
drift in the machine's load touches all of them alike. The garbage collector is off while
timing, as in ``timeit``. Reported: the median and p10/p90 in microseconds, and the ratio of
the median to ``torch._foreach_lerp_``'s on the same layout.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .report import markdown_header

WIDTH = 16
DECAY = 0.999
NEVER = 10**12  # a snapshot interval no timed run reaches
LERP = "torch._foreach_lerp_"
TIMM = "timm ModelEmaV3.update"
CHECK = "EMA's memory check alone"
KERNELS = "EMA's kernel calls alone"


@dataclass(frozen=True)
class Layout:
    flatten: bool
    tensors: int

    @property
    def name(self) -> str:
        return f"{'flat' if self.flatten else 'list'}:{self.tensors}"


DEFAULT_LAYOUTS = (Layout(True, 2), Layout(True, 148), Layout(False, 148), Layout(False, 1000))


def _averagers():
    """averager -> how to build it on a module (``folder``: PostHocEMA's snapshot_dir)."""
    import belay_kernels as bk

    return {
        "EMA": lambda m, flatten, folder: bk.EMA(m, decay=DECAY, backend="auto", flatten=flatten),
        "Belay": lambda m, flatten, folder: bk.Belay(
            m, alpha=0.01, beta=0.01, backend="auto", flatten=flatten
        ),
        "SWA": lambda m, flatten, folder: bk.SWA(m, backend="auto", flatten=flatten),
        "TwoPoint": lambda m, flatten, folder: bk.TwoPoint(
            m, gap=1, backend="auto", flatten=flatten
        ),
        "PostHocEMA": lambda m, flatten, folder: bk.PostHocEMA(
            m,
            sigma_rels=(0.05, 0.10),
            snapshot_every=NEVER,
            snapshot_dir=folder,
            backend="auto",
            flatten=flatten,
        ),
    }


AVERAGER_NAMES = ("EMA", "Belay", "SWA", "TwoPoint", "PostHocEMA")
PEER_NAMES = (LERP, TIMM)


def parse_layouts(text: str) -> list[Layout]:
    """``flat:2,list:148`` -> layouts."""
    layouts = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        kind, _, count = item.partition(":")
        if kind not in ("flat", "list") or not count.isdigit() or int(count) < 1:
            raise ValueError(f"a layout is flat:N or list:N with N >= 1, got {item!r}")
        layouts.append(Layout(kind == "flat", int(count)))
    if not layouts:
        raise ValueError("no layouts given")
    return layouts


def make_model(tensors: int, device: torch.device) -> nn.Module:
    """``tensors`` bias-free 16x16 fp32 linear layers: one 256-element tensor each."""
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(tensors)]).to(device)


def _kernel_calls(averager):
    launches = averager._launches

    def run():
        for launch in launches:
            launch.kernel(*launch.tensors, DECAY, True, launch.skipped)

    return run


def _lerp_step(model: nn.Module):
    weights = [p.detach() for p in model.parameters()]
    shadows = [w.clone() for w in weights]
    return lambda: torch._foreach_lerp_(shadows, weights, 1 - DECAY)


def _timm_step(model: nn.Module):
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=DECAY)
    return lambda: ema.update(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(layout: Layout, impl: str, kind: str, **fields) -> dict:
    return {
        "mode": "overhead",
        "layout": layout.name,
        "flatten": layout.flatten,
        "tensors": layout.tensors,
        "numel": layout.tensors * WIDTH * WIDTH,
        "impl": impl,
        "kind": kind,
        "note": "",
        **fields,
    }


def _one_phrase(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def build_steps(layout: Layout, device: torch.device, folder: str, averagers, peers):
    """[(row, step or None)] for one layout; a row with no step carries a note."""
    makers = _averagers()
    cases = []
    for name in averagers:
        row = _row(layout, name, "ours", averager=name)
        try:
            averager = makers[name](make_model(layout.tensors, device), layout.flatten, folder)
            cases.append((row, averager.step))
        except Exception as exc:  # this averager refused the layout or the device
            row["note"] = f"failed: {_one_phrase(exc)}"
            cases.append((row, None))
            continue
        if name == "EMA":
            # The step's two parts that grow with the tensors: the check that the model
            # still holds the planned memory (belay_kernels/bound.py), and the planned
            # kernel calls, whose arithmetic on 148 x 256 elements is no longer negligible.
            cases.append((_row(layout, CHECK, "part"), averager._bound.first_moved))
            cases.append((_row(layout, KERNELS, "part"), _kernel_calls(averager)))
    for name in peers:
        row = _row(layout, name, "peer")
        try:
            step = (_lerp_step if name == LERP else _timm_step)(make_model(layout.tensors, device))
        except ImportError as exc:
            row["note"] = f"not installed ({_one_phrase(exc)})"
            step = None
        except Exception as exc:
            row["note"] = f"failed: {_one_phrase(exc)}"
            step = None
        cases.append((row, step))
    return cases


def time_interleaved(
    steps: list[Callable],
    *,
    reps: int,
    rounds: int,
    warmup: int,
    min_run_time: float,
    device: torch.device,
    max_samples: int = 20_000,
) -> list[list[float]]:
    """Seconds of each call, per step: ``warmup`` untimed calls each, then ``rounds``
    rounds in which every step is called at least ``reps / rounds`` times and for at least
    ``min_run_time / rounds`` seconds (at most ``max_samples / rounds`` calls), the steps
    taken in a rotating order so that none is always first."""
    per_round = max(1, -(-reps // rounds))
    round_time = min_run_time / rounds
    round_cap = max(per_round, max_samples // rounds)
    samples: list[list[float]] = [[] for _ in steps]
    for step in steps:
        for _ in range(warmup):
            step()
    _sync(device)
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = list(range(len(steps)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                step, out = steps[i], samples[i]
                start, n = clock(), 0
                while n < per_round or (clock() - start < round_time and n < round_cap):
                    t0 = clock()
                    step()
                    out.append(clock() - t0)
                    n += 1
                _sync(device)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def timer_floor_us(samples: int = 2000) -> float:
    """Median of timing an empty call the same way: what every row carries anyway."""
    noop = lambda: None
    clock, out = time.perf_counter, []
    for _ in range(samples):
        t0 = clock()
        noop()
        out.append(clock() - t0)
    return statistics.median(out) * 1e6


def run_overhead(
    *,
    device: torch.device,
    layouts=DEFAULT_LAYOUTS,
    averagers=AVERAGER_NAMES,
    peers=PEER_NAMES,
    reps: int = 200,
    rounds: int = 5,
    warmup: int = 10,
    min_run_time: float = 0.3,
    threads: int = 1,
    log=lambda _: None,
) -> list[dict]:
    """One row per (layout, implementation): µs per step, median and p10/p90, and
    ``vs_lerp`` (our median / ``torch._foreach_lerp_``'s on that layout)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for layout in layouts:
                cases = build_steps(layout, device, folder, averagers, peers)
                runnable = [(row, step) for row, step in cases if step is not None]
                for row, _ in cases:
                    if row["note"]:
                        log(f"  {layout.name} {row['impl']}: -- ({row['note']})")
                samples = time_interleaved(
                    [step for _, step in runnable],
                    reps=reps,
                    rounds=rounds,
                    warmup=warmup,
                    min_run_time=min_run_time,
                    device=device,
                )
                for (row, _), seconds in zip(runnable, samples):
                    p10, median, p90 = np.percentile(np.asarray(seconds) * 1e6, [10, 50, 90])
                    row.update(
                        median_us=float(median),
                        p10_us=float(p10),
                        p90_us=float(p90),
                        samples=len(seconds),
                    )
                    log(f"  {layout.name} {row['impl']}: {median:.1f} us ({len(seconds)} calls)")
                layout_rows = [row for row, _ in cases]
                add_ratios(layout_rows)
                rows += layout_rows
                del cases, runnable, samples
                gc.collect()
                if any(Path(folder).iterdir()):
                    raise RuntimeError(f"PostHocEMA wrote a snapshot while timing: {folder}")
    finally:
        torch.set_num_threads(before)
    return rows


def add_ratios(rows) -> None:
    lerp = [r for r in rows if r["impl"] == LERP and "median_us" in r]
    if not lerp:
        return
    for r in rows:
        if "median_us" in r:
            r["vs_lerp"] = r["median_us"] / lerp[0]["median_us"]


def _cells(r) -> list[str]:
    fmt = lambda v: f"{v:.1f}" if v < 1000 else f"{v:.0f}"  # noqa: E731
    return [
        r["layout"],
        r["impl"],
        fmt(r["median_us"]),
        fmt(r["p10_us"]),
        fmt(r["p90_us"]),
        f"{r['vs_lerp']:.2f}x" if "vs_lerp" in r else "",
        str(r["samples"]),
    ]


HEAD = ["layout", "impl", "us/step", "p10", "p90", "vs lerp", "calls"]


def format_table(rows) -> str:
    lines = []
    for r in rows:
        if "median_us" in r:
            lines.append(_cells(r))
        else:
            lines.append([r["layout"], r["impl"], "-- " + r["note"]])
    full = [c for c in lines if len(c) == len(HEAD)]
    widths = [max(len(c[i]) for c in [HEAD, *full]) for i in range(len(HEAD))]
    right = {2, 3, 4, 5, 6}
    out = []
    for cells in [HEAD, *lines]:
        out.append(
            "  ".join(
                c.rjust(w) if i in right and len(cells) == len(HEAD) else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
    return "\n".join(line.rstrip() for line in out)


def markdown_table(rows) -> str:
    lines = [
        "| layout | implementation | µs/step median | p10 | p90 | vs `_foreach_lerp_` | calls |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "median_us" not in r:
            lines.append(f"| {r['layout']} | {r['impl']} | — ({r['note']}) | | | | |")
        else:
            lines.append("| " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines)


def write_files(out: Path, machine: dict, rows, command: str, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(
        json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=1)
    )
    text = [
        *markdown_header(command, machine, device=machine["device"]),
        f"Timing: {settings['description']}",
        "",
        markdown_table(rows),
    ]
    (out / "overhead.md").write_text("\n".join(text) + "\n")


def main_overhead(args, raw_argv, log) -> int:
    from .machine import machine_info
    from .report import header

    threads = args.threads or 1
    layouts = args.layouts or list(DEFAULT_LAYOUTS)
    reps, rounds, warmup = (20, 2, 3) if args.quick else (200, 5, 10)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        machine = machine_info(args.device)
    finally:
        torch.set_num_threads(before)
    log(header(machine))
    floor = timer_floor_us()
    # the lerp is the yardstick of every ratio: always timed; timm unless --peers leaves it out
    peers = [LERP] + ([TIMM] if "timm ModelEmaV3" in args.peers else [])
    rows = run_overhead(
        device=args.device,
        layouts=layouts,
        peers=peers,
        reps=reps,
        rounds=rounds,
        warmup=warmup,
        min_run_time=args.min_run_time,
        threads=threads,
        log=log,
    )
    description = (
        f"{WIDTH}x{WIDTH} fp32 tensors, {threads} torch thread(s); per implementation "
        f"{warmup} warm-up calls, then at least {reps} calls timed one by one with "
        f"time.perf_counter, over {rounds} interleaved rounds (and at least "
        f"{args.min_run_time:g} s in all); median and p10/p90 in µs; 'vs lerp' is the median "
        f"over {LERP}'s on the same layout. An empty call timed the same way: {floor:.2f} µs."
    )
    settings = {
        "width": WIDTH,
        "threads": threads,
        "reps": reps,
        "rounds": rounds,
        "warmup": warmup,
        "min_run_time": args.min_run_time,
        "timer_floor_us": floor,
        "description": description,
    }
    write_files(args.out, machine, rows, "belay-kernels bench " + " ".join(raw_argv), settings)
    print(header(machine))
    print(f"step overhead: {description}")
    print(format_table(rows))
    log(f"wrote overhead.json, overhead.md to {args.out}/")
    return 0

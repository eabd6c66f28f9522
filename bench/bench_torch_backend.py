"""The torch backend (belay_kernels/backend/torch.py) against bare torch ops of the same bytes,
the reference backend, timm's ModelEmaV3 on ResNet-50, and (with --inductor) the inductor
backend against the cpp backend. One process measures everything at 1 thread and at 2;
each round calls every case once, in turn (A/B interleaved on a shared machine), and the
median of the rounds is reported in ms. Writes bench/results/torch-backend.json.

    OMP_NUM_THREADS=2 python bench/bench_torch_backend.py [--numel N] [--rounds R] [--inductor]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from belay_kernels import _backends, ops

RESULTS = Path(__file__).resolve().parent / "results" / "torch-backend.json"
DECAY, ALPHA, BETA, COUNT = 0.999, 0.001, 0.01, 7

# (case, baseline, at least this fast relative to the baseline): time(case) / time(baseline)
# at most ``limit``, or for a "x faster" target time(baseline) / time(case) at least ``limit``
TARGETS = [
    ("flat torch ema skip", "flat bare lerp_", "within", 2.0),
    ("flat torch swa skip", "flat bare lerp_", "within", 2.5),
    ("flat torch two_point", "flat bare lerp_", "within", 2.5),
    ("flat torch swap", "flat bare copy_ x2", "within", 2.5),
    ("flat reference belay skip", "flat torch belay skip", "faster", 1.5),
    ("resnet50 timm ModelEmaV3", "resnet50 torch ema propagate", "faster", 0.95),
    ("resnet50 timm ModelEmaV3", "resnet50 torch ema skip", "faster", 0.6),
]


def flat_cases(n: int, with_reference: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(n, generator=gen) for _ in range(3))
    nan_b = b.clone()
    nan_b[:: 1 << 20] = float("nan")  # 64 NaNs: the skip must keep elements
    torch_ = {"backend": "torch"}
    cases = {
        "flat bare lerp_": lambda: a.lerp_(b, 1 - DECAY),
        "flat bare copy_": lambda: a.copy_(b),
        "flat bare copy_ x2": lambda: (a.copy_(b), b.copy_(a)),
        "flat torch ema propagate": lambda: ops.ema_update_(
            a, b, decay=DECAY, nonfinite="propagate", **torch_
        ),
        "flat torch ema skip": lambda: ops.ema_update_(a, b, decay=DECAY, **torch_),
        "flat torch ema skip, NaN weights": lambda: ops.ema_update_(
            a, nan_b, decay=DECAY, **torch_
        ),
        "flat torch swa skip": lambda: ops.swa_update_(a, b, count=COUNT, **torch_),
        "flat torch belay skip": lambda: ops.belay_step_(a, b, alpha=ALPHA, beta=BETA, **torch_),
        "flat torch two_point": lambda: ops.two_point_average(b, c, out=a, **torch_),
        "flat torch swap": lambda: ops.swap_(a, b, **torch_),
    }
    if with_reference:
        cases["flat reference belay skip"] = lambda: ops.belay_step_(
            a, b, alpha=ALPHA, beta=BETA, backend="reference"
        )
    return cases


def resnet50_cases() -> dict:
    from belay_kernels.averagers import EMA
    from belay_kernels.benchmark.architectures import build
    from belay_kernels.benchmark.peers import timm_model_ema_v3

    model = build("resnet50", torch.float32, torch.device("cpu"))
    with torch.no_grad():  # no zeros: every parameter and float buffer random
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t))
    skip = EMA(model, decay=DECAY, backend="torch")
    propagate = EMA(model, decay=DECAY, backend="torch", nonfinite="propagate")
    return {
        "resnet50 timm ModelEmaV3": timm_model_ema_v3("ema", model, torch.float32),
        "resnet50 torch ema propagate": propagate.step,
        "resnet50 torch ema skip": skip.step,
    }


def inductor_cases(n: int) -> dict:
    """EMA, BELAY and two-point on the cpp and the inductor backend (compiled at warm-up)."""
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(n, generator=gen) for _ in range(3))
    cases = {}
    for backend in ("cpp", "inductor"):
        on = {"backend": backend}
        cases[f"flat {backend} ema skip"] = lambda on=on: ops.ema_update_(a, b, decay=DECAY, **on)
        cases[f"flat {backend} belay skip"] = lambda on=on: ops.belay_step_(
            a, b, alpha=ALPHA, beta=BETA, **on
        )
        cases[f"flat {backend} two_point"] = lambda on=on: ops.two_point_average(b, c, out=a, **on)
    return cases


def measure(cases: dict, rounds: int) -> dict[str, float]:
    for fn in cases.values():  # warm-up (and compile)
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: round(sorted(v)[len(v) // 2] * 1e3, 2) for name, v in times.items()}


def verdicts(ms: dict[str, float]) -> list[dict]:
    out = []
    for case, baseline, kind, limit in TARGETS:
        if case not in ms or baseline not in ms:
            continue
        ratio = ms[case] / ms[baseline]
        met = ratio <= limit if kind == "within" else ratio >= limit
        out.append(
            {
                "case": case,
                "baseline": baseline,
                "ratio": round(ratio, 2),
                "target": f"{'<=' if kind == 'within' else '>='} {limit}",
                "met": met,
            }
        )
    return out


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=1 << 26)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--inductor",
        action="store_true",
        help="also the inductor backend vs cpp (needs BELAY_KERNELS_COMPILE=1)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument("--no-model", action="store_true", help="skip ResNet-50")
    args = parser.parse_args()
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "numel": args.numel,
        "rounds": args.rounds,
        "load_before": load(),
        "backends": {},
        "threads": {},
    }
    cases = flat_cases(args.numel, not args.no_reference)
    if not args.no_model:
        cases.update(resnet50_cases())
    if args.inductor:
        cases.update(inductor_cases(args.numel))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = measure(cases, args.rounds)
        result["threads"][str(threads)] = {"ms": ms, "targets": verdicts(ms)}
        print(threads, json.dumps(ms, indent=1), flush=True)
        for v in result["threads"][str(threads)]["targets"]:
            print(" ", v)
    result["load_after"] = load()
    result["backends"] = {
        k: v for k, v in _backends.backends().items() if k in ("torch", "cpp", "inductor")
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", RESULTS)


if __name__ == "__main__":
    main()

"""The torch backend (fast_torch) against a bare lerp_ and the reference, on one flat fp32
buffer, at 1 and 2 threads; each round calls every case once, in turn (A/B interleaved on
a shared machine), and the median of the rounds is printed in ms.

    python bench/bench_torch_backend.py [numel] [rounds]
"""

import sys
import time

import torch

from belay_kernels import ops


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 26
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    a, b = torch.rand(n), torch.rand(n)
    cases = {
        "bare lerp_": lambda: a.lerp_(b, 0.001),
        "torch ema skip": lambda: ops.ema_update_(a, b, decay=0.999, backend="torch"),
        "torch belay skip": lambda: ops.belay_step_(a, b, alpha=0.001, beta=0.01, backend="torch"),
        "reference belay skip": lambda: ops.belay_step_(
            a, b, alpha=0.001, beta=0.01, backend="reference"),
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for fn in cases.values():
            fn()
        times = {k: [] for k in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
        print(threads, {k: round(sorted(v)[len(v) // 2] * 1e3, 1) for k, v in times.items()})


if __name__ == "__main__":
    main()

"""``belay-kernels demo``: train a small classifier on scikit-learn's bundled digits with
no averaging, EMA, SWA and BELAY, and print accuracy and the averaging's cost per step,
beside the cost of one ``torch._foreach_lerp_`` over the same model's parameters.

Everything runs on the CPU in well under a minute; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from . import EMA, SWA, Belay, backends


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# name -> how to build the averager for a freshly made model (None: no averaging)
METHODS = {
    "none": None,
    "EMA": lambda m, steps: EMA(m, decay=0.99),
    "SWA": lambda m, steps: SWA(m, start=steps // 2, every=5),
    "BELAY": lambda m, steps: Belay(m, alpha=0.01, beta=0.05),
}


# the rate of the timed torch._foreach_lerp_ (EMA's, 1 - decay); its value does not change the time
LERP_WEIGHT = 0.01


def run(method: str, epochs: int, lr: float, seed: int, data) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batch = 32
    steps = epochs * ((len(x_tr) + batch - 1) // batch)
    build = METHODS[method]
    averager = build(model, steps) if build else None
    # the yardstick: one torch._foreach_lerp_ of a shadow list towards the parameters
    weights = [p.detach() for p in model.parameters()]
    shadows = [w.clone() for w in weights]
    g = torch.Generator().manual_seed(seed)
    step_times, lerp_times = [], []
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if averager is not None:
                updates, start = averager.num_updates, time.perf_counter()
                averager.step()
                if averager.num_updates > updates:  # time the steps that update
                    step_times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    torch._foreach_lerp_(shadows, weights, LERP_WEIGHT)
                    lerp_times.append(time.perf_counter() - start)
    row = {
        "method": method,
        "live": accuracy(model, x_te, y_te),
        "averaged": None,
        "us_per_step": None,
        "lerp_us": None,
    }
    if averager is not None:
        with averager.averaged():
            row["averaged"] = accuracy(model, x_te, y_te)
        row["us_per_step"] = statistics.median(step_times) * 1e6
        row["lerp_us"] = statistics.median(lerp_times) * 1e6
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="belay-kernels demo",
        description="Train a small classifier (an MLP on scikit-learn's bundled digits) once "
        "with no averaging and once each with EMA, SWA and BELAY, and print the test accuracy "
        "of the live and the averaged weights, with the averaging's time per update and, "
        "beside it, the time of one torch._foreach_lerp_ over the same model's parameters "
        "(timed the same way, right after each update). Runs on the CPU in under a minute, "
        "downloads nothing and writes no files.",
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="passes over the training set (default: %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.2,
        help="SGD learning rate, deliberately "
        "high so that the live weights are noisy (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="runs per method, each with its own "
        "seed and data split; the table shows mean ± std (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    # The model is tiny: extra threads only add synchronisation, and make timings noisier.
    torch.set_num_threads(1)

    print("backends:", ", ".join(f"{k}: {v}" for k, v in backends().items()))
    print(
        f"digits (sklearn, 1797 images), MLP 64-128-128-10, SGD lr={args.lr} momentum=0.9, "
        f"{args.epochs} epochs, {args.seeds} seeds\n"
    )
    print(
        f"{'method':8s} {'live acc':>16s} {'averaged acc':>16s} {'averaging / update':>18s} "
        f"{'_foreach_lerp_':>14s}"
    )
    for method in METHODS:
        rows = [
            run(method, args.epochs, args.lr, seed, load_digits_split(seed))
            for seed in range(args.seeds)
        ]
        live = _mean_std([r["live"] * 100 for r in rows])
        avg = (
            _mean_std([r["averaged"] * 100 for r in rows])
            if rows[0]["averaged"] is not None
            else "-"
        )
        cost, lerp = _median_us(rows, "us_per_step"), _median_us(rows, "lerp_us")
        print(f"{method:8s} {live:>16s} {avg:>16s} {cost:>18s} {lerp:>14s}")
    return 0


def _median_us(rows: list[dict], key: str) -> str:
    return f"{statistics.median(r[key] for r in rows):.1f} us" if rows[0][key] else "-"


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}%"

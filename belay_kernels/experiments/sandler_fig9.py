"""Sandler et al., Fig. 9: fast and slow degrees of freedom.

``u <- (I - lr Omega) u + lr xi`` with diagonal Omega: 1 on the fast coordinates, 0.015 on
the slow ones; loss ``u^T Omega u / 2``. Three runs: lr0 = 0.05, lr1 = 0.02, and lr0 with
an EMA of time constant 450 steps (the library's EMA, decay 1 - 1/450). Claim: the EMA
lowers the stationary loss as the smaller learning rate would, without slowing convergence
on the slow coordinates.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..averagers import EMA
from ..theory import ema_variance_factor, sgd_stationary_variance
from ..threads import torch_threads
from ._common import (
    SEEDS,
    Result,
    generator,
    markdown_table,
    mean_std,
    parameter,
    write_outputs,
)

NAME = "sandler-fig9"
LR0, LR1, FAST, SLOW, TAU = 0.05, 0.02, 1.0, 0.015, 450
N_FAST = N_SLOW = 100
START = 10.0  # every coordinate starts here: slow initial loss ~ 60x its stationary value
RUNS = (f"lr0={LR0}", f"lr1={LR1}", f"lr0={LR0} + EMA({TAU} steps)")


def predicted_stationary_loss(lr, decay=None):
    """(fast, slow) stationary loss from S_lambda (and eq. 19 for the EMA)."""
    out = []
    for kappa, n in ((FAST, N_FAST), (SLOW, N_SLOW)):
        var = sgd_stationary_variance(lr, kappa)
        if decay is not None:
            var = var * ema_variance_factor(decay, lr, kappa)
        out.append(0.5 * kappa * var * n)
    return out


def steps_to_reach(curve, level, window=200):
    """First step where the moving average of ``curve`` is within 10% of ``level``."""
    smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
    hits = np.nonzero(smooth <= 1.1 * level)[0]
    return int(hits[0] + window) if hits.size else -1


def run(quick: bool, out_dir) -> Result:
    steps = 12000 if quick else 25000
    tail = steps // 4  # stationary values are averaged over the last quarter
    seeds = len(SEEDS)
    kappa = torch.cat([torch.full((N_FAST,), FAST), torch.full((N_SLOW,), SLOW)]).double()
    lr = torch.tensor([LR0] * seeds + [LR1] * seeds, dtype=torch.float64).unsqueeze(1)
    with torch_threads():
        gen = generator(0)
        u = parameter(torch.full((2 * seeds, N_FAST + N_SLOW), START, dtype=torch.float64))
        ema = EMA([u], decay=1.0 - 1.0 / TAU)
        weights = torch.cat([0.5 * kappa[:N_FAST], torch.zeros(N_SLOW, dtype=torch.float64)])
        part_weights = torch.stack([weights, 0.5 * kappa - weights], dim=1)  # (coords, 2)
        history = torch.empty(steps, 3 * seeds, 2, dtype=torch.float64)
        for step in range(steps):
            noise = torch.randn(u.shape, generator=gen, dtype=torch.float64)
            u.data.sub_(lr * (kappa * u.data - noise))
            ema.step()
            rows = torch.cat([u.data, ema.shadow_params()[0][:seeds]])
            torch.mm(rows.pow(2), part_weights, out=history[step])
    # -> run, (fast, slow), seed, step
    history = history.reshape(steps, 3, seeds, 2).permute(1, 3, 2, 0).numpy()

    total = history.sum(axis=1)  # run, seed, step
    stationary = total[:, :, -tail:].mean(-1)  # run, seed
    parts = history[:, :, :, -tail:].mean(-1)  # run, part, seed
    reach = np.array(
        [[steps_to_reach(total[r, s], stationary[r, s]) for s in range(seeds)] for r in range(3)]
    )
    reach_slow = np.array(
        [[steps_to_reach(history[r, 1, s], parts[r, 1, s]) for s in range(seeds)] for r in range(3)]
    )
    predicted = [
        predicted_stationary_loss(LR0),
        predicted_stationary_loss(LR1),
        predicted_stationary_loss(LR0, 1.0 - 1.0 / TAU),
    ]
    rows = []
    for r, name in enumerate(RUNS):
        rows.append(
            [
                name,
                mean_std(stationary[r], "{:.3f}"),
                f"{sum(predicted[r]):.3f}",
                mean_std(parts[r, 0], "{:.3f}"),
                mean_std(parts[r, 1], "{:.3f}"),
                mean_std(reach[r], "{:.0f}"),
                mean_std(reach_slow[r], "{:.0f}"),
            ]
        )
    headers = [
        "run",
        "stationary loss",
        "predicted (S_lambda, eq. 19)",
        "fast part",
        "slow part",
        "steps to within 10% (total)",
        "steps to within 10% (slow part)",
    ]
    table = markdown_table(headers, rows)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
    t = np.arange(1, steps + 1)
    for ax, (title, data) in zip(
        axes, (("total loss", total), ("fast part", history[:, 0]), ("slow part", history[:, 1]))
    ):
        for r, name in enumerate(RUNS):
            ax.plot(t, data[r].mean(0), lw=1, label=name)
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel=r"loss $u^T\Omega u/2$ (mean of 5 seeds)",
            title=f"{title} ({N_FAST} fast, {N_SLOW} slow coordinates)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    intro = f"""Fast (Omega = {FAST}) and slow (Omega = {SLOW}) coordinates, {N_FAST} each, all starting at
u = {START}; xi ~ N(0, I); {steps} steps; stationary values averaged over the last {tail} steps;
5 seeds. "Steps to within 10%": first step where the 200-step moving average of that seed's
loss is within 10% of its own stationary value."""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    checks = {
        "stationary": {name: float(stationary[r].mean()) for r, name in enumerate(RUNS)},
        "fast": {name: float(parts[r, 0].mean()) for r, name in enumerate(RUNS)},
        "reach": {name: float(reach[r].mean()) for r, name in enumerate(RUNS)},
        "reach_slow": {name: float(reach_slow[r].mean()) for r, name in enumerate(RUNS)},
    }
    return Result(NAME, table, checks, files)

"""Sandler et al., Table 1 and Lemma 2: averaging the last k iterates equals running SGD
with the equivalent learning-rate schedule, when each batch's gradient is constant.

Part A (the lemma's assumption): linear per-batch losses, gradient ``g_t`` independent of
theta. From ``theta_{t1}`` a side-trip re-runs the same batches with
``lr * equivalent_lr_schedule(method, k)``; it must land on the average read from SWA,
TwoPoint and EMA at ``t2 = t1 + k``. For an EMA started long before ``t1`` the mismatch
must be exactly ``decay^k (shadow_{t1} - theta_{t1})``.

Part B (assumption relaxed): the quadratic of eq. 5, whose batch gradients depend on
theta. We measure how far the average and the side-trip drift apart, and their losses.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..averagers import EMA, SWA, TwoPoint
from ..theory import equivalent_lr_schedule
from ..threads import torch_threads
from ._common import (
    SEEDS,
    Result,
    averaged_values,
    generator,
    markdown_table,
    mean_std,
    parameter,
    write_outputs,
)
from ._models import LinearRegressionBatches, sgd_step_

NAME = "sandler-table1"
LR = 0.05
DECAY = 0.99  # EMA, delta = 0.01: the lemma's k >> 1/delta means k >> 100
METHOD_LABELS = {"swa": "SWA", "two_point": "two-point", "ema": "EMA (from t1)"}


def _window_run(gradient_fn, theta, batches, windows, decay, ema_history):
    """Continue the main trajectory ``theta`` (now at ``t1``) over ``max(windows)`` batches
    with fresh averagers; return {method: {k: average at t1 + k}}."""
    swa = SWA([theta])
    ema_fresh = EMA([theta], decay=decay)
    # TwoPoint retakes its snapshot on the step() that makes it ``gap`` old, so the oldest
    # snapshot it shows is gap - 1 steps old: gap = k + 1 averages theta_{t1} and theta_{t2}
    two_points = {k: TwoPoint([theta], gap=k + 1) for k in windows}
    read = {"swa": {}, "two_point": {}, "ema": {}, "ema_long": {}}
    for step, batch in enumerate(batches, start=1):
        sgd_step_(theta.data, gradient_fn(batch, theta.data), LR)
        for averager in (swa, ema_fresh, ema_history, *two_points.values()):
            averager.step()
        if step in windows:
            read["swa"][step] = averaged_values(swa, [theta])[0]
            read["ema"][step] = averaged_values(ema_fresh, [theta])[0]
            read["ema_long"][step] = averaged_values(ema_history, [theta])[0]
            assert two_points[step].snapshot_age == step
            read["two_point"][step] = averaged_values(two_points[step], [theta])[0]
    return read


def _side_trip(gradient_fn, theta0, batches, multipliers):
    theta = theta0.clone()
    for batch, m in zip(batches, multipliers.tolist()):
        sgd_step_(theta, gradient_fn(batch, theta), LR * m)
    return theta


def _relative(a, b, scale):
    return ((a - b).norm(dim=-1) / scale.norm(dim=-1)).numpy()


def _experiment(gradient_fn, sample_batch, theta_init, windows, burn_in, gen):
    """Burn in with an EMA, then compare each averager with its side-trip per window."""
    theta = parameter(theta_init)
    ema_history = EMA([theta], decay=DECAY)
    for _ in range(burn_in):
        sgd_step_(theta.data, gradient_fn(sample_batch(gen), theta.data), LR)
        ema_history.step()
    theta_t1 = theta.detach().clone()
    shadow_t1 = ema_history.shadow_params()[0].detach().clone()
    batches = [sample_batch(gen) for _ in range(max(windows))]
    read = _window_run(gradient_fn, theta, batches, windows, DECAY, ema_history)
    out = {}
    for method in ("swa", "two_point", "ema"):
        for k in windows:
            side = _side_trip(
                gradient_fn, theta_t1, batches[:k], equivalent_lr_schedule(method, k, decay=DECAY)
            )
            avg = read[method][k]
            out[method, k] = dict(
                error=_relative(avg, side, avg - theta_t1),
                loss_ratio=(side.norm(dim=-1) ** 2 / avg.norm(dim=-1) ** 2).numpy(),
            )
    for k in windows:
        side = _side_trip(
            gradient_fn, theta_t1, batches[:k], equivalent_lr_schedule("ema", k, decay=DECAY)
        )
        avg = read["ema_long"][k]
        predicted = side + DECAY**k * (shadow_t1 - theta_t1)
        out["ema_long", k] = dict(
            error=_relative(avg, side, avg - theta_t1),
            predicted_error=_relative(predicted, side, avg - theta_t1),
            residual=_relative(avg, predicted, avg - theta_t1),
        )
    return out


def run(quick: bool, out_dir) -> Result:
    windows = (10, 30, 100, 300) if quick else (10, 30, 100, 300, 1000)
    burn_in = 300 if quick else 1000
    dim, runs = 20, len(SEEDS)
    with torch_threads():
        gen = generator(0)
        # rows = seeds; one generator drives all rows, seeded once
        constant = _experiment(
            lambda g, theta: g,
            lambda gen: torch.randn(runs, dim, generator=gen, dtype=torch.float64),
            torch.randn(runs, dim, generator=gen, dtype=torch.float64),
            windows,
            burn_in,
            gen,
        )
        model = LinearRegressionBatches(dim=dim, batch_size=4)
        quadratic = _experiment(
            lambda batch, theta: batch.gradient(theta),
            lambda gen: model.sample(runs, gen),
            torch.randn(runs, dim, generator=gen, dtype=torch.float64),
            windows,
            burn_in,
            gen,
        )

    rows = []
    for k in windows:
        row = [k]
        for method in ("swa", "two_point", "ema"):
            row.append(f"{constant[method, k]['error'].max():.1e}")
        long = constant["ema_long", k]
        row += [mean_std(long["error"], "{:.2e}"), f"{long['residual'].max():.1e}"]
        for method in ("swa", "two_point", "ema"):
            row.append(mean_std(quadratic[method, k]["error"], "{:.2f}"))
        rows.append(row)
    headers = [
        "k",
        "A: SWA max rel. err",
        "A: two-point",
        "A: EMA from t1",
        "A: EMA from t0 rel. err",
        "A: EMA t0 minus predicted term",
        "B: SWA rel. drift",
        "B: two-point",
        "B: EMA from t1",
    ]
    table = markdown_table(headers, rows)
    loss_rows = [
        [k]
        + [mean_std(quadratic[m, k]["loss_ratio"], "{:.2f}") for m in ("swa", "two_point", "ema")]
        for k in windows
    ]
    loss_table = markdown_table(["k", "SWA", "two-point", "EMA (from t1)"], loss_rows)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ks = np.array(windows)
    for method, marker in (("swa", "o"), ("two_point", "s"), ("ema", "^")):
        ax.plot(
            ks,
            [max(constant[method, k]["error"].max(), 1e-18) for k in windows],
            marker=marker,
            label=METHOD_LABELS[method],
        )
    ax.plot(
        ks,
        [constant["ema_long", k]["error"].mean() for k in windows],
        "v-",
        label="EMA from t0 (measured)",
    )
    ax.plot(
        ks,
        [constant["ema_long", k]["predicted_error"].mean() for k in windows],
        "k--",
        label=r"predicted $decay^k\,\|s_{t1}-\theta_{t1}\|$",
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="window k (steps)",
        ylabel=r"$\|\bar\theta - \theta_{side}\| / \|\bar\theta - \theta_{t1}\|$",
        title="A: constant batch gradients (Lemma 2)",
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    for method, marker in (("swa", "o"), ("two_point", "s"), ("ema", "^")):
        err = np.array([quadratic[method, k]["error"] for k in windows])
        ax.errorbar(
            ks, err.mean(1), err.std(1), marker=marker, capsize=3, label=METHOD_LABELS[method]
        )
    ax.set(
        xscale="log",
        xlabel="window k (steps)",
        ylabel="relative drift (mean ± std, 5 seeds)",
        title=f"B: quadratic of eq. 5, lr={LR}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()

    intro = f"""Lemma 2 of Sandler et al. with the library's SWA, TwoPoint and EMA (decay {DECAY}),
SGD lr {LR}, d = 20, 5 runs (seeds). Relative error = ||average - side-trip|| / ||average - theta_t1||.
Part A: per-batch gradients constant (the lemma's assumption), fp64. Part B: the quadratic of
eq. 5 (batch 4), where the gradient depends on theta.

Part B, loss of the side-trip over the loss of the average (||theta||^2 ratio; 1 = same loss):

{loss_table}

Lemma 2 table:"""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    checks = {
        "exact_max_error": {
            m: max(constant[m, k]["error"].max() for k in windows)
            for m in ("swa", "two_point", "ema")
        },
        "ema_long_residual": max(constant["ema_long", k]["residual"].max() for k in windows),
        "ema_long_error": {k: float(constant["ema_long", k]["error"].mean()) for k in windows},
        "quadratic_drift": {
            (m, k): float(quadratic[m, k]["error"].mean())
            for m in ("swa", "two_point", "ema")
            for k in windows
        },
    }
    return Result(NAME, table, checks, files)

"""Sandler et al.: the stationary regime of SGD at a fixed learning rate.

- Lemma 1 / eq. 13: on the eq. 5 model (linear regression batches, E[A^T A] = I) the
  distance to the minimum settles at ``||c|| sqrt(lr / 2)``.
- Eq. 20: on ``u <- (I - lr Omega) u + lr xi`` the two-point average with gap Delta has the
  stationary variance of SGD at ``lr (1 + (1 - lr kappa)^Delta) / 2``, read here as
  ``lr * Var(average) / Var(iterate)`` (the form ``F_Delta = S_lambda (1 + Gamma^Delta)/2``).
- Eq. 19: the EMA's stationary variance, ``S_lambda (C_0 + 2 sum C_d Gamma^d)``.

Averages come from the library's TwoPoint and EMA; each column of the parameter tensor is
an independent coordinate, each row a seed.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..averagers import EMA, TwoPoint
from ..theory import (
    ema_variance_factor,
    sgd_stationary_variance,
    stationary_radius,
    two_point_effective_lr,
)
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

NAME = "sandler-stationary"


def radius_vs_lr(lrs, steps, burn_in, gen):
    """Time-averaged ||theta||^2 after burn-in, per (lr, seed); rows are (lr, seed) pairs."""
    model = LinearRegressionBatches(dim=10, batch_size=8)
    lr_col = torch.tensor(lrs, dtype=torch.float64).repeat_interleave(len(SEEDS)).unsqueeze(1)
    theta = torch.zeros(len(lr_col), model.dim, dtype=torch.float64)
    total = torch.zeros(len(lr_col), dtype=torch.float64)
    for step in range(steps):
        sgd_step_(theta, model.sample(len(lr_col), gen).gradient(theta), lr_col)
        if step >= burn_in:
            total += theta.pow(2).sum(-1)
    measured = (total / (steps - burn_in)).sqrt().reshape(len(lrs), len(SEEDS)).numpy()
    return measured, stationary_radius(model.noise_norm(), lrs)


def averages_on_linear_model(lr, kappas, gaps, decays, steps, width, gen):
    """Run ``u <- (1 - lr kappa) u + lr xi`` from its stationary law with TwoPoint and EMA
    averagers attached; return per-seed variances of iterates, two-point and EMA."""
    kappa = torch.tensor(kappas, dtype=torch.float64).repeat_interleave(width)
    start_std = torch.from_numpy(sgd_stationary_variance(lr, kappa.numpy())).sqrt()
    u = parameter(
        torch.randn(len(SEEDS), len(kappa), generator=gen, dtype=torch.float64) * start_std
    )
    two_points = {gap: TwoPoint([u], gap=gap + 1) for gap in gaps}
    emas = {decay: EMA([u], decay=decay) for decay in decays}

    def per_kappa_variance(x):  # (seeds, kappas); the mean is 0 by symmetry
        return x.pow(2).reshape(len(SEEDS), len(kappas), width).mean(-1).numpy()

    two_point_var, iterate_var = {}, {}
    for step in range(1, steps + 1):
        noise = torch.randn(u.shape, generator=gen, dtype=torch.float64)
        u.data.sub_(lr * (kappa * u.data - noise))
        for averager in (*two_points.values(), *emas.values()):
            averager.step()
        if step in two_points:
            assert two_points[step].snapshot_age == step
            two_point_var[step] = per_kappa_variance(averaged_values(two_points[step], [u])[0])
            iterate_var[step] = per_kappa_variance(u.data)
    ema_var = {d: per_kappa_variance(e.shadow_params()[0]) for d, e in emas.items()}
    return two_point_var, iterate_var, ema_var, per_kappa_variance(u.data)


def run(quick: bool, out_dir) -> Result:
    lrs = [0.01, 0.02, 0.05] if quick else [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    lr, kappas = 0.05, [1.0, 0.1, 0.015]
    gaps = [1, 3, 10, 30, 100, 300] if quick else [1, 3, 10, 30, 100, 300, 1000]
    decays = [0.9, 0.99] if quick else [0.9, 0.99, 0.998]
    width = 1000 if quick else 2000
    with torch_threads():
        gen = generator(0)
        radius, predicted = radius_vs_lr(lrs, 3000 if quick else 12000, 300 if quick else 2000, gen)
        two_point_var, iterate_var, ema_var, final_var = averages_on_linear_model(
            lr, kappas, gaps, decays, max(gaps[-1], 1500 if quick else 4000), width, gen
        )

    ratio = radius / predicted[:, None]
    rows13 = [
        [f"{x:g}", mean_std(r, "{:.4f}"), f"{p:.4f}", mean_std(q, "{:.3f}")]
        for x, r, p, q in zip(lrs, radius, predicted, ratio)
    ]
    table13 = markdown_table(["lr", "measured ||theta||", "||c|| sqrt(lr/2)", "ratio"], rows13)

    measured_lr = {g: lr * two_point_var[g] / iterate_var[g] for g in gaps}  # (seeds, kappas)
    rows20 = []
    for g in gaps:
        row = [g]
        for j, kappa in enumerate(kappas):
            row += [
                mean_std(measured_lr[g][:, j] / lr, "{:.3f}"),
                f"{two_point_effective_lr(lr, kappa, g) / lr:.3f}",
            ]
        rows20.append(row)
    headers20 = ["gap"] + [h for k in kappas for h in (f"kappa={k}: measured lr^/lr", "eq. 20")]
    table20 = markdown_table(headers20, rows20)

    rows19 = []
    for d in decays:
        for j, kappa in enumerate(kappas):
            measured = ema_var[d][:, j] / final_var[:, j].mean()
            rows19.append(
                [d, kappa, mean_std(measured, "{:.4f}"), f"{ema_variance_factor(d, lr, kappa):.4f}"]
            )
    table19 = markdown_table(["EMA decay", "kappa", "measured Var(EMA)/Var(u)", "eq. 19"], rows19)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.errorbar(lrs, radius.mean(1), radius.std(1), fmt="o", capsize=3, label="measured (5 seeds)")
    ax.plot(lrs, predicted, "k--", label=r"eq. 13: $\|c\|\sqrt{\lambda/2}$")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=r"learning rate $\lambda$",
        ylabel=r"stationary $\|\theta\|$",
        title="Lemma 1 / eq. 13 (eq. 5 model, d=10, B=8)",
    )
    ax.legend()
    ax = axes[1]
    fine_gaps = np.logspace(0, np.log10(gaps[-1]), 100)
    for j, kappa in enumerate(kappas):
        vals = np.array([measured_lr[g][:, j] / lr for g in gaps])
        line = ax.errorbar(
            gaps,
            vals.mean(1),
            vals.std(1),
            fmt="o",
            capsize=3,
            label=f"measured, $\\kappa$={kappa}",
        )
        ax.plot(
            fine_gaps,
            two_point_effective_lr(lr, kappa, fine_gaps) / lr,
            "--",
            color=line[0].get_color(),
            label=f"eq. 20, $\\kappa$={kappa}",
        )
    ax.set(
        xscale="log",
        xlabel=r"gap $\Delta$ (steps)",
        ylabel=r"$\hat\lambda / \lambda$",
        title=f"Two-point average, eq. 20 ($\\lambda$={lr})",
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    for j, kappa in enumerate(kappas):
        meas = np.array([ema_var[d][:, j] / final_var[:, j].mean() for d in decays])
        pred = [ema_variance_factor(d, lr, kappa) for d in decays]
        ax.errorbar(pred, meas.mean(1), meas.std(1), fmt="o", capsize=3, label=f"$\\kappa$={kappa}")
    lims = [1e-3, 1.2]
    ax.plot(lims, lims, "k--", label="measured = predicted")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="eq. 19 prediction of Var(EMA)/Var(u)",
        ylabel="measured Var(EMA)/Var(u)",
        title=f"EMA kernel, eq. 19 (decays {decays})",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()

    intro = f"""Eq. 13: SGD on the eq. 5 model (d = 10, batch 8), time-averaged ||theta||^2 after burn-in,
5 seeds.

{table13}

Eq. 19: EMA of the iterates of u <- (1 - lr kappa) u + lr xi, lr = {lr}, {width} independent
coordinates per kappa and seed, started from the stationary law.

{table19}

Eq. 20: the two-point average (TwoPoint, snapshot age = gap), same model; measured
lr^/lr = Var(average) / Var(iterate)."""
    files = write_outputs(NAME, out_dir, fig, table20, intro)
    checks = {
        "eq13_ratio": {x: float(r.mean()) for x, r in zip(lrs, ratio)},
        "eq20_ratio_large_gap": {
            k: float(measured_lr[gaps[-1]][:, j].mean() / two_point_effective_lr(lr, k, gaps[-1]))
            for j, k in enumerate(kappas)
        },
        "eq19_ratio": {
            (d, k): float(
                (ema_var[d][:, j] / final_var[:, j].mean()).mean() / ema_variance_factor(d, lr, k)
            )
            for d in decays
            for j, k in enumerate(kappas)
        },
    }
    return Result(NAME, table20, checks, files)

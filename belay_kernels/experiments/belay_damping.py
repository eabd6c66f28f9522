"""Beyond the poster: the damped two-mass system with velocities
(:class:`belay_kernels.physics.DampedTwoMass`) for damping other than ``c = 2 m``.

1. At ``c = 2 m`` it must equal the library's BELAY bit for bit (same noise, same steps).
2. The noiseless linear map on a quadratic: spectral radius against the damping ratio
   ``zeta = c / (2 m)`` (the same for both masses) for several ``lr h``.
3. Noisy runs on an ill-conditioned quadratic and on Rosenbrock, SGD and Adam, across zeta.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..averagers import Belay
from ..physics import DampedTwoMass, linear_step_matrix
from ..threads import torch_threads
from ._common import SEEDS, Result, generator, markdown_table, mean_std, write_outputs
from ._toy import FUNCTIONS, ROSENBROCK, Arm, run_arms

NAME = "belay-damping"
ALPHA, BETA = 0.01, 0.1
ZETAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
QUADRATIC = FUNCTIONS[-1]  # 0.5 (x^2 + 1000 y^2)
PROBLEMS = (
    (QUADRATIC, "sgd", 1.5e-3),
    (QUADRATIC, "adam", 0.03),
    (ROSENBROCK, "sgd", 1e-3),
    (ROSENBROCK, "adam", 0.03),
)
NOISE = 1.0


LR_CURVATURES = (0.01, 0.1, 1.0, 1.9, 2.5)  # lr h; plain SGD diverges for lr h > 2


def spectral_radius(lr_h, zeta):
    return max(
        abs(
            np.linalg.eigvals(
                linear_step_matrix(lr_h, alpha=ALPHA, beta=BETA, zeta1=zeta, zeta2=zeta)
            )
        )
    )


def make_averager(method, params, alpha, beta):
    """``"none"`` -> None; ``"belay"`` -> the library's Belay; ``"damped:Z"`` -> DampedTwoMass, zeta = Z."""
    if method == "none":
        return None
    if method == "belay":
        return Belay(params, alpha=alpha, beta=beta)
    zeta = float(method.split(":")[1])
    m1 = 1.0  # only alpha, beta and zeta matter: k = 2 beta m1, m2 = k / (2 alpha)
    k = 2 * beta * m1
    m2 = k / (2 * alpha)
    return DampedTwoMass(params, k=k, m1=m1, m2=m2, c1=2 * zeta * m1, c2=2 * zeta * m2)


def _range_text(grid, radius):
    stable = grid[radius < 1]
    return f"{stable.min():.2f} .. {stable.max():.2f}" if stable.size else "none"


def exactness(steps):
    """Run BELAY and DampedTwoMass(c = 2m) on identical noise; max |difference| of the
    final live and shadow weights and of every recorded loss."""
    out = {}
    for function, opt, lr in PROBLEMS:
        runs = [
            run_arms(
                function,
                [Arm(opt, lr, method, ALPHA, BETA)],
                seeds=len(SEEDS),
                steps=steps,
                noise=NOISE,
                gen=generator(7),
                make_averager=make_averager,
            )
            for method in ("belay", "damped:1.0")
        ]
        a, b = runs
        out[function.name, opt] = max(
            (a.final_live - b.final_live).abs().max().item(),
            (a.final_evaluated - b.final_evaluated).abs().max().item(),
            float(np.abs(a.evaluated - b.evaluated).max()),
            float(np.abs(a.live - b.live).max()),
        )
    return out


def run(quick: bool, out_dir) -> Result:
    steps = 300 if quick else 3000
    zetas = (0.5, 1.0, 1.5) if quick else ZETAS
    with torch_threads():
        exact = exactness(100 if quick else 1000)
        sims = {}
        for function, opt, lr in PROBLEMS:
            arms = [Arm(opt, lr, f"damped:{z}", ALPHA, BETA) for z in zetas] + [Arm(opt, lr)]
            sims[function.name, opt, lr] = run_arms(
                function,
                arms,
                seeds=len(SEEDS),
                steps=steps,
                noise=NOISE,
                gen=generator(3),
                make_averager=make_averager,
            )

    rows = []
    for (fname, opt, lr), res in sims.items():
        for i, arm in enumerate(res.arms):
            label = "no averaging" if arm.method == "none" else f"zeta = {arm.method.split(':')[1]}"
            if arm.method == "damped:1.0":
                label += " (BELAY)"
            div = res.diverged[i]
            final_ev = res.evaluated[i, ~div, -1] if not div.all() else np.array([np.nan])
            final_live = res.live[i, ~div, -1] if not div.all() else np.array([np.nan])
            rows.append(
                [
                    fname,
                    f"{opt} {lr:g}",
                    label,
                    mean_std(final_ev, "{:.3g}"),
                    mean_std(final_live, "{:.3g}"),
                    f"{div.sum()}/{len(div)}",
                ]
            )
    table = markdown_table(
        [
            "function",
            "optimizer, lr",
            "damping",
            "final f - f* (shadow)",
            "final f - f* (live)",
            "diverged",
        ],
        rows,
    )
    exact_table = markdown_table(
        ["problem", "max |DampedTwoMass(c=2m) - Belay|"],
        [[f"{f} {o}", f"{v:.1e}"] for (f, o), v in exact.items()],
    )

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    grid = np.linspace(0.02, 2.2, 219)  # zeta = 0 is undamped: radius exactly 1
    radii = {lr_h: np.array([spectral_radius(lr_h, z) for z in grid]) for lr_h in LR_CURVATURES}
    for lr_h, radius in radii.items():
        with np.errstate(divide="ignore"):
            time_constant = np.where(radius < 1, -1.0 / np.log(radius), np.nan)
        ax.plot(grid, time_constant, label=f"lr h = {lr_h:g}")
    ax.axvline(1.0, color="k", ls=":", lw=0.8)
    ax.set(
        xlabel=r"damping ratio $\zeta = c/(2m)$ (1 = BELAY)",
        ylabel=r"steps per e-fold, $-1/\ln\rho$ (gap: unstable)",
        yscale="log",
        ylim=(1, 1e4),
        title=f"noiseless quadratic, alpha={ALPHA}, beta={BETA}",
    )
    ax.legend(fontsize=8)
    for ax, fname in zip(axes[1:], (QUADRATIC.name, ROSENBROCK.name)):
        for (f, opt, lr), res in sims.items():
            if f != fname:
                continue
            for i, arm in enumerate(res.arms):
                if arm.method == "none":
                    continue
                zeta = float(arm.method.split(":")[1])
                if zeta not in (min(zetas), 1.0, max(zetas)):
                    continue
                curve = np.where(res.diverged[i][:, None], np.nan, res.evaluated[i]).mean(0)
                ax.plot(
                    res.record_steps,
                    curve,
                    "-" if opt == "sgd" else "--",
                    lw=1.2,
                    color={min(zetas): "C0", 1.0: "C1", max(zetas): "C2"}[zeta],
                    label=f"{opt.upper()} lr {lr:g}, zeta={zeta:g}"
                    + (" (diverged)" if res.diverged[i].all() else ""),
                )
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="mean f - f* at the shadow (5 seeds)",
            title=f"{fname}, noise {NOISE}",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    stable_table = markdown_table(
        ["lr h", "stable zeta range", "radius at zeta = 1 (BELAY)"],
        [
            [lr_h, _range_text(grid, radii[lr_h]), f"{spectral_radius(lr_h, 1.0):.5f}"]
            for lr_h in LR_CURVATURES
        ],
    )
    intro = f"""alpha = {ALPHA}, beta = {BETA}; zeta = c / (2 m) for both masses; gradient noise N(0, {NOISE}^2);
{steps} steps; 5 seeds. zeta < 1: under-damped (the velocity acts as heavy-ball momentum, coefficient
1 - zeta); zeta > 1: over-damped (negative momentum); the discrete scheme needs 0 < zeta < 2.

Reduction to BELAY at c = 2m (identical noise; final weights, shadows and every recorded loss):

{exact_table}

Noiseless quadratic (first panel): the damping ratios zeta in [0.02, 2.2] for which the step
matrix has spectral radius < 1, per lr h:

{stable_table}

Noisy runs (mean ± std over non-diverged seeds):"""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    stable = {lr_h: [float(z) for z in grid[radius < 1]] for lr_h, radius in radii.items()}
    checks = {
        "exact": exact,
        "stable_zeta_range": {k: (min(v), max(v)) if v else None for k, v in stable.items()},
    }
    return Result(NAME, table, checks, files)

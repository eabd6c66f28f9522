"""SGD near a minimum as an Ornstein-Uhlenbeck process (the SWA blog post).

SGD ``theta <- theta - lr (H theta + eps)``, ``eps ~ N(0, Sigma)``, on a rotated,
anisotropic 2-D quadratic. We compare the stationary covariance of the iterates with the
OU (continuous-time) prediction ``H S + S H = lr Sigma`` and the exact discrete one, then
measure how far from the centre the iterates, the library's SWA and its EMA sit.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Ellipse

from ..averagers import EMA, SWA
from ..theory import (
    ou_stationary_covariance,
    sgd_ema_stationary_covariance,
    sgd_stationary_covariance,
    sgd_window_mean_covariance,
)
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

NAME = "ou-swa"
ANGLE = np.pi / 6
ROTATION = np.array([[np.cos(ANGLE), -np.sin(ANGLE)], [np.sin(ANGLE), np.cos(ANGLE)]])
HESSIAN = ROTATION @ np.diag([1.0, 0.1]) @ ROTATION.T
NOISE_COV = np.diag([1.0, 0.5])
LRS = (0.05, 0.5)
DECAY = 0.99


def run(quick: bool, out_dir) -> Result:
    chains = 100 if quick else 400  # independent chains per (lr, seed)
    burn_in, window = (600, 600) if quick else (1500, 3000)
    seeds = len(SEEDS)
    rows = len(LRS) * seeds * chains
    lr = torch.tensor(LRS, dtype=torch.float64).repeat_interleave(seeds * chains).unsqueeze(1)
    hessian = torch.from_numpy(HESSIAN)
    noise_factor = torch.from_numpy(np.linalg.cholesky(NOISE_COV))
    with torch_threads():
        gen = generator(0)
        theta = parameter(torch.zeros(rows, 2, dtype=torch.float64))

        def sgd_step():
            eps = torch.randn(rows, 2, generator=gen, dtype=torch.float64) @ noise_factor.T
            theta.data.sub_(lr * (theta.data @ hessian + eps))  # H is symmetric

        for _ in range(burn_in):
            sgd_step()
        swa, ema = SWA([theta]), EMA([theta], decay=DECAY)
        distance = torch.empty(3, window, rows, dtype=torch.float64)  # iterate, SWA, EMA
        second_moment = torch.zeros(rows, 2, 2, dtype=torch.float64)
        path = []  # one chain, for the picture
        for step in range(window):
            sgd_step()
            swa.step()
            ema.step()
            distance[0, step] = theta.data.norm(dim=-1)
            distance[1, step] = swa.shadow_params()[0].norm(dim=-1)
            distance[2, step] = ema.shadow_params()[0].norm(dim=-1)
            second_moment += theta.data.unsqueeze(-1) * theta.data.unsqueeze(-2)
            path.append([theta.data[0].clone(), swa.shadow_params()[0][0].clone()])
    # per (lr, seed): covariance over chains and time; distances as RMS over chains
    cov = (second_moment / window).reshape(len(LRS), seeds, chains, 2, 2).mean(2).numpy()
    rms = distance.pow(2).reshape(3, window, len(LRS), seeds, chains).mean(-1).sqrt().numpy()

    cov_rows, dist_rows, checks = [], [], {"cov_rel_error": {}, "final_rms": {}}
    for i, x in enumerate(LRS):
        ou = ou_stationary_covariance(HESSIAN, NOISE_COV, x)
        exact = sgd_stationary_covariance(HESSIAN, NOISE_COV, x)
        for (a, b), label in (((0, 0), "S11"), ((0, 1), "S12"), ((1, 1), "S22")):
            cov_rows.append(
                [
                    x,
                    label,
                    mean_std(cov[i, :, a, b], "{:.4f}"),
                    f"{ou[a, b]:.4f}",
                    f"{exact[a, b]:.4f}",
                ]
            )
        checks["cov_rel_error"][x] = dict(
            ou=float(np.linalg.norm(cov[i].mean(0) - ou) / np.linalg.norm(ou)),
            exact=float(np.linalg.norm(cov[i].mean(0) - exact) / np.linalg.norm(exact)),
        )
        predicted = [
            np.trace(exact),
            np.trace(sgd_window_mean_covariance(HESSIAN, NOISE_COV, x, window)),
            np.trace(sgd_ema_stationary_covariance(HESSIAN, NOISE_COV, x, DECAY)),
        ]
        for k, label in enumerate(("iterate", f"SWA over {window} steps", f"EMA decay {DECAY}")):
            dist_rows.append(
                [x, label, mean_std(rms[k, -1, i], "{:.4f}"), f"{np.sqrt(predicted[k]):.4f}"]
            )
        checks["final_rms"][x] = dict(
            zip(("iterate", "swa", "ema"), (float(rms[k, -1, i].mean()) for k in range(3)))
        )
        checks["final_rms"][x]["predicted"] = [float(np.sqrt(p)) for p in predicted]
    cov_table = markdown_table(
        ["lr", "entry", "measured", "OU (continuous)", "exact discrete"], cov_rows
    )
    table = markdown_table(
        ["lr", "point", "RMS distance to centre", "predicted (exact linear)"], dist_rows
    )

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    ax = axes[0]
    x = LRS[0]
    pts = torch.stack([p[0] for p in path]).numpy()
    swa_path = torch.stack([p[1] for p in path]).numpy()
    ax.plot(
        pts[:, 0], pts[:, 1], ".", ms=2, alpha=0.4, color="tab:blue", label=f"SGD iterates (lr={x})"
    )
    ax.plot(
        swa_path[:, 0], swa_path[:, 1], "-", color="tab:orange", lw=1.5, label="SWA running mean"
    )
    ou = ou_stationary_covariance(HESSIAN, NOISE_COV, x)
    values, vectors = np.linalg.eigh(ou)
    for n_std in (1, 2):
        ax.add_patch(
            Ellipse(
                (0, 0),
                *(2 * n_std * np.sqrt(values)),
                fill=False,
                ls="--",
                angle=np.degrees(np.arctan2(vectors[1, 1], vectors[0, 1])) + 90,
                color="k",
                label="OU 1 and 2 std" if n_std == 1 else None,
            )
        )
    ax.plot(0, 0, "k*", ms=12, label="centre (minimum)")
    ax.set(
        xlabel=r"$\theta_1$",
        ylabel=r"$\theta_2$",
        aspect="equal",
        title="one chain after burn-in; OU stationary ellipses",
    )
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    steps = np.arange(1, window + 1)
    for i, x in enumerate(LRS):
        for k, (label, style) in enumerate((("iterate", "-"), ("SWA", "--"), ("EMA", ":"))):
            ax.plot(steps, rms[k, :, i].mean(-1), style, color=f"C{i}", label=f"{label}, lr={x}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="steps since averaging started",
        ylabel="RMS distance to centre (mean of 5 seeds)",
        title=f"distance to the centre ({chains} chains per seed)",
    )
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    intro = f"""H = R diag(1, 0.1) R^T (R: 30 degrees), Sigma = diag(1, 0.5); {chains} chains per lr and
seed, 5 seeds; burn-in {burn_in} steps, then the library's SWA (from the first step after
burn-in) and EMA (decay {DECAY}) for {window} steps. Stationary covariance of the iterates,
averaged over chains and the {window} steps:

{cov_table}

Distance to the centre at the end (RMS over chains; prediction from the exact linear
recursions: stationary covariance, covariance of a {window}-step window mean, joint
(theta, EMA) Lyapunov equation):"""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    return Result(NAME, table, checks, files)

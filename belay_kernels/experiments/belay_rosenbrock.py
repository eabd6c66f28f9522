"""BELAY poster, Fig. 2: Rosenbrock with additive gradient noise, SGD and Adam, across
learning rates from 1e-4 to 0.15. No averaging vs the library's EMA vs BELAY (same alpha,
beta swept) in two forms: the post-step form (``Belay`` stepped after the optimizer, the
library's default) and the poster's exact form (``Belay(form="poster")`` fused with
torch's SGD or Adam, the shadow following the weights from before the step; same noise as
its post-step twin). The loss is taken at the evaluated weights (the shadow for EMA and
BELAY). Claim to check: BELAY is more robust to the learning rate.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..threads import torch_threads
from ._common import SEEDS, Result, generator, markdown_table, mean_std, write_outputs
from ._toy import ROSENBROCK, Arm, run_arms

NAME = "belay-rosenbrock"
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.15)
ALPHA = 0.01
BETAS = (0.01, 0.03, 0.1, 0.3, 0.9)
NOISE = 2.0
DIVERGED_Y = 1e4  # where diverged runs are drawn


def settings():
    return (
        [("none", 0.0, 0.0), ("ema", ALPHA, 0.0)]
        + [("belay", ALPHA, b) for b in BETAS]
        + [("poster", ALPHA, b) for b in BETAS]
    )


def summarize(results, threshold):
    """Per arm: final gap (seeds,), diverged (seeds,), converged (seeds,)."""
    final = results.evaluated[:, :, -1]
    converged = (final < threshold) & ~results.diverged
    return final, results.diverged, converged


def cell(final, diverged, converged):
    if diverged.all():
        return "diverged"
    text = mean_std(final[~diverged], "{:.2g}")
    extra = f", {diverged.sum()} div." if diverged.any() else ""
    return f"{text} ({converged.sum()}/{len(final)} conv.{extra})"


def run(quick: bool, out_dir) -> Result:
    steps = 400 if quick else 3000
    lrs = (1e-4, 1e-2, 0.15) if quick else LRS
    arms = [
        Arm(opt, lr, m, a, b) for opt in ("sgd", "adam") for lr in lrs for m, a, b in settings()
    ]
    with torch_threads():
        results = run_arms(
            ROSENBROCK, arms, seeds=len(SEEDS), steps=steps, noise=NOISE, gen=generator(0)
        )
    final, diverged, converged = summarize(results, ROSENBROCK.threshold)
    labels = [Arm("sgd", 0, m, a, b).label() for m, a, b in settings()]
    per = len(settings())

    rows, robust = [], {}
    for o, opt in enumerate(("sgd", "adam")):
        for j, lr in enumerate(lrs):
            base = (o * len(lrs) + j) * per
            rows.append(
                [opt, f"{lr:g}"]
                + [
                    cell(final[base + s], diverged[base + s], converged[base + s])
                    for s in range(per)
                ]
            )
        for s, label in enumerate(labels):
            idx = [(o * len(lrs) + j) * per + s for j in range(len(lrs))]
            robust[opt, label] = dict(
                converged_lrs=int(sum(converged[i].sum() >= 3 for i in idx)),
                stable_lrs=int(sum(not diverged[i].any() for i in idx)),
            )
    table = markdown_table(["optimizer", "lr"] + labels, rows)
    summary = markdown_table(
        [
            "optimizer",
            "method",
            f"lrs converged (>=3/5 seeds), of {len(lrs)}",
            f"lrs with no divergence, of {len(lrs)}",
        ],
        [
            [o, label, robust[o, label]["converged_lrs"], robust[o, label]["stable_lrs"]]
            for o in ("sgd", "adam")
            for label in labels
        ],
    )

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    methods = [m for m, _, _ in settings()]
    for o, (ax, opt) in enumerate(zip(axes, ("SGD", "Adam"))):
        for s, label in enumerate(labels):
            idx = [(o * len(lrs) + j) * per + s for j in range(len(lrs))]
            med = np.array([np.median(final[i]) if not diverged[i].any() else np.nan for i in idx])
            # a poster-form arm takes its post-step twin's colour, dotted
            color = f"C{s - len(BETAS) if methods[s] == 'poster' else s}"
            style = {"none": "-o", "ema": "-o", "belay": "--.", "poster": ":^"}[methods[s]]
            ax.plot(lrs, med, style, color=color, lw=2 if s < 2 else 1, ms=4, label=label)
            div = [lr for lr, i in zip(lrs, idx) if diverged[i].any()]
            ax.plot(
                div,
                [DIVERGED_Y * (1 + 0.3 * s)] * len(div),
                "x",
                color=color,
                label="diverged (some seed)" if s == 0 else None,
            )
        ax.axhline(ROSENBROCK.threshold, color="gray", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="learning rate",
            title=f"{opt}: Rosenbrock, noise std {NOISE}, {steps} steps",
        )
    axes[0].set_ylabel(
        "final f - f* at evaluated weights (median of 5 seeds)\nx at top: some seed diverged"
    )
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    intro = f"""Rosenbrock from {ROSENBROCK.start}, gradient noise N(0, {NOISE}^2) per coordinate, {steps} steps,
5 seeds. EMA decay = 1 - alpha, alpha = {ALPHA} for EMA and BELAY; BELAY beta swept.
"BELAY": the post-step form (Belay stepped after the optimizer); "BELAY poster": the poster's
exact form, Belay(form="poster") fused with torch.optim.SGD / Adam (shadow <- EMA of the weights
from before the step), on the same gradient noise as its post-step twin. Converged:
final f - f* < {ROSENBROCK.threshold} at the evaluated weights (shadow for EMA and BELAY) and no
divergence (|x| > 100). Cells: mean ± std of the final f - f* over the non-diverged seeds.

Robustness summary:

{summary}

Per learning rate:"""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    return Result(NAME, table, {"robust": robust}, files)

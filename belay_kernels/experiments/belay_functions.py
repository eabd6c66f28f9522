"""BELAY poster, Fig. 3: standard test functions, each method with its best
hyperparameters from a small grid, SGD and Adam, stopped once one method crosses the
convergence threshold.

Steps to threshold: the first recorded step at which the mean over 5 seeds of f - f* at
the evaluated weights is below the function's threshold. The grid search picks, per
(function, optimizer, method), the setting with the fewest steps (ties and
never-crossing settings: lowest final mean f - f*). The same seeds pick and report, as a
small grid search on the poster would.

BELAY runs in two forms: the post-step form (``Belay`` stepped after the optimizer, the
library's default) and the poster's exact form (``Belay(form="poster")`` fused with torch's
SGD or Adam; same noise as its post-step twin). Each form races no averaging and EMA
separately: the post-step race is the comparison as it was before the poster form existed,
the poster race puts the poster form in BELAY's place.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..threads import torch_threads
from ._common import SEEDS, Result, generator, markdown_table, write_outputs
from ._toy import FUNCTIONS, Arm, run_arms

NAME = "belay-functions"
NOISE = 1.0
LRS = {"sgd": (1e-3, 3e-3, 1e-2, 3e-2), "adam": (3e-3, 1e-2, 3e-2, 0.1)}
ALPHAS = (0.01, 0.05)
BETAS = (0.03, 0.1, 0.3)
METHOD_NAMES = {
    "none": "no averaging",
    "ema": "EMA",
    "belay": "BELAY",
    "poster": "BELAY poster",
}
# the methods each form of BELAY races (the poster's stopping rule: the first to cross)
RACES = {"post-step": ("none", "ema", "belay"), "poster": ("none", "ema", "poster")}


def grid(optimizer, lrs=None, alphas=ALPHAS, betas=BETAS):
    lrs = LRS[optimizer] if lrs is None else lrs
    arms = [Arm(optimizer, lr) for lr in lrs]
    arms += [Arm(optimizer, lr, "ema", a) for lr in lrs for a in alphas]
    arms += [Arm(optimizer, lr, "belay", a, b) for lr in lrs for a in alphas for b in betas]
    arms += [Arm(optimizer, lr, "poster", a, b) for lr in lrs for a in alphas for b in betas]
    return arms


def race(best, opt, methods):
    """(the step at which the first of ``methods`` crossed or None, the winners' names)."""
    crossed = [best[opt, m][1] for m in methods if best[opt, m][1] is not None]
    stop = min(crossed) if crossed else None
    winners = [METHOD_NAMES[m] for m in methods if best[opt, m][1] == stop and stop is not None]
    return stop, winners


def steps_to_threshold(mean_gap, record_steps, threshold):
    hits = np.nonzero(mean_gap < threshold)[0]
    return int(record_steps[hits[0]]) if hits.size else None


def best_arms(results, threshold):
    """{(optimizer, method): (arm index, steps or None)} by the rule in the module doc."""
    mean_gap = np.where(results.diverged[:, :, None], np.inf, results.evaluated).mean(1)
    best = {}
    for i, arm in enumerate(results.arms):
        steps = steps_to_threshold(mean_gap[i], results.record_steps, threshold)
        key = (arm.optimizer, arm.method)
        score = (steps if steps is not None else np.inf, mean_gap[i, -1])
        if key not in best or score < best[key][2]:
            best[key] = (i, steps, score)
    return {k: v[:2] for k, v in best.items()}, mean_gap


def run(quick: bool, out_dir) -> Result:
    steps = 300 if quick else 2000
    functions = FUNCTIONS[:3] if quick else FUNCTIONS
    rows, floor_rows, checks, curves = [], [], {}, []
    with torch_threads():
        for f_index, function in enumerate(functions):
            arms = grid("sgd") + grid("adam")
            if quick:
                arms = grid("sgd", (3e-3,), (0.05,), (0.1,)) + grid(
                    "adam", (3e-2,), (0.05,), (0.1,)
                )
            results = run_arms(
                function,
                arms,
                seeds=len(SEEDS),
                steps=steps,
                noise=NOISE,
                gen=generator(f_index),
                record_every=5,
            )
            best, mean_gap = best_arms(results, function.threshold)
            for opt in ("sgd", "adam"):
                stops = {form: race(best, opt, methods) for form, methods in RACES.items()}
                stop_index = {
                    form: (
                        np.searchsorted(results.record_steps, stop)
                        if stop is not None
                        else len(results.record_steps) - 1
                    )
                    for form, (stop, _) in stops.items()
                }
                stop = stops["post-step"][0]
                row = [function.name, opt, stop if stop is not None else f"none by {steps}"]
                for method in METHOD_NAMES:
                    form = "poster" if method == "poster" else "post-step"
                    i, s = best[opt, method]
                    arm = results.arms[i]
                    setting = (
                        f"lr {arm.lr:g}"
                        + ("" if method == "none" else f", a {arm.alpha:g}")
                        + (f", b {arm.beta:g}" if method in ("belay", "poster") else "")
                    )
                    cells = [
                        f"{s if s is not None else '>' + str(steps)} ({setting})",
                        f"{mean_gap[i, stop_index[form]]:.3g}",
                    ]
                    if method == "poster":
                        poster_cells = cells
                    else:
                        row += cells
                    checks[function.name, opt, method] = s
                    curves.append(
                        (
                            function,
                            opt,
                            method,
                            results.record_steps,
                            mean_gap[i],
                            stops[form][0],
                        )
                    )
                tail = len(results.record_steps) // 4  # the noise floor: last quarter
                floor_rows.append(
                    [function.name, opt]
                    + [f"{mean_gap[best[opt, m][0], -tail:].mean():.2g}" for m in METHOD_NAMES]
                )
                winners = stops["post-step"][1]
                row.append(", ".join(winners) if winners else "none")
                poster_stop, poster_winners = stops["poster"]
                row += poster_cells + [
                    poster_stop if poster_stop is not None else f"none by {steps}",
                    ", ".join(poster_winners) if poster_winners else "none",
                ]
                rows.append(row)
    headers = ["function", "optimizer", "stopped at step"]
    for m in ("none", "ema", "belay"):
        headers += [
            f"{METHOD_NAMES[m]}: steps (best setting)",
            f"{METHOD_NAMES[m]}: f - f* at stop",
        ]
    headers.append("first to cross")
    headers += [
        "BELAY poster: steps (best setting)",
        "BELAY poster: f - f* at its race's stop",
        "poster race (BELAY poster in BELAY's place): stopped at step",
        "poster race: first to cross",
    ]
    table = markdown_table(headers, rows)

    floor_table = markdown_table(
        ["function", "optimizer"] + list(METHOD_NAMES.values()), floor_rows
    )
    n = len(functions)
    cols = 4
    fig, axes = plt.subplots(
        (n + cols - 1) // cols,
        cols,
        figsize=(4.2 * cols, 3.6 * ((n + cols - 1) // cols)),
        squeeze=False,
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    for f_index, function in enumerate(functions):
        ax = axes.flat[f_index]
        for function_, opt, method, record_steps, gap, _stop in curves:
            if function_ is not function:
                continue
            color = {"none": "C0", "ema": "C1", "belay": "C2", "poster": "C3"}[method]
            ax.plot(
                record_steps,
                np.maximum(gap, 1e-8),
                "-" if opt == "sgd" else "--",
                color=color,
                lw=1.2,
                label=f"{opt.upper()} {METHOD_NAMES[method]}",
            )
        ax.axhline(function.threshold, color="gray", ls=":", lw=0.8)
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="mean f - f* (evaluated weights)",
            title=function.name,
        )
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    intro = f"""Additive gradient noise N(0, {NOISE}^2), {steps} steps at most, 5 seeds. Grid per method: lr in
{LRS["sgd"]} (SGD) or {LRS["adam"]} (Adam); EMA alpha in {ALPHAS}; BELAY alpha in {ALPHAS},
beta in {BETAS}, in two forms: "BELAY" is the post-step form (Belay stepped after the
optimizer), "BELAY poster" the poster's exact form, Belay(form="poster") fused with
torch.optim.SGD / Adam (the shadow follows the weights from before the step), on the same
gradient noise as its post-step twin. Start points and thresholds on f - f*:
{"; ".join(f"{f.name} from {f.start}, {f.threshold:g}" for f in functions)}.
Each "steps" cell is that method's own first crossing with its best setting ('>N': never);
"f - f* at stop" is its mean gap when the first method crossed (the poster's stopping rule).
Each form of BELAY races no averaging and EMA on its own: "stopped at step" and "first to
cross" are the race with the post-step form; the last two columns the race with the poster
form in its place. The figure shows every best setting's full curve (solid SGD, dashed Adam); the dotted line
is the threshold.

Noise floor after convergence: mean f - f* over the last quarter of the {steps} steps, each
method at its best setting from the grid:

{floor_table}

Steps to the threshold:"""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    return Result(NAME, table, {"steps": checks}, files)

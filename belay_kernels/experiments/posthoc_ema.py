"""Post-hoc EMA (EDM2, Karras et al. 2024) on scikit-learn's bundled 8x8 digits.

The MLP of ``belay-digits`` trained with plain SGD at a constant learning rate, so the
live weights stay noisy and the EMA length matters. ``PostHocEMA(sigma_rels=(0.05,
0.10))`` snapshots its two profiles once per epoch (in fp16, the default, and, from a
second averager on the same run, in fp32); after training every ``sigma_rel`` of a grid
is reconstructed from the snapshots alone and evaluated, at three training times, as in
EDM2's figures of FID against ``sigma_rel``. A few ``sigma_rel`` values are also tracked
directly with ``PowerEMA`` during the same run: the control for the reconstruction.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from .. import posthoc
from ..posthoc import PostHocEMA, PowerEMA
from ..threads import torch_threads
from ._common import SEEDS, Result, markdown_table, mean_std, write_outputs
from .belay_digits import BATCH, load_data, make_model, sgd_epoch

NAME = "posthoc-ema"
LR = 0.1
TRACKED = (0.05, 0.10)
CONTROLS = (0.03, 0.07, 0.20)  # short, inside and beyond the tracked pair
SNAPSHOT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    """(test accuracy in %, test cross-entropy)."""
    logits = model(x)
    return (
        100 * (logits.argmax(-1) == y).float().mean().item(),
        nn.functional.cross_entropy(logits, y).item(),
    )


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def train(seed: int, epochs: int, data, folders: dict):
    """One SGD run with a PostHocEMA per snapshot dtype and the direct controls. Returns
    (steps per epoch, the live weights, {sigma_rel: directly tracked weights})."""
    x_train, y_train, _, _ = data
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps_per_epoch = -(-len(x_train) // BATCH)
    phemas = [
        PostHocEMA(
            model,
            sigma_rels=TRACKED,
            snapshot_every=steps_per_epoch,
            snapshot_dir=folders[name],
            snapshot_dtype=dtype,
        )
        for name, dtype in SNAPSHOT_DTYPES.items()
    ]
    controls = {s: PowerEMA(model, sigma_rel=s) for s in CONTROLS}
    order = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        sgd_epoch(model, optimizer, x_train, y_train, order, (*phemas, *controls.values()))
    for phema in phemas:
        phema.wait()  # the last snapshot is on disk before reconstruct() reads the folder
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    direct = {}
    for s, control in controls.items():
        with control.averaged():
            direct[s] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return steps_per_epoch, live, direct


def evaluated(seed: int, weights: dict, data) -> tuple[float, float]:
    model = make_model(seed)
    model.load_state_dict(weights)
    return evaluate(model, data[2], data[3])


def run(quick: bool, out_dir) -> Result:
    epochs = 6 if quick else 30
    seeds = SEEDS[:1] if quick else SEEDS
    grid = np.round(np.linspace(0.02, 0.25, 6 if quick else 24), 4)
    times = (epochs // 3, 2 * epochs // 3, epochs)  # in epochs
    data = load_data()
    acc = np.zeros((len(seeds), len(times), len(grid)))
    loss = np.zeros_like(acc)
    live_acc, live_loss, tracked_acc = [], [], {s: [] for s in TRACKED}
    control = {(s, kind): [] for s in CONTROLS for kind in ("direct", *SNAPSHOT_DTYPES)}
    with torch_threads(), tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(seeds):
            folders = {name: Path(tmp) / f"seed{seed}-{name}" for name in SNAPSHOT_DTYPES}
            steps_per_epoch, live, direct = train(seed, epochs, data, folders)
            a, lo = evaluated(seed, live, data)
            live_acc.append(a)
            live_loss.append(lo)
            for j, epoch in enumerate(times):
                for k, s in enumerate(grid):
                    weights = posthoc.reconstruct(
                        folders["fp16"], sigma_rel=float(s), step=epoch * steps_per_epoch
                    )
                    acc[i, j, k], loss[i, j, k] = evaluated(seed, weights, data)
            for s in TRACKED:  # the tracked profiles themselves, as saved at the end
                tracked_acc[s].append(
                    evaluated(seed, posthoc.reconstruct(folders["fp16"], sigma_rel=s), data)[0]
                )
            live_flat = flat(live.values())
            for s in CONTROLS:
                want = flat(direct[s].values())
                control[s, "direct"].append((*evaluated(seed, direct[s], data), 0.0, 0.0))
                for name in SNAPSHOT_DTYPES:
                    got = posthoc.reconstruct(folders[name], sigma_rel=s)
                    error = (flat(got.values()) - want).norm().item()
                    control[s, name].append(
                        (
                            *evaluated(seed, got, data),
                            error / (want - live_flat).norm().item(),
                            error / want.norm().item(),
                        )
                    )
    control = {key: np.array(v) for key, v in control.items()}  # (seeds, 4)

    end = acc[:, -1]  # (seeds, grid)
    best = grid[end.mean(0).argmax()]
    rows = [
        [f"{s:.2f}", mean_std(end[:, k], "{:.2f}"), mean_std(loss[:, -1, k], "{:.4f}")]
        for k, s in enumerate(grid)
    ]
    grid_table = markdown_table(
        [
            "sigma_rel (reconstructed, fp16 snapshots)",
            f"test acc. % after {epochs} epochs",
            "test cross-entropy",
        ],
        rows,
    )
    control_rows = []
    for s in CONTROLS:
        d = control[s, "direct"]
        control_rows.append(
            [
                f"{s:.2f}",
                "PowerEMA, tracked directly",
                mean_std(d[:, 0], "{:.2f}"),
                mean_std(d[:, 1], "{:.4f}"),
                "",
                "",
            ]
        )
        for name in SNAPSHOT_DTYPES:
            r = control[s, name]
            control_rows.append(
                [
                    f"{s:.2f}",
                    f"reconstructed ({name} snapshots)",
                    mean_std(r[:, 0], "{:.2f}"),
                    mean_std(r[:, 1], "{:.4f}"),
                    mean_std(r[:, 2], "{:.2g}"),
                    mean_std(r[:, 3], "{:.2g}"),
                ]
            )
    control_table = markdown_table(
        [
            "sigma_rel",
            "weights",
            "test acc. %",
            "test cross-entropy",
            "‖reconstructed − direct‖ / ‖direct − live‖",
            "‖reconstructed − direct‖ / ‖direct‖",
        ],
        control_rows,
    )
    summary = markdown_table(
        ["weights", f"test acc. % after {epochs} epochs"],
        [["live (SGD, no averaging)", mean_std(live_acc, "{:.2f}")]]
        + [
            [f"tracked profile sigma_rel {s:.2f}", mean_std(tracked_acc[s], "{:.2f}")]
            for s in TRACKED
        ]
        + [
            [
                f"best reconstructed sigma_rel ({best:.2f})",
                mean_std(end[:, list(grid).index(best)], "{:.2f}"),
            ]
        ],
    )
    table = "\n\n".join([summary, control_table, grid_table])

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, values, label in (
        (axes[0], acc, "test accuracy (%)"),
        (axes[1], loss, "test cross-entropy"),
    ):
        for j, epoch in enumerate(times):
            m, sd = values[:, j].mean(0), values[:, j].std(0)
            ax.plot(grid, m, "-", color=f"C{j}", label=f"reconstructed, after {epoch} epochs")
            ax.fill_between(grid, m - sd, m + sd, color=f"C{j}", alpha=0.15)
        column = 0 if values is acc else 1
        d = np.array([control[s, "direct"][:, column].mean() for s in CONTROLS])
        ax.plot(
            CONTROLS,
            d,
            "k^",
            ms=8,
            mfc="none",
            label=f"PowerEMA tracked directly, after {epochs} epochs",
        )
        live = np.mean(live_acc if values is acc else live_loss)
        ax.axhline(live, color="gray", ls=":", label=f"live weights, after {epochs} epochs")
        for s in TRACKED:
            ax.axvline(s, color="gray", lw=0.6, ls="--")
        ax.set(xlabel="sigma_rel", ylabel=label)
        ax.legend(fontsize=7)
    axes[0].set_title(
        f"post-hoc EMA from profiles {TRACKED} (dashed), mean ± std over "
        f"{len(seeds)} seed{'s' * (len(seeds) > 1)}",
        fontsize=9,
    )
    fig.tight_layout()
    intro = f"""sklearn digits (1347 train / 450 test, 8x8), MLP 64-64-10, SGD lr {LR} (constant), batch
{BATCH}, {epochs} epochs ({steps_per_epoch} steps each), {len(seeds)} seed{"s" * (len(seeds) > 1)}
(init and batch order per seed). `PostHocEMA(sigma_rels={TRACKED}, snapshot_every={steps_per_epoch})`
writes one snapshot per epoch; `posthoc.reconstruct` rebuilds each sigma_rel from the snapshots
at or before the chosen step. Controls: `PowerEMA(sigma_rel=s)` (fp32 shadow) for s in
{CONTROLS}, tracked during the same run. Distances are over all parameters, in float64."""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    checks = {
        "live_accuracy": float(np.mean(live_acc)),
        "best_sigma_rel": float(best),
        "best_accuracy": float(end.mean(0).max()),
        "control": {
            (s, name): {
                "accuracy_gap": float(np.mean(control[s, name][:, 0] - control[s, "direct"][:, 0])),
                "distance_to_live_fraction": float(control[s, name][:, 2].mean()),
            }
            for s in CONTROLS
            for name in SNAPSHOT_DTYPES
        },
    }
    return Result(NAME, table, checks, files)

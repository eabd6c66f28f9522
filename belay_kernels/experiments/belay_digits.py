"""BELAY poster, Fig. 4, with scikit-learn's bundled 8x8 digits standing in for MNIST.

A small MLP trained with SGD; the library's EMA against ``Belay.from_physics`` at several
shadow masses m2. The model mass sets the learning rate (``eta = 1 / (2 m1)``), and each
EMA has the same rate as the BELAY it is compared with (``decay = 1 - k / (2 m2)``). One
training run per seed carries all the EMAs (an EMA does not change training, so its live
weights are also the no-averaging baseline); each BELAY is its own run, since the spring
pulls the live weights. Test accuracy of the live and averaged weights, every epoch.

BELAY runs in two forms: the post-step form (``Belay.from_physics`` stepped after the SGD
step, the library's default) and the poster's exact form
(``Belay.from_physics(..., form="poster")`` fused with the same ``torch.optim.SGD`` by
:func:`belay_kernels.fuse`, so that the shadow follows the weights from before the step).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from ..averagers import EMA, Belay
from ..fused import fuse
from ..threads import torch_threads
from ._common import SEEDS, Result, markdown_table, mean_std, write_outputs

NAME = "belay-digits"
K, M1 = 0.2, 5.0  # beta = k / (2 m1) = 0.02, eta = 1 / (2 m1) = 0.1
MASSES = (2.0, 10.0, 50.0)  # m2 -> alpha = 0.05, 0.01, 0.002
BATCH = 32


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=0, stratify=y
    )
    as_t = lambda a, dtype: torch.tensor(a, dtype=dtype)
    return (
        as_t(x_train, torch.float32),
        as_t(y_train, torch.long),
        as_t(x_test, torch.float32),
        as_t(y_test, torch.long),
    )


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def sgd_epoch(model, optimizer, x_train, y_train, order, averagers) -> None:
    """One epoch of minibatches of BATCH in the order ``order`` draws; every averager
    steps after each optimizer step."""
    perm = torch.randperm(len(x_train), generator=order)
    for start in range(0, len(perm), BATCH):
        idx = perm[start : start + BATCH]
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for averager in averagers:
            averager.step()


def train(seed, epochs, data, averagers_for):
    """One SGD run; ``averagers_for(model)`` -> {name: averager}. Returns per-epoch
    accuracies {"live": [...], name: [...]} (index 0 = before training). A BELAY of the
    poster's form (at most one) is fused with the SGD step instead of stepped after it."""
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0 / (2.0 * M1))
    averagers = averagers_for(model)
    stepped = dict(averagers)
    for name, averager in averagers.items():
        if isinstance(averager, Belay) and averager.form == "poster":
            optimizer = fuse(optimizer, stepped.pop(name))
    acc = {"live": [accuracy(model, x_test, y_test)]} | {
        n: [acc_] for n, acc_ in ((n, accuracy(model, x_test, y_test)) for n in averagers)
    }
    order = torch.Generator().manual_seed(1000 + seed)  # the same batches for every run
    for _ in range(epochs):
        sgd_epoch(model, optimizer, x_train, y_train, order, stepped.values())
        acc["live"].append(accuracy(model, x_test, y_test))
        for name, averager in averagers.items():
            with averager.averaged():
                acc[name].append(accuracy(model, x_test, y_test))
    return acc


def run(quick: bool, out_dir) -> Result:
    epochs = 2 if quick else 30
    seeds = SEEDS[:2] if quick else SEEDS
    data = load_data()
    alphas = {m2: K / (2 * m2) for m2 in MASSES}
    curves: dict[str, list] = {}
    with torch_threads():
        for seed in seeds:
            acc = train(
                seed,
                epochs,
                data,
                lambda model: {
                    f"EMA decay {1 - alphas[m2]:g}": EMA(model, decay=1 - alphas[m2])
                    for m2 in MASSES
                },
            )
            curves.setdefault("SGD, no averaging (live)", []).append(acc.pop("live"))
            for name, values in acc.items():
                curves.setdefault(name, []).append(values)
            for m2 in MASSES:
                acc = train(
                    seed,
                    epochs,
                    data,
                    lambda model, m2=m2: {"shadow": Belay.from_physics(model, k=K, m1=M1, m2=m2)},
                )
                curves.setdefault(f"BELAY m2={m2:g} (shadow)", []).append(acc["shadow"])
                curves.setdefault(f"BELAY m2={m2:g} (live)", []).append(acc["live"])
            for m2 in MASSES:
                acc = train(
                    seed,
                    epochs,
                    data,
                    lambda model, m2=m2: {
                        "shadow": Belay.from_physics(model, k=K, m1=M1, m2=m2, form="poster")
                    },
                )
                curves.setdefault(f"BELAY poster m2={m2:g} (shadow)", []).append(acc["shadow"])
                curves.setdefault(f"BELAY poster m2={m2:g} (live)", []).append(acc["live"])
    arrays = {name: 100 * np.array(v) for name, v in curves.items()}  # (seeds, epochs + 1)
    early = min(3, epochs)
    rows = [
        [
            name,
            mean_std(a[:, 1], "{:.1f}"),
            mean_std(a[:, early], "{:.1f}"),
            mean_std(a[:, -1], "{:.2f}"),
            mean_std(a.max(1), "{:.2f}"),
        ]
        for name, a in arrays.items()
    ]
    table = markdown_table(
        [
            "weights",
            "test acc. % after 1 epoch",
            f"after {early} epochs",
            f"after {epochs} epochs",
            "best epoch",
        ],
        rows,
    )

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    epochs_axis = np.arange(epochs + 1)
    for ax, kind in zip(axes, ("averaged", "live")):
        base = arrays["SGD, no averaging (live)"]
        ax.plot(epochs_axis, base.mean(0), "k-", lw=2, label="SGD, no averaging")
        for j, m2 in enumerate(MASSES):
            name = f"BELAY m2={m2:g} ({'shadow' if kind == 'averaged' else 'live'})"
            a = arrays[name]
            ax.plot(epochs_axis, a.mean(0), "-", color=f"C{j}", label=name)
            ax.fill_between(
                epochs_axis, a.mean(0) - a.std(0), a.mean(0) + a.std(0), color=f"C{j}", alpha=0.15
            )
            poster = f"BELAY poster m2={m2:g} ({'shadow' if kind == 'averaged' else 'live'})"
            ax.plot(epochs_axis, arrays[poster].mean(0), ":", lw=2, color=f"C{j}", label=poster)
            if kind == "averaged":
                e = arrays[f"EMA decay {1 - alphas[m2]:g}"]
                ax.plot(
                    epochs_axis,
                    e.mean(0),
                    "--",
                    color=f"C{j}",
                    label=f"EMA decay {1 - alphas[m2]:g} (same alpha)",
                )
        ax.set(
            xlabel="epoch", ylim=(80, 100), title=f"{kind} weights (mean ± std, {len(seeds)} seeds)"
        )
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    intro = f"""sklearn digits (1347 train / 450 test, 8x8), MLP 64-64-10, SGD lr = eta = 1/(2 m1) = {1 / (2 * M1):g},
batch {BATCH}, {epochs} epochs, {len(seeds)} seeds (init and batch order fixed per seed, shared by all
runs of a seed). BELAY via Belay.from_physics(k={K}, m1={M1}, m2) -> beta = {K / (2 * M1):g},
alpha = k/(2 m2) = {", ".join(f"{alphas[m]:g}" for m in MASSES)} for m2 = {", ".join(f"{m:g}" for m in MASSES)};
each EMA uses decay = 1 - alpha. "BELAY" is the post-step form (Belay stepped after the SGD
step); "BELAY poster" the poster's exact form, Belay.from_physics(..., form="poster") fused with
the same torch.optim.SGD (the shadow follows the weights from before the step); same init and
batches. Figure: solid BELAY (post-step), dotted BELAY poster, dashed EMA."""
    files = write_outputs(NAME, out_dir, fig, table, intro)
    checks = {name: float(a[:, -1].mean()) for name, a in arrays.items()}
    return Result(NAME, table, {"final_accuracy": checks}, files)

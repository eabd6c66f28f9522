"""GB/s against size, one panel per (dtype pair, method), one line per backend and peer,
and the streaming copy's bandwidth as a horizontal line."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from .traffic import METHODS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

# Panel titles; a method not named here is titled by its short name.
TITLES = {
    "ema": "EMA",
    "swa": "SWA",
    "belay": "BELAY",
    "two_point": "two-point",
    "swap": "swap (in+out)",
}


def plot_sweep(rows, stream_gbps: float, path: Path, title: str) -> None:
    rows = [r for r in rows if r["mode"] == "sweep" and "gbps" in r]
    pairs = list(dict.fromkeys(r["dtypes"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: plt.cm.tab10(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(
        len(pairs),
        len(methods),
        figsize=(3.6 * len(methods), 3.3 * len(pairs) + 1.2),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, pair in enumerate(pairs):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            for impl in impls:
                points = sorted(
                    (r["numel"], r["gbps"])
                    for r in rows
                    if r["dtypes"] == pair and r["method"] == method and r["impl"] == impl
                )
                if points:
                    ours = impl.startswith("belay_kernels")
                    ax.plot(
                        *zip(*points),
                        marker="o" if ours else "x",
                        markersize=4,
                        linestyle="-" if ours else "--",
                        linewidth=2 if ours else 1.2,
                        color=colors[impl],
                        label=impl,
                    )
            ax.axhline(
                stream_gbps, color="black", linewidth=1, linestyle=":", label="streaming copy"
            )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.25)
            ax.set_title(f"{TITLES.get(method, method)}  {pair}", fontsize=10)
            if j == 0:
                ax.set_ylabel("GB/s (counted bytes)")
            if i == len(pairs) - 1:
                ax.set_xlabel("elements")
    handles = {}
    for ax in axes.flat:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lbl, h)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=min(5, len(handles)),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.1 if len(handles) > 5 else 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)

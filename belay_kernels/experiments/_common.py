"""What every experiment shares: the output folder, tables, mean ± std, seeds, figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # experiments write PNGs; they never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)


@dataclass
class Result:
    """What an experiment hands back: its table, the numbers the tests check, and files."""

    name: str
    table: str
    checks: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def mean_std(values, fmt: str = "{:.3g}") -> str:
    """``"m ± s"`` over seeds (population std), or ``"m"`` for a single value."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 1:
        return fmt.format(arr.item())
    return f"{fmt.format(arr.mean())} ± {fmt.format(arr.std())}"


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(name: str, out_dir: Path, fig, table: str, intro: str = "") -> list[Path]:
    """Save ``NAME.png`` and ``NAME.md`` (intro, table, figure link) and print the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / f"{name}.png", out_dir / f"{name}.md"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    text = f"# {name}\n\n{intro.strip()}\n\n{table}\n\n![{name}]({png.name})\n"
    md.write_text(text)
    print(f"\n## {name}\n{table}\n")
    return [png, md]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def averaged_values(averager, params) -> list[torch.Tensor]:
    """Copies of what ``averager.averaged()`` swaps into ``params`` (works for every kind)."""
    with averager.averaged():
        return [p.detach().clone() for p in params]


def parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor.clone(), requires_grad=False)

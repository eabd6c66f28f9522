"""``belay-kernels reproduce NAME|all [--quick] [--out DIR]``: the seed documents' claims,
checked with the library's own averagers. Each experiment is one module with
``run(quick, out_dir) -> Result``; it writes ``NAME.png`` and ``NAME.md`` under ``out_dir``
(``docs/results`` by default) and prints its table."""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

# experiment name -> module in this package
EXPERIMENTS = {
    "sandler-table1": "sandler_table1",
    "sandler-stationary": "sandler_stationary",
    "sandler-fig9": "sandler_fig9",
    "ou-swa": "ou_swa",
    "belay-rosenbrock": "belay_rosenbrock",
    "belay-functions": "belay_functions",
    "belay-digits": "belay_digits",
    "belay-damping": "belay_damping",
}


def run(name: str, *, quick: bool = False, out_dir: Path | str = "docs/results"):
    """Run one experiment and return its :class:`~._common.Result`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}.")
    module = importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")
    return module.run(quick=quick, out_dir=Path(out_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="belay-kernels reproduce", description=__doc__)
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes (for tests)")
    parser.add_argument("--out", default="docs/results", help="folder for figures and tables")
    args = parser.parse_args(argv)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    total = time.perf_counter()
    for name in names:
        start = time.perf_counter()
        run(name, quick=args.quick, out_dir=args.out)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]")
    if len(names) > 1:
        print(f"[all: {time.perf_counter() - total:.1f} s]")
    return 0

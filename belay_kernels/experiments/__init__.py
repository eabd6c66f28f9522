"""``belay-kernels reproduce``: the seed documents' claims and EDM2's post-hoc EMA, checked
with the library's own averagers; one experiment per module of this package."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from .._outputs import checkout_docs_results, output_dir
from .._progress import progress

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
    "posthoc-ema": "posthoc_ema",
}

DESCRIPTION = """\
Check the claims of the three seed documents (Sandler et al.'s two-point average, the
Ornstein-Uhlenbeck view of SWA, and the BELAY poster), and EDM2's post-hoc EMA, by running
small experiments with this library's averagers. Each experiment prints its table and writes NAME.png (figure)
and NAME.md (table and verdict) to the output folder. `all` took about 2.5 minutes on a
shared 2-core CPU (docs/results/README.md) and shows a progress bar; --quick is a smoke
run of seconds per experiment. Nothing is downloaded."""

EPILOG = """\
where the files go:
  default            ./belay-results/reproduce/ (in the current folder)
  --quick            a quick/ folder below the chosen one, so that a smoke run never
                     replaces the files of a full run
  --out DIR          DIR (DIR/quick with --quick)
  --update-docs      the committed docs/results/ of this source checkout (full runs only)"""


def run(name: str, *, quick: bool = False, out_dir: Path | str | None = None):
    """Run one experiment, write its files to ``out_dir`` (default
    ``belay-results/reproduce``, ``.../quick`` for a quick run) and return its
    :class:`~._common.Result`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}.")
    module = importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")
    folder = Path(out_dir) if out_dir is not None else output_dir("reproduce", None, quick)
    return module.run(quick=quick, out_dir=folder)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="belay-kernels reproduce",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name",
        choices=[*EXPERIMENTS, "all"],
        metavar="NAME",
        help="one experiment (" + ", ".join(EXPERIMENTS) + ") or all",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer seeds and steps: a smoke run of seconds per experiment, "
        "whose numbers are not the documented ones",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the figures and tables (default: ./belay-results/reproduce)",
    )
    where.add_argument(
        "--update-docs",
        action="store_true",
        help="regenerate the committed docs/results/ of this source checkout (not with --quick)",
    )
    args = parser.parse_args(argv)
    if args.update_docs:
        if args.quick:
            parser.error(
                "--update-docs regenerates the documented full-run results; "
                "drop --quick (a quick run writes to belay-results/reproduce/quick)"
            )
        docs = checkout_docs_results()
        if docs is None:
            parser.error(
                "--update-docs needs a source checkout (an editable install with "
                "its docs/results/); this copy of belay_kernels has none"
            )
        args.out = docs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.out) if args.update_docs else output_dir("reproduce", args.out, args.quick)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    total = time.perf_counter()
    with progress(len(names), "reproduce", enabled=len(names) > 1) as bar:
        for name in names:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            run(name, quick=args.quick, out_dir=folder)
            bar.write(f"[{name}: {time.perf_counter() - start:.1f} s]")
            bar.update(1)
    if len(names) > 1:
        print(f"[all: {time.perf_counter() - total:.1f} s]")
    files = (
        ", ".join(f"{n}.png, {n}.md" for n in names)
        if len(names) == 1
        else "NAME.png and NAME.md for each experiment"
    )
    print(f"wrote {files} to {folder}/", file=sys.stderr)
    return 0

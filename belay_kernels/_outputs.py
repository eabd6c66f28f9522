"""Where ``belay-kernels reproduce`` and ``bench`` write their files.

By default ``./belay-results/<command>/`` (git-ignored in this repository), never the
committed ``docs/results/`` or ``bench/results/``; a ``--quick`` run writes into a
``quick/`` folder below the chosen one, so that a smoke run never replaces the files of a
full run. Regenerating the committed ``docs/results/`` is ``reproduce --update-docs``.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = Path("belay-results")
QUICK_FOLDER = "quick"


def output_dir(command: str, out: str | Path | None, quick: bool) -> Path:
    """The folder a command writes to: ``out`` (default ``belay-results/<command>``), or
    its ``quick/`` subfolder for a --quick run."""
    base = Path(out) if out is not None else DEFAULT_ROOT / command
    return base / QUICK_FOLDER if quick else base


def checkout_docs_results() -> Path | None:
    """The committed docs/results/ of the source checkout this package runs from (an
    editable install), or None for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    docs = root / "docs" / "results"
    return docs if (root / "pyproject.toml").is_file() and docs.is_dir() else None

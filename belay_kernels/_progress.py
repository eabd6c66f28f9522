"""A progress bar with the current step and an ETA for the long commands (tqdm, on
stderr), and the same interface doing nothing for short ones."""

from __future__ import annotations

import sys


class _Silent:
    """What a disabled bar does: lines are still printed, nothing else."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def progress(total: int, label: str, *, enabled: bool = True):
    """A context manager giving a bar of ``total`` steps: ``set_postfix_str(step)`` names
    the current step, ``update()`` finishes one, ``write(line)`` prints above the bar."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    class Bar(tqdm):
        @classmethod
        def write(cls, text, file=None, end="\n", nolock=False):
            super().write(text, file=file or sys.stderr, end=end, nolock=nolock)

    return Bar(
        total=total,
        desc=label,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{desc}: {n}/{total} [{elapsed}<{remaining}] {postfix}",
    )

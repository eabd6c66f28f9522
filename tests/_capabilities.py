"""ATen's CPU capabilities (``ATEN_CPU_CAPABILITY``: ``default``, ``avx2``, ``avx512``),
which ATen reads once, when torch is imported; so each is tried in a process of its own.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPABILITIES = ("default", "avx2", "avx512")


def _child_env(capability: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


@functools.cache
def supported(capability: str) -> bool:
    """Whether ATen runs ``capability`` when asked to: it falls back to the best one the
    CPU has when asked for one it lacks (and on a CPU that is not x86)."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=_child_env(capability),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().lower() == capability

"""Runs the Triton backend's tests in a subprocess with TRITON_INTERPRET=1: every method
against the reference (test_backends.py) and the Triton-only behaviour, the K-profile
EMA's kernels among it (triton_interpreter_cases.py), and the fused optimizer steps
against their spec (triton_fused_cases.py).

The variable has to be set before Triton is imported, and setting it in this process
would turn every other test's Triton kernels into interpreted ones; a subprocess keeps
the session as it was."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent
ROOT = HERE.parent


# (file, the tests of it to run: all, or a -k expression)
FILES = [
    ("test_backends.py", None),
    ("triton_interpreter_cases.py", None),
    ("triton_fused_cases.py", None),
    ("test_audit_mutations.py", "test_1_"),  # the two-point average's overflow
]


@pytest.mark.parametrize(("name", "selection"), FILES)
def test_triton_kernels_under_the_interpreter(name, selection):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / name)]
        + (["-k", selection] if selection else []),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]

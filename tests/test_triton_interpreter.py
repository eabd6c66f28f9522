"""Runs tests/triton_interpreter_cases.py in a subprocess with TRITON_INTERPRET=1.

The variable has to be set before Triton is imported, and setting it in this process
would turn every other test's Triton kernels into interpreted ones; a subprocess keeps
the session as it was."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_interpreter_cases.py")
ROOT = CASES.parent.parent


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]

"""bench/gpu_check.sh: its dry run (the steps and the device checks it would run) works
without a GPU, and a real run on a machine without one says so and exits 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def run(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_dry_run_lists_every_step_and_check():
    result = run("--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("== build", "== tests", "== device_backends", "== fused", "== checks", "== bench"):
        assert step in result.stdout
    for check in ("nan_swap", "swap_and_lerp", "graph_replay", "device_guard", "list_bandwidth"):
        assert f"would run {check}" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0():
    result = run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA GPU" in result.stdout

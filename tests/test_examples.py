"""The FSDP2 examples, run as their docstrings say: ``torchrun --nproc_per_node 2``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _torchrun(script: str, *args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_fsdp2_ema_example(tmp_path):
    out = _torchrun("fsdp2_ema.py", "--steps", "10", "--out", str(tmp_path))
    assert "eval loss: live weights" in out
    assert (tmp_path / "ema-weights.pt").is_file()


def test_fsdp2_posthoc_example(tmp_path):
    out = _torchrun("fsdp2_posthoc.py", "--steps", "20", "--out", str(tmp_path))
    assert "4 sharded snapshots" in out and "post-hoc EMA sigma_rel 0.08" in out
    snapshots = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snapshots == [f"snapshot-00000{i}" for i in range(1, 5)]
    from belay_kernels import posthoc

    exported = torch.load(tmp_path / "ema-0.08.pt")
    alone = posthoc.reconstruct(tmp_path / "snapshots", sigma_rel=0.08)  # one process
    assert sorted(exported) == sorted(alone)
    for name, value in alone.items():
        assert torch.equal(exported[name], value), name

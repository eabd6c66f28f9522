"""SIGKILL during PostHocEMA's snapshot writes, repeated: reconstruction uses complete
snapshots only, each holding exactly what its step must hold, and names what a killed
write left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import belay_kernels as bk
from belay_kernels import posthoc
from belay_kernels.snapshots import IncompleteSnapshotWarning

SCRIPT = Path(__file__).with_name("posthoc_crash_script.py")
NUMEL = 4_000_000  # 16 MB per profile: a write takes long enough to be hit


def _expected_profiles(offset: float, steps: int) -> list[list[float]]:
    """Per step, the two profiles' value: the same PostHocEMA on one element."""
    p = torch.nn.Parameter(torch.zeros(1))
    phema = bk.PostHocEMA([p], sigma_rels=(0.05, 0.10), snapshot_every=10**9, snapshot_dir="unused")
    values = []
    for t in range(1, steps + 1):
        p.data.fill_(offset + t)
        phema.step()
        values.append([v[0].item() for v in phema._saved_tensors().values()])
    return values


def _kill_during_writes(folder: Path, offset: float, rng: random.Random) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(folder), str(NUMEL), str(offset)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (folder / "snapshot-000002.pt").exists():
            assert proc.poll() is None, f"the training script exited with {proc.returncode}"
            assert time.monotonic() < deadline, "no snapshot within 120 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def test_sigkill_during_writes_never_yields_a_partial_snapshot(tmp_path):
    rng = random.Random(0)
    leftovers = 0
    for run in range(5):
        folder, offset = tmp_path / f"run{run}", 1000.0 * run
        _kill_during_writes(folder, offset, rng)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files, headers, coeffs, step, _ = posthoc.plan(folder, sigma_rel=0.07)
            got = posthoc.reconstruct(folder, sigma_rel=0.07)["0"]
        named = [w for w in caught if issubclass(w.category, IncompleteSnapshotWarning)]
        hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
        leftovers += bool(hidden)
        # every leftover is named, and only leftovers are
        assert all(name in str(named[0].message) for name in hidden) if hidden else not named
        expected = _expected_profiles(offset, step)
        for path, header in zip(files, headers):
            snap = posthoc.read_snapshot(path)
            for k, profile in enumerate(snap["profiles"]):
                want = torch.full((NUMEL,), expected[header["step"] - 1][k])
                assert torch.equal(profile[0], want), f"run {run} {path.name} profile {k}"
        want = sum(
            c * expected[h["step"] - 1][k]
            for h, cs in zip(headers, coeffs)
            for k, c in enumerate(cs)
        )
        assert got.min() == got.max(), f"run {run}: a mixed reconstruction"
        assert abs(got[0].item() - want) <= 1e-5 * abs(want)
    assert leftovers >= 1, "no kill landed in a write: the test did not test anything"

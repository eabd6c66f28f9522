"""Peak memory of one call of every op on the ``torch`` backend: at 16M fp32 elements
(64 MB a buffer) it may grow the process's peak resident memory by a few chunks, never by
a buffer. The ``reference`` backend, which computes out of place, grows it by several
buffers under the same measurement, so the bound can fail.

Each backend is measured in a fresh subprocess (Linux only): it allocates and fills the
buffers, resets the peak (``5`` into ``/proc/self/clear_refs`` sets VmHWM to the current
resident size), makes one op call, and reads VmHWM back. A warm-up call on a small tensor
first brings in the code and the allocator's first chunk-sized arena."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-memory counters"
)

NUMEL = 1 << 24
BOUND_MB = 8

_SCRIPT = r"""
import json, sys
import torch
from belay_kernels import _backends
from belay_kernels.methods import METHODS

torch.manual_seed(0)
backend, numel, names, layouts = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
module = _backends._load(backend).module
fp32, bf16 = torch.float32, torch.bfloat16
# a list of uneven tensors: large ones cross many chunks, small ones none
LIST = [numel // 2, numel // 4, numel // 8 + 7, numel // 8 - 8, 1]


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def tensors(sizes, dtype, nonfinite):
    out = [torch.rand(n, dtype=torch.float32).to(dtype) * 2 - 1 for n in sizes]
    if nonfinite:
        for t in out:
            t[::1001] = float("nan")
            t[7::1003] = float("inf")
    return out


def case_call(name, sizes, nonfinite):
    # one op call of case ``name`` on ``sizes``: (ema|swa|belay|two_point|swap|multi)
    # [-bf16] [-propagate]
    parts = name.split("-")
    op = parts[0]
    weights_dtype = bf16 if "bf16" in parts else fp32
    skip = "propagate" not in parts
    skipped = torch.zeros((), dtype=torch.int64)
    if op == "multi":
        shadows = [tensors(sizes, fp32, False) for _ in range(3)]
        weights = tensors(sizes, weights_dtype, nonfinite)
        decays = [0.9, 0.99, 0.999]
        if len(sizes) == 1:
            return lambda: module.multi_ema_update_([s[0] for s in shadows], weights[0],
                                                    decays, skip, skipped)
        if hasattr(module, "multi_ema_update_foreach_"):
            return lambda: module.multi_ema_update_foreach_(shadows, weights, decays, skip, skipped)
        return lambda: [module.multi_ema_update_(list(r[:3]), r[3], decays, skip, skipped)
                        for r in zip(*shadows, weights)]
    method = {m.name: m for m in METHODS}[op]
    columns = [tensors(sizes, method.dtype_of(role, weights_dtype, fp32),
                       nonfinite and role == "weights") for role in method.tensors]
    args = [s.typical for s in method.scalars]
    if method.counts_skipped:
        args += [skip, skipped]
    foreach = getattr(module, method.foreach, None)
    if len(sizes) == 1:
        return lambda: getattr(module, method.op)(*(c[0] for c in columns), *args)
    if foreach is not None:
        return lambda: foreach(*columns, *args)
    return lambda: [getattr(module, method.op)(*row, *args) for row in zip(*columns)]


growth = {}
for name in names:
    for layout in layouts.split(","):
        for nonfinite in (False, True):
            sizes = [numel] if layout == "flat" else LIST
            case_call(name, [3 * (1 << 17) + 5] * (1 if layout == "flat" else 3), nonfinite)()
            call = case_call(name, sizes, nonfinite)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = status("VmRSS")
            call()
            growth[f"{name} {layout} {'nonfinite' if nonfinite else 'finite'}"] = (
                status("VmHWM") - before)
            del call
print(json.dumps(growth))
"""

TORCH_CASES = [
    "ema",
    "ema-propagate",
    "ema-bf16",
    "swa",
    "belay",
    "belay-bf16",
    "two_point",
    "swap",
    "multi",
    "multi-bf16",
]


def peak_growth(
    backend: str, names: list[str], layouts=("flat", "list"), numel: int = NUMEL
) -> dict[str, int]:
    """Bytes by which one call of each case grew the peak resident memory."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, backend, str(numel), ",".join(names), ",".join(layouts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_torch_op_grows_peak_memory_by_a_few_chunks_only():
    growth = peak_growth("torch", TORCH_CASES)
    assert len(growth) == 4 * len(TORCH_CASES)
    mb = {case: round(b / 2**20, 1) for case, b in growth.items()}
    over = {case: v for case, v in mb.items() if v > BOUND_MB}
    assert not over, f"peak growth over {BOUND_MB} MB (a buffer is 64 MB): {over}; all: {mb}"


def test_the_measurement_sees_the_references_full_size_temporaries():
    growth = peak_growth("reference", ["ema", "swap", "multi"], layouts=("flat",))
    flat = {case: b / 2**20 for case, b in growth.items()}
    assert len(flat) == 6
    assert all(v > 48 for v in flat.values()), flat  # most of a full-size temporary

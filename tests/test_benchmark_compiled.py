"""The torch.compile peer of `belay-kernels bench`: Inductor's compiled formula gives the
reference's results (and its skipped count), the sweep reports its compile time apart
from its step time, and where torch.compile cannot run the cell says why.

Inductor compiles each graph in seconds, so the cases are few and small; the compiled
code of the first tests is reused from Inductor's cache by the sweep test."""

from __future__ import annotations

import pytest
import torch

from belay_kernels.benchmark import compiled
from belay_kernels.benchmark.flat_cases import make_operands
from belay_kernels.benchmark.report import format_table
from belay_kernels.benchmark.sweep import run_sweep
from belay_kernels.methods import BY_NAME, NAMES
from belay_kernels.testing import assert_close

N = 1031  # no multiple of any vector width: the compiled loop's tail runs too
CPU = torch.device("cpu")
CASES = [(compiled.COUNTED, m, torch.float32) for m in NAMES if m != "swap"] + [
    (compiled.COUNTED, "swap", torch.bfloat16),  # the bit packing
    (compiled.COUNTED, "ema", torch.bfloat16),  # 16-bit weights, fp32 shadow
    (compiled.UNCOUNTED, "ema", torch.float32),
]


def _operands(method, weights_dtype):
    torch.manual_seed(0)
    t = make_operands(method, N, weights_dtype, torch.float32, CPU)
    if BY_NAME[method].counts_skipped:
        t["weights"][[5, 77, 1030]] = torch.tensor(
            [float("nan"), float("inf"), -float("inf")], dtype=weights_dtype
        )
    return t


@pytest.mark.parametrize("peer,method,weights_dtype", CASES, ids=str)
def test_compiled_formula_matches_the_reference(peer, method, weights_dtype):
    ours = _operands(method, weights_dtype)
    expected = {role: t.clone() for role, t in ours.items()}
    skipped = torch.zeros((), dtype=torch.int64)
    expected_skipped = torch.zeros((), dtype=torch.int64)
    step = compiled.compiled_step(peer, method, ours, skipped)
    compiled.first_call(step, CPU)
    step()  # the compiled code, run again
    for _ in range(2):
        compiled.reference_step(method, expected, expected_skipped)
    for role in ours:
        assert_close(ours[role], expected[role], f"{peer} {method} {role}")
    if method == "swap":  # the round trip restores both tensors bit for bit
        assert all(
            torch.equal(
                ours[r].view(torch.int16 if ours[r].itemsize == 2 else torch.int32),
                t.view(torch.int16 if t.itemsize == 2 else torch.int32),
            )
            for r, t in expected.items()
        )
    counts = peer == compiled.COUNTED and BY_NAME[method].counts_skipped
    assert skipped.item() == (expected_skipped.item() if counts else 0) == (6 if counts else 0)


def test_sweep_reports_compile_time_apart(monkeypatch):
    rows = run_sweep(
        device=CPU,
        sizes=[N],
        methods=["ema"],
        pairs=["fp32/fp32"],
        peers=[compiled.COUNTED],
        backends=["torch"],
        min_run_time=0.005,
        log=lambda _: None,
    )
    peer = next(r for r in rows if r["impl"] == compiled.COUNTED)
    ours = next(r for r in rows if r["impl"] == "belay_kernels[torch]")
    assert peer["compile_s"] > 0 and peer["median_ms"] > 0
    assert peer["compile_s"] > peer["median_ms"] / 1e3  # the compile is not in the step time
    assert ours["speedup_vs_torch_compile"] == peer["median_ms"] / ours["median_ms"]
    table = format_table(rows)
    assert "compile_s" in table.splitlines()[0] and f"{peer['compile_s']:.1f}" in table


def test_a_compiled_peer_that_computes_something_else_is_not_timed():
    """Inductor 2.14 compiles the same-dtype exchange (clone, copy_, copy_) into code that
    leaves the shadow in both tensors; the sweep refuses to time it."""
    rows = run_sweep(
        device=CPU,
        sizes=[N],
        methods=["swap"],
        pairs=["fp32/fp32"],
        peers=[compiled.COUNTED],
        backends=[],
        min_run_time=0.005,
        log=lambda _: None,
    )
    assert "median_ms" not in rows[0]
    assert rows[0]["note"] == "torch.compile's result differs from the reference (weights)"


def test_where_torch_compile_cannot_run_the_cell_says_why(monkeypatch):
    def no_compiler(method):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in cpp_builder")

        return fail

    monkeypatch.setattr(compiled, "_compiled_formula", no_compiler)
    rows = run_sweep(
        device=CPU,
        sizes=[N],
        methods=["belay"],
        pairs=["fp32/fp32"],
        peers=[compiled.COUNTED],
        backends=[],
        min_run_time=0.005,
        log=lambda _: None,
    )
    assert rows[0]["note"].startswith("torch.compile cannot run here: InvalidCxxCompiler")
    assert "median_ms" not in rows[0]

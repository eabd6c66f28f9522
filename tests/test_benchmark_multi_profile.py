"""`belay-kernels bench --mode multi` at a tiny size, and its model case on a tiny model:
the fused pass, the K separate passes, torch.compile and ema-pytorch get rows, the bytes
are the issue's counts for each dtype pair, a backend without the fused op says so, and
the torch.compile peer's formula does our op's work."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from belay_kernels import reference
from belay_kernels.benchmark import architectures, main
from belay_kernels.benchmark.multi_profile import (
    COMPILED,
    COMPILED_UNCOUNTED,
    _k_profile_formula,
    decays_for,
    fused_bytes,
    multi_backend_reason,
    run_model,
    separate_bytes,
)


def test_byte_counts():
    assert fused_bytes(1, 2) == 20 and separate_bytes(1, 2) == 24
    assert fused_bytes(10, 4) == 360 and separate_bytes(10, 4) == 480
    # bf16 weights, fp32 shadows; then bf16 both
    assert fused_bytes(1, 2, 2, 4) == 18 and separate_bytes(1, 2, 2, 4) == 20
    assert fused_bytes(1, 4, 2, 2) == 18 and separate_bytes(1, 4, 2, 2) == 24


@pytest.mark.parametrize(
    "pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16,) * 2]
)
def test_peer_formula_does_our_work(pair):
    """The torch.compile peer's formula (run eagerly here) updates every profile as the
    reference does, keeps the non-finite weights out, and counts them once per profile."""
    weights_dtype, shadow_dtype = pair
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(1001, generator=g).to(weights_dtype)
    weights[[3, 500, 1000]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(
        weights_dtype
    )
    shadows = [torch.randn(1001, generator=g).to(shadow_dtype) for _ in range(3)]
    expected = [s.clone() for s in shadows]
    decays = decays_for(3)
    want_skipped = torch.zeros((), dtype=torch.int64)
    reference.multi_ema_update_(expected, weights, decays, True, want_skipped)
    math = reference.opmath_dtype(weights, *shadows)
    for counted in (True, False):
        got = [s.clone() for s in shadows]
        skipped = torch.zeros((), dtype=torch.int64)
        _k_profile_formula(got, weights, [1 - d for d in decays], skipped, math, counted)
        kept = [3, 500, 1000]
        for profile, want, before in zip(got, expected, shadows):
            assert torch.equal(profile, want)
            assert torch.equal(profile[kept], before[kept])
        assert int(skipped) == (int(want_skipped) if counted else 0)
    assert int(want_skipped) == 9


def test_bench_multi_mode(tmp_path, capsys):
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--mode",
        "multi",
        "--multi-size",
        "3001",
        "--profiles",
        "2,3",
        "--backends",
        "torch,cpp",
        "--peers",
        "torch.compile,torch.compile (uncounted)",
        "--dtypes",
        "fp32/fp32,bf16/bf16",
        "--models",
        "resnet50",
        "--min-run-time",
        "0.005",
        "--stream-size",
        "2e5",
        "--out",
        str(tmp_path),
        "--no-plot",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "vs_separate" in table and "multi_ema K=3" in table
    rows = json.loads((tmp_path / "quick" / "results.json").read_text())["rows"]
    multi = [r for r in rows if r["mode"] == "multi"]
    assert [r["dtypes"] for r in multi if r["impl"] == COMPILED] == ["fp32/fp32"] * 2 + [
        "bf16/bf16"
    ] * 2
    fused = [r for r in multi if r["impl"] == "belay_kernels[torch] multi_ema_update_"]
    # per element: the weights once, each shadow read and written; fp32, then bf16
    assert [r["bytes"] for r in fused] == [3001 * 20, 3001 * 28, 3001 * 10, 3001 * 14]
    assert all(r["vs_separate"] > 0 for r in fused)
    separate = [r for r in multi if r["impl"] == "belay_kernels[torch] 2 x ema_update_"]
    assert [r["bytes"] for r in separate] == [3001 * 24, 3001 * 12]
    assert all(r["median_ms"] > 0 for r in separate)
    cpp = [r for r in multi if r["impl"] == "belay_kernels[cpp] multi_ema_update_"]
    reason = multi_backend_reason("cpp", torch.device("cpu"))
    assert all((r["note"] == reason) and (("median_ms" in r) == (not reason)) for r in cpp)
    for impl, ratio in ((COMPILED, "vs_compile"), (COMPILED_UNCOUNTED, "vs_uncounted")):
        compiled = [r for r in multi if r["impl"] == impl]
        assert len(compiled) == 4 and all("median_ms" in r or r["note"] for r in compiled)
        if all("median_ms" in r for r in compiled):
            assert all(r[ratio] > 0 for r in fused)


def test_model_case_against_ema_pytorch(monkeypatch):
    pytest.importorskip("ema_pytorch")

    def tiny():
        return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny", tiny)
    rows = run_model(
        device=torch.device("cpu"),
        model_name="tiny",
        profiles=[2],
        min_run_time=0.005,
        log=lambda _: None,
    )
    assert [r["impl"] for r in rows] == [
        "belay_kernels PostHocEMA.step",
        "ema-pytorch PostHocEMA.update",
    ]
    assert all(r["median_ms"] > 0 and r["bytes"] == 20 * (8 * 16 + 16 + 16 * 4 + 4) for r in rows)
    assert rows[0]["vs_ema_pytorch"] > 0

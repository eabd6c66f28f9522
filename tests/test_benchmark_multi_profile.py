"""`belay-kernels bench --mode multi` at a tiny size, and its model case on a tiny model:
the fused pass, the K separate passes, torch.compile and ema-pytorch get rows, the bytes
are the issue's counts, and a backend without the fused op says so."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from belay_kernels.benchmark import architectures, main
from belay_kernels.benchmark.multi_profile import (
    COMPILED,
    fused_bytes,
    multi_backend_reason,
    run_model,
    separate_bytes,
)


def test_byte_counts():
    assert fused_bytes(1, 2) == 20 and separate_bytes(1, 2) == 24
    assert fused_bytes(10, 4) == 360 and separate_bytes(10, 4) == 480


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
        "torch.compile",
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
    fused = [r for r in multi if r["impl"] == "belay_kernels[torch] multi_ema_update_"]
    assert [r["bytes"] for r in fused] == [3001 * 20, 3001 * 28]
    assert all(r["vs_separate"] > 0 for r in fused)
    separate = [r for r in multi if r["impl"] == "belay_kernels[torch] 2 x ema_update_"]
    assert separate[0]["bytes"] == 3001 * 24 and separate[0]["median_ms"] > 0
    cpp = [r for r in multi if r["impl"] == "belay_kernels[cpp] multi_ema_update_"]
    reason = multi_backend_reason("cpp", torch.device("cpu"))
    assert (cpp[0]["note"] == reason) and (("median_ms" in cpp[0]) == (not reason))
    compiled = [r for r in multi if r["impl"] == COMPILED]
    assert len(compiled) == 2 and all("median_ms" in r or r["note"] for r in compiled)


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

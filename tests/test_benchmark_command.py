"""`belay-kernels bench` end to end at a tiny size, and the model-level mode on a tiny
model: the files appear, the table prints, and the op counter tells a per-tensor loop
from a single foreach call."""

from __future__ import annotations

import importlib.util
import json

import torch
from torch import nn

from belay_kernels.benchmark import architectures, main
from belay_kernels.benchmark.model_level import run_models
from belay_kernels.benchmark.opcount import count_op_calls
from belay_kernels.benchmark.sweep import add_speedups


def test_bench_command_writes_table_json_csv_and_plot(tmp_path, capsys):
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--sizes",
        "3000",
        "--methods",
        "ema,swap",
        "--dtypes",
        "fp32/fp32",
        "--peers",
        "torch._foreach_lerp_,AveragedModel",
        "--min-run-time",
        "0.005",
        "--stream-size",
        "2e5",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    table = printed.out
    assert "belay_kernels[torch]" in table and "torch._foreach_lerp_" in table
    assert "\n  backends  timed: torch, reference, cpp" in table or "timed: torch;" in table
    assert "*" in table and "fit in the last-level cache, so" in table  # 3000 elements do
    out = tmp_path / "quick"  # a quick run never writes where a full run's files are
    assert f"to {out}/" in printed.err and not (tmp_path / "results.json").exists()
    result = json.loads((out / "results.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"]
    timed = {(r["method"], r["impl"]) for r in result["rows"] if "median_ms" in r}
    assert {
        ("ema", "belay_kernels[torch]"),
        ("ema", "torch._foreach_lerp_"),
        ("ema", "AveragedModel"),
        ("swap", "belay_kernels[torch]"),
    } <= timed
    assert not any(r["method"] == "swap" and r["kind"] == "peer" for r in result["rows"])
    for row in result["rows"]:
        if "median_ms" in row:
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["gbps"] > 0 and row["pct_stream"] > 0
    csv_text = (out / "results.csv").read_text()
    assert csv_text.startswith("# date:") and "\nmode,model,method," in csv_text
    assert "### Sweep at 3e+03 elements" in (out / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "sweep.png").stat().st_size > 10_000


def test_op_counter_sees_one_call_per_tensor_or_one_foreach():
    shadows = [torch.rand(5) for _ in range(7)]
    weights = [torch.rand(5) for _ in range(7)]
    assert count_op_calls(lambda: [s.lerp_(w, 0.1) for s, w in zip(shadows, weights)]) == 7
    assert count_op_calls(lambda: torch._foreach_lerp_(shadows, weights, 0.1)) == 1


def test_speedup_is_best_peer_time_over_ours():
    rows = [
        {
            "mode": "sweep",
            "method": "ema",
            "dtypes": "a",
            "numel": 1,
            "impl": "ours",
            "kind": "ours",
            "median_ms": 2.0,
        },
        {
            "mode": "sweep",
            "method": "ema",
            "dtypes": "a",
            "numel": 1,
            "impl": "p1",
            "kind": "peer",
            "median_ms": 5.0,
        },
        {
            "mode": "sweep",
            "method": "ema",
            "dtypes": "a",
            "numel": 1,
            "impl": "p2",
            "kind": "peer",
            "median_ms": 3.0,
        },
        {
            "mode": "sweep",
            "method": "ema",
            "dtypes": "a",
            "numel": 1,
            "impl": "p3",
            "kind": "peer",
            "note": "unsupported",
        },
    ]
    add_speedups(rows)
    assert rows[0]["best_peer"] == "p2" and rows[0]["speedup_vs_best_peer"] == 1.5


def test_model_level_mode_on_a_tiny_model(monkeypatch):
    def tiny():
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny", tiny)
    rows = run_models(
        device=torch.device("cpu"),
        models=["tiny"],
        methods=["ema", "belay", "two_point"],
        pairs=["fp32/fp32"],
        peers=["lerp_ loop", "torch._foreach_lerp_", "timm ModelEmaV3"],
        min_run_time=0.005,
        log=lambda _: None,
    )
    by_impl = {(r["method"], r["impl"]): r for r in rows}
    assert by_impl[("ema", "lerp_ loop")]["ops_per_step"] == 6  # one lerp_ per parameter
    assert by_impl[("ema", "torch._foreach_lerp_")]["ops_per_step"] == 1
    ours = by_impl[("belay", "belay_kernels[torch]")]
    assert ours["median_ms"] > 0 and ours["speedup_vs_torch_reference"] == 1.0
    assert "median_ms" in by_impl[("two_point", "belay_kernels[torch]")]
    assert ("belay", "timm ModelEmaV3") not in by_impl  # no such method: no cell at all

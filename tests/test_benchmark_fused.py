"""`belay-kernels bench --mode fused` in its quick form on a tiny model: every row of every
table is there, with finite positive times and the speed-ups on the fused rows, and the
files appear. No timing thresholds: the numbers depend on the machine."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import torch

from belay_kernels.benchmark import main
from belay_kernels.benchmark.fused import (
    ADAMW,
    AVERAGERS,
    HEAVYBALL,
    SETUPS,
    TIMM,
    Weights,
    build_case,
    bytes_per_param,
    fused_name,
    make_weights,
    row_names,
    time_cases,
    unfused_name,
)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_bench_fused_mode(tmp_path, capsys):
    threads = torch.get_num_threads()
    argv = ["--quick", "--device", "cpu", "--mode", "fused", "--threads", "1"]
    argv += ["--fused-size", "2048", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr()
    out = tmp_path / "quick"
    assert f"to {out}/" in printed.err
    result = json.loads((out / "fused.json").read_text())
    assert result["settings"]["threads"] == [1] and result["settings"]["numel"] == 2048
    rows = result["rows"]
    assert [(r["setup"], r["impl"]) for r in rows] == [
        (setup, name) for setup in SETUPS for name in row_names()
    ]
    missing = {TIMM: not _installed("timm"), HEAVYBALL: not _installed("heavyball")}
    for r in rows:
        assert r["threads"] == 1 and r["tensors"] == 8 and 0 < r["numel"] <= 4096
        if missing.get(r["impl"]):
            assert r["note"].startswith("not installed") and "median_ms" not in r
            continue
        assert r["note"] == "", r["note"]
        assert r["backend"]
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["samples"] >= 2 and math.isfinite(r["gbps"]) and r["gbps"] > 0
    for setup in SETUPS:
        table = {r["impl"]: r for r in rows if r["setup"] == setup}
        for averager in AVERAGERS:
            fused = table[fused_name(averager)]
            assert fused["backend"].startswith("ours: ")
            assert math.isfinite(fused["speedup"]) and fused["speedup"] > 0
            unfused = table[unfused_name(averager)]
            assert fused["bound"] == unfused["bytes_per_param"] / fused["bytes_per_param"] > 1
    text = printed.out
    assert text.count("| implementation |") == len(SETUPS)
    assert all(text.count(f"| {name} |") == len(SETUPS) for name in row_names())
    md = (out / "fused.md").read_text()
    assert md.startswith("Command: `belay-kernels bench --quick")
    assert md.count(f"| {fused_name('EMA')} |") == len(SETUPS)


def test_bytes_per_parameter():
    fp32 = {name: bytes_per_param(name, "fp32") for name in row_names()}
    assert fp32[ADAMW] == 28
    assert (fp32[unfused_name("EMA")], fp32[fused_name("EMA")]) == (40, 36)
    assert (fp32[unfused_name("Belay")], fp32[fused_name("Belay")]) == (44, 36)
    assert (fp32[unfused_name("PostHocEMA x2")], fp32[fused_name("PostHocEMA x2")]) == (48, 44)
    bf16 = {name: bytes_per_param(name, "bf16/fp32") for name in row_names()}
    assert bf16[ADAMW] == 14
    assert (bf16[unfused_name("EMA")], bf16[fused_name("EMA")]) == (24, 22)
    assert (bf16[unfused_name("Belay")], bf16[fused_name("Belay")]) == (26, 22)
    assert (bf16[unfused_name("PostHocEMA x2")], bf16[fused_name("PostHocEMA x2")]) == (32, 30)


def test_a_missing_peer_is_a_note_not_a_failure(monkeypatch, tmp_path):
    for module in ("timm", "timm.utils", "heavyball", "heavyball.chainable"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    start = make_weights(512, torch.float32)
    names = [fused_name("EMA"), TIMM, HEAVYBALL]
    builders = {
        name: (lambda name=name: build_case(name, start, torch.float32, str(tmp_path)))
        for name in names
    }
    samples, backends, notes = time_cases(builders, rounds=2, reps=2, warmup=1)
    assert len(samples[fused_name("EMA")]) == 4 and fused_name("EMA") not in notes
    assert notes[TIMM].startswith("not installed") and notes[HEAVYBALL].startswith("not installed")
    assert samples[TIMM] == [] and samples[HEAVYBALL] == []


def test_every_case_starts_from_the_same_weights(tmp_path):
    start = make_weights(512, torch.bfloat16)
    assert isinstance(start, Weights) and start.weights[0].dtype == torch.bfloat16
    build_case(fused_name("Belay"), start, torch.float32, str(tmp_path)).step()
    again = make_weights(512, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(start.weights, again.weights))
    assert all(torch.equal(a, b) for a, b in zip(start.grads, again.grads))


def test_every_case_moves_the_weights_each_step(tmp_path):
    """A case whose step changed nothing (an optimizer that dropped the gradients after
    its first step) would time an empty call."""
    start = make_weights(512, torch.float32)
    for name in row_names():
        try:
            case = build_case(name, start, torch.float32, str(tmp_path))
        except ImportError:
            continue
        params = list(case.model.parameters())
        for _ in range(3):
            before = [p.detach().clone() for p in params]
            case.step()
            assert all(not torch.equal(p, b) for p, b in zip(params, before)), name

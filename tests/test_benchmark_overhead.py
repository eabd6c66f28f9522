"""`belay-kernels bench --mode overhead` in its quick form on tiny layouts: every averager
and peer gets a row on every layout, with positive times in order, and the files appear.
No timing thresholds: the numbers depend on the machine."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from belay_kernels.benchmark import main
from belay_kernels.benchmark.overhead import (
    AVERAGER_NAMES,
    CHECK,
    KERNELS,
    LERP,
    TIMM,
    Layout,
    build_steps,
    parse_layouts,
    time_interleaved,
)


def test_bench_overhead_mode(tmp_path, capsys):
    threads = torch.get_num_threads()
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--mode",
        "overhead",
        "--layouts",
        "flat:2,flat:5,list:3",
        "--min-run-time",
        "0.005",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the one-thread setting is undone
    printed = capsys.readouterr()
    out = tmp_path / "quick"
    assert f"to {out}/" in printed.err
    result = json.loads((out / "overhead.json").read_text())
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["versions"]["torch"]
    assert result["settings"]["threads"] == 1 and result["settings"]["timer_floor_us"] > 0
    rows = result["rows"]
    peers = [LERP] + ([TIMM] if importlib.util.find_spec("timm") else [])
    layouts = ["flat:2", "flat:5", "list:3"]
    impls = (*AVERAGER_NAMES, CHECK, KERNELS, *peers)
    expected = {(layout, impl) for layout in layouts for impl in impls}
    timed = {(r["layout"], r["impl"]) for r in rows if "median_us" in r}
    assert timed == expected, [r["note"] for r in rows if r["note"]]
    for r in rows:
        if "median_us" not in r:
            continue
        assert math.isfinite(r["median_us"]) and r["median_us"] > 0
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["samples"] >= 20 and r["vs_lerp"] > 0
        assert r["numel"] == r["tensors"] * 256 and r["flatten"] == r["layout"].startswith("flat")
        if r["impl"] == LERP:
            assert r["vs_lerp"] == 1.0
    table = printed.out
    assert "us/step" in table and "vs lerp" in table
    assert all(f"{layout} " in table for layout in layouts)
    md = (out / "overhead.md").read_text()
    assert md.startswith("Command: `belay-kernels bench --quick")
    assert md.count("\n| list:3 |") == len(impls)


def test_layouts_parse_and_refuse():
    assert parse_layouts("flat:2, list:1000") == [Layout(True, 2), Layout(False, 1000)]
    for bad in ("flat", "list:0", "tree:3", ""):
        with pytest.raises(ValueError):
            parse_layouts(bad)


def test_interleaved_timing_counts_every_call():
    calls = [0, 0]

    def first():
        calls[0] += 1

    def second():
        calls[1] += 1

    samples = time_interleaved(
        [first, second],
        reps=9,
        rounds=3,
        warmup=2,
        min_run_time=0,
        device=torch.device("cpu"),
    )
    assert [len(s) for s in samples] == [9, 9]
    assert calls == [11, 11]
    assert all(t >= 0 for s in samples for t in s)


def test_a_missing_timm_is_a_note_not_a_failure(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    monkeypatch.setitem(sys.modules, "timm.utils", None)
    cases = build_steps(Layout(True, 2), torch.device("cpu"), str(tmp_path), ["EMA"], [LERP, TIMM])
    notes = {row["impl"]: (row["note"], step is not None) for row, step in cases}
    assert notes["EMA"] == ("", True) and notes[LERP] == ("", True)
    assert notes[TIMM][0].startswith("not installed") and not notes[TIMM][1]

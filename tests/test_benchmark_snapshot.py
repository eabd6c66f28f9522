"""``belay-kernels bench --mode snapshot`` on a small model: every kind of step is timed,
the snapshots were written, and the files and table come out."""

from __future__ import annotations

import json

from belay_kernels.benchmark import command, snapshot_step


def test_snapshot_mode_writes_its_table(tmp_path, capsys):
    argv = ["--mode", "snapshot", "--quick", "--snapshot-size", "40000", "--snapshot-every", "4"]
    assert command.main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| snapshot | 2 |" in out
    saved = json.loads(next(tmp_path.rglob("snapshot.json")).read_text())
    medians = saved["medians"]
    assert medians["snapshot"]["count"] == 2  # two timed cycles, one snapshot each
    assert sum(m["count"] for m in medians.values()) == 8
    assert saved["parameters"] == 4 * 100 * 100 and saved["every"] == 4
    assert all(m["step_s"] >= m["posthoc_step_s"] > 0 for m in medians.values())
    assert "| snapshot |" in snapshot_step.format_table(saved)

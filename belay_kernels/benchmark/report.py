"""The table on stdout, and the JSON and CSV files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = (
    "mode", "model", "method", "dtypes", "numel", "tensors", "impl", "kind", "median_ms",
    "p20_ms", "p80_ms", "samples", "bytes", "gbps", "pct_stream", "ops_per_step",
    "kernels_per_step", "best_peer", "speedup_vs_best_peer", "speedup_vs_torch_reference",
    "note",
)


def add_stream_fraction(rows, stream_gbps: float) -> None:
    for row in rows:
        if "gbps" in row:
            row["pct_stream"] = 100 * row["gbps"] / stream_gbps


def _fmt(value, digits=2):
    if value is None or value == "":
        return ""
    return f"{value:.{digits}f}"


def format_table(rows) -> str:
    """One line per measured point; empty cells where a peer has no such method."""
    model_mode = any(r["mode"] == "model" for r in rows)
    head = ("model " if model_mode else "") + "method dtypes size impl median p20 p80 GB/s %stream"
    header = head.split() + (["ops/step", "vs_torch"] if model_mode else []) + ["vs_best_peer"]
    lines = []
    for r in rows:
        cells = ([r.get("model", "")] if model_mode else []) + [
            r["method"], r["dtypes"], f"{r['numel']:.1e}", r["impl"],
            _fmt(r.get("median_ms"), 3), _fmt(r.get("p20_ms"), 3), _fmt(r.get("p80_ms"), 3),
            _fmt(r.get("gbps"), 1), _fmt(r.get("pct_stream"), 0),
        ]
        if model_mode:
            cells += [str(r.get("ops_per_step", "")), _fmt(r.get("speedup_vs_torch_reference"))]
        cells.append(_fmt(r.get("speedup_vs_best_peer")) + ("x" if "speedup_vs_best_peer" in r else ""))
        if "median_ms" not in r:
            cells[-1] = "-- " + r["note"][:60]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(line.rstrip() for line in out)


def write_json(path: Path, machine: dict, stream: dict, rows) -> None:
    path.write_text(json.dumps({"machine": machine, "streaming": stream, "rows": rows}, indent=1))


def write_csv(path: Path, machine: dict, stream: dict, rows) -> None:
    """CSV rows, preceded by ``# key: value`` lines naming the machine and versions."""
    with path.open("w", newline="") as f:
        for key, value in machine.items():
            f.write(f"# {key}: {json.dumps(value) if isinstance(value, dict) else value}\n")
        f.write(f"# streaming: {json.dumps(stream)}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})

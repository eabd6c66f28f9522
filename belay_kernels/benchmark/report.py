"""The table on stdout, and the JSON and CSV files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = (
    "mode",
    "model",
    "method",
    "dtypes",
    "numel",
    "tensors",
    "impl",
    "kind",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "samples",
    "bytes",
    "gbps",
    "pct_stream",
    "ops_per_step",
    "kernels_per_step",
    "best_peer",
    "speedup_vs_best_peer",
    "speedup_vs_torch_reference",
    "speedup_vs_torch_compile",
    "compile_s",
    "note",
)


def add_stream_fraction(rows, stream_gbps: float) -> None:
    for row in rows:
        if "gbps" in row:
            row["pct_stream"] = 100 * row["gbps"] / stream_gbps


def header(machine: dict) -> str:
    """Where the numbers come from, one fact per line."""
    backends = machine["backends"]
    timed = [
        name
        for name, status in backends.items()
        if status.startswith("available") and machine["device_type"] in status
    ]
    absent = [
        f"{name} ({status.removeprefix('unavailable: ')})"
        if status.startswith("unavailable")
        else f"{name} (runs on {status.removeprefix('available (').rstrip(')')} only)"
        for name, status in backends.items()
        if name not in timed
    ]
    gpu = f", {machine['gpu']}" if machine["gpu"] else ""
    return "\n".join(
        [
            f"belay-kernels bench, {machine['date']}",
            f"  machine   {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB"
            f"{gpu}; last-level cache {machine['cache_bytes'] / 2**20:.0f} MiB",
            f"  threads   {machine['torch_threads']} torch CPU threads; device {machine['device']}",
            f"  versions  torch {machine['versions']['torch']}, python {machine['python']}",
            f"  backends  timed: {', '.join(timed)}"
            + (f"; not timed: {'; '.join(absent)}" if absent else ""),
        ]
    )


def _fmt(value, digits=2):
    if value is None or value == "":
        return ""
    return f"{value:.{digits}f}"


def format_table(rows) -> str:
    """One line per measured point; empty cells where a peer has no such method."""
    model_mode = any(r["mode"] == "model" for r in rows)
    head = ("model " if model_mode else "") + "method dtypes size impl median p20 p80 GB/s %stream"
    header = (
        head.split()
        + (["ops/step", "vs_torch"] if model_mode else ["compile_s", "vs_compile"])
        + ["vs_best_peer"]
    )
    lines = []
    for r in rows:
        cells = ([r.get("model", "")] if model_mode else []) + [
            r["method"],
            r["dtypes"],
            f"{r['numel']:.1e}",
            r["impl"],
            _fmt(r.get("median_ms"), 3),
            _fmt(r.get("p20_ms"), 3),
            _fmt(r.get("p80_ms"), 3),
            _fmt(r.get("gbps"), 1),
            _fmt(r.get("pct_stream"), 0) + ("*" if r.get("fits_in_cache") and "gbps" in r else ""),
        ]
        if model_mode:
            cells += [str(r.get("ops_per_step", "")), _fmt(r.get("speedup_vs_torch_reference"))]
        else:
            cells += [_fmt(r.get("compile_s"), 1), _fmt(r.get("speedup_vs_torch_compile"))]
        cells.append(
            _fmt(r.get("speedup_vs_best_peer")) + ("x" if "speedup_vs_best_peer" in r else "")
        )
        if "median_ms" not in r:
            cells[-1] = "-- " + r["note"]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *[c[:-1] for c in lines])]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths + [0])) for cells in lines]
    if any(r.get("fits_in_cache") and "gbps" in r for r in rows):
        out.append(CACHE_NOTE)
    return "\n".join(line.rstrip() for line in out)


CACHE_NOTE = (
    "* the step's tensors fit in the last-level cache, so part of them can be read from "
    "cache despite the rotated copies: %stream may pass 100 and is not the memory's speed"
)


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


def _ms(row) -> str:
    return f"{row['median_ms']:.2f} ({row['p20_ms']:.2f}–{row['p80_ms']:.2f})"


def _ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else ""


def markdown_model_table(rows) -> str:
    """The model-level rows as a Markdown table, one row per (model, pair, method, impl)."""
    lines = [
        "| model | dtypes | method | library [backend] | ms/step median (p20–p80) | GB/s "
        "| op calls/step | vs torch reference | vs fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] != "model":
            continue
        if "median_ms" not in r:
            lines.append(
                f"| {r['model']} | {r['dtypes']} | {r['method']} | {r['impl']} | "
                f"— ({r['note']}) | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['dtypes']} | {r['method']} | {r['impl']} | {_ms(r)} | "
            f"{r['gbps']:.1f} | {r['ops_per_step']} | "
            f"{_ratio(r.get('speedup_vs_torch_reference'))} | "
            f"{_ratio(r.get('speedup_vs_best_peer'))} |"
        )
    return "\n".join(lines)


def target_ratios(rows, reference_impl="belay_kernels[torch]") -> list[dict]:
    """The issue's targets, from model-level rows, for our fastest backend other than the
    reference itself: EMA on ResNet-50 against the fastest peer (goal >= 1.4x) and BELAY
    against the torch reference on every model (goal >= 2x)."""
    results = []
    timed = [r for r in rows if r["mode"] == "model" and "median_ms" in r]
    for model, pair, method in sorted({(r["model"], r["dtypes"], r["method"]) for r in timed}):
        if not (method == "belay" or (method == "ema" and model == "resnet50")):
            continue
        same = [r for r in timed if (r["model"], r["dtypes"], r["method"]) == (model, pair, method)]
        ours = [r for r in same if r["kind"] == "ours" and r["impl"] != reference_impl]
        if method == "ema":
            target, goal, field = "EMA on ResNet-50 vs fastest peer", 1.4, "speedup_vs_best_peer"
        else:
            target, goal, field = (
                f"BELAY on {model} vs torch reference",
                2.0,
                "speedup_vs_torch_reference",
            )
        if not ours:
            results.append(
                {
                    "target": target,
                    "dtypes": pair,
                    "ours": "no compiled backend",
                    "against": "",
                    "ratio": None,
                    "goal": goal,
                }
            )
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        against = best.get("best_peer", "") if method == "ema" else reference_impl
        results.append(
            {
                "target": target,
                "dtypes": pair,
                "ours": best["impl"],
                "against": against,
                "ratio": best.get(field),
                "goal": goal,
            }
        )
    return results


def markdown_targets(rows) -> str:
    lines = [
        "| target | dtypes | ours | against | measured | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in target_ratios(rows):
        met = "" if t["ratio"] is None else ("yes" if t["ratio"] >= t["goal"] else "NO")
        lines.append(
            f"| {t['target']} | {t['dtypes']} | {t['ours']} | {t['against']} | "
            f"{_ratio(t['ratio'])} | {t['goal']}x | {met} |"
        )
    return "\n".join(lines)


def markdown_sweep_summary(rows, numel: int) -> str:
    """The sweep at one size: every method, dtype pair and implementation."""
    lines = [
        "| method | dtypes | implementation | ms median (p20–p80) | GB/s | % streaming "
        "| compile s | vs torch.compile | vs fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] != "sweep" or r["numel"] != numel:
            continue
        if "median_ms" not in r:
            lines.append(
                f"| {r['method']} | {r['dtypes']} | {r['impl']} | — ({r['note']}) | | | | | |"
            )
            continue
        lines.append(
            f"| {r['method']} | {r['dtypes']} | {r['impl']} | {_ms(r)} | {r['gbps']:.1f} | "
            f"{r.get('pct_stream', 0):.0f}{'*' if r.get('fits_in_cache') else ''} | "
            f"{_fmt(r.get('compile_s'), 1)} | {_ratio(r.get('speedup_vs_torch_compile'))} | "
            f"{_ratio(r.get('speedup_vs_best_peer'))} |"
        )
    if any(r.get("fits_in_cache") and r["numel"] == numel for r in rows):
        lines += ["", CACHE_NOTE]
    return "\n".join(lines)


def markdown_header(command: str, machine: dict, device: str = "") -> list[str]:
    """The lines every results file opens with: the command, the machine, the versions."""
    return [
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB"
        f"{', ' + machine['gpu'] if machine['gpu'] else ''}; "
        + (f"device {device}; " if device else "")
        + f"torch threads {machine['torch_threads']}; date {machine['date']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + "  ",
        "Backends: " + "; ".join(f"{k}: {v}" for k, v in machine["backends"].items()) + "  ",
    ]


def write_markdown(path: Path, machine: dict, stream: dict, rows, command: str) -> None:
    """results.md: what bench/README.md quotes (command, machine, date, tables)."""
    parts = [
        *markdown_header(command, machine),
        f"Streaming copy (fp32, {stream['numel']:.1e} elements, read + write counted): "
        f"{stream['gbps']:.1f} GB/s (best of {stream['runs_gbps']})",
    ]
    if any(r["mode"] == "model" for r in rows):
        parts += [
            "",
            "### Targets",
            "",
            markdown_targets(rows),
            "",
            "### Model level",
            "",
            markdown_model_table(rows),
        ]
    sizes = sorted({r["numel"] for r in rows if r["mode"] == "sweep"})
    if sizes:
        parts += [
            "",
            f"### Sweep at {sizes[-1]:.0e} elements",
            "",
            markdown_sweep_summary(rows, sizes[-1]),
        ]
    path.write_text("\n".join(parts) + "\n")

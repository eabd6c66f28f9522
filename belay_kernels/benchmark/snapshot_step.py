"""``belay-kernels bench --mode snapshot``: what a PostHocEMA snapshot costs the training
step that takes it.

A model of ``--snapshot-size`` parameters (four square bias-free linear layers, fp32)
trains with SGD (momentum) and a :class:`~belay_kernels.PostHocEMA` of two profiles
with fp16 snapshots every ``--snapshot-every`` steps, on the CPU. Each step is timed
whole (forward, backward, optimizer, ``PostHocEMA.step()``) and ``PostHocEMA.step()``
alone. Steps are sorted into three kinds:

- a normal step while no snapshot write is in flight;
- a snapshot step (the previous write has finished before it starts, so it does not
  include waiting for one: ``wait()`` runs before it, untimed);
- a normal step while the writer thread writes the previous snapshot (the thread runs
  on another core and shares the memory bandwidth).

The snapshot step stages a CPU copy of the profiles in the snapshot dtype; the writer
thread computes the checksums and writes the file (fsync included) in the background.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time

import torch
from torch import nn

DEFAULT_NUMEL = 100_000_000
QUICK_NUMEL = 2_000_000
DEFAULT_EVERY = 8
BATCH = 16
KINDS = ("normal", "snapshot", "normal, write in flight")


def _model(numel: int) -> nn.Module:
    width = math.isqrt(numel // 4)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(4)))


def run_snapshot(numel: int, every: int, cycles: int, threads: int, log) -> dict:
    """Median times per kind of step, in seconds, and the raw samples."""
    import belay_kernels as bk

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(numel)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    x = torch.randn(BATCH, model[0].in_features)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="belay-snapshot-bench-") as folder:
        phema = bk.PostHocEMA(
            model, sigma_rels=(0.05, 0.10), snapshot_every=every, snapshot_dir=folder
        )
        for cycle in range(cycles + 1):  # the first cycle warms up (staging buffers, caches)
            for i in range(every):
                if i == every - 1:
                    phema.wait()
                busy = phema._writer.busy
                start = time.perf_counter()
                loss = model(x).square().mean()
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                optimizer.step()
                middle = time.perf_counter()
                phema.step()
                end = time.perf_counter()
                if i == every - 1:
                    kind = "snapshot"
                else:
                    kind = "normal, write in flight" if busy or phema._writer.busy else "normal"
                if cycle:
                    samples[kind].append((end - start, end - middle))
        phema.wait()
        assert phema.num_snapshots == cycles + 1
        log(f"{params / 1e6:.1f}M parameters, {threads} thread(s): {cycles} snapshot cycles timed")
    medians = {
        k: {
            "step_s": statistics.median(s[0] for s in v),
            "posthoc_step_s": statistics.median(s[1] for s in v),
            "count": len(v),
        }
        for k, v in samples.items()
        if v
    }
    return {"parameters": params, "threads": threads, "every": every, "medians": medians}


def format_table(result: dict) -> str:
    med = result["medians"]
    lines = [
        "| step | count | training step (ms) | PostHocEMA.step() (ms) |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        if kind in med:
            m = med[kind]
            lines.append(
                f"| {kind} | {m['count']} | {m['step_s'] * 1e3:.1f} | {m['posthoc_step_s'] * 1e3:.1f} |"
            )
    if "normal" in med and "snapshot" in med:
        n, s = med["normal"], med["snapshot"]
        lines.append(
            f"| snapshot / normal | | {s['step_s'] / n['step_s']:.2f}x | "
            f"{s['posthoc_step_s'] / n['posthoc_step_s']:.2f}x |"
        )
    return "\n".join(lines)


def main_snapshot(args, raw_argv, log) -> int:
    from .machine import machine_info
    from .report import header, markdown_header

    threads = args.threads or 1
    cycles = 2 if args.quick else 5
    machine = machine_info(torch.device("cpu"))
    machine["torch_threads"] = str(threads)
    log(header(machine))
    if args.device.type != "cpu":
        log("--mode snapshot times the CPU only; running on the CPU")
    result = run_snapshot(args.snapshot_size, args.snapshot_every, cycles, threads, log)
    command = "belay-kernels bench " + " ".join(raw_argv)
    text = (
        f"{result['parameters'] / 1e6:.1f}M fp32 parameters, SGD with momentum, batch "
        f"{BATCH}, PostHocEMA with 2 profiles and fp16 snapshots every {result['every']} "
        f"steps, {threads} thread(s), medians over {cycles} snapshot cycles"
    )
    table = format_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot.json").write_text(
        json.dumps({"machine": machine, "description": text, **result}, indent=1)
    )
    md = [*markdown_header(command, machine, device="cpu"), text, "", table]
    (args.out / "snapshot.md").write_text("\n".join(md) + "\n")
    print(header(machine))
    print(f"snapshot step: {text}\n")
    print(table)
    log(f"wrote snapshot.json, snapshot.md to {args.out}/")
    return 0

"""``belay-kernels bench --mode fused``: one training step's update, optimizer and averager
together, fused by :func:`belay_kernels.fuse` against the same two run one after the other.

The model is a flat stack of bias-free square ``nn.Linear`` layers (``LAYERS`` tensors,
32M elements in all by default). Its gradients are filled once with fixed random values
and never recomputed: no forward or backward pass is timed, only ``optimizer.step()`` (and
the averager's update). Two setups: fp32 weights with an fp32 shadow, and bf16 weights
with an fp32 shadow (the optimizer's state in the weights' dtype, as torch's AdamW keeps
it). Rows, per setup and thread count:

- ``fuse(AdamW, X)``: ``bk.fuse(torch.optim.AdamW(...), X)``, one pass per bucket, on the
  backend ``backend="auto"`` resolves to here (printed in the table), for X in EMA, Belay
  and PostHocEMA with two profiles;
- ``AdamW(fused=True) + X.step()``: torch's fused AdamW, then the averager's own step
  (the baseline of each speed-up);
- ``AdamW(fused=True) alone``: the optimizer without an averager, for scale;
- ``AdamW(foreach=True) + timm ModelEmaV3``: timm's EMA (kept in fp32 with ``dtype``);
- ``heavyball AdamW + weight_decay_to_ema``: HeavyBall's chainable AdamW preceded by its
  ``weight_decay_to_ema`` transform (an EMA of the weights that the weights are pulled
  towards; its inner functions compiled by torch.compile, HeavyBall's default). Not the
  same update as an EMA beside the optimizer, but the library's own way of keeping one.

A peer that is not installed gets a row saying so. HeavyBall (PyPI ``heavyball``) is not in
the ``peers`` extra: ``pip install heavyball`` beside this package to time it.

Bytes per parameter (the bound each row cannot beat; w = bytes of a weight, s = of a shadow
element, K = profiles): AdamW reads the weight, the gradient and its two moments and writes
the weight and the moments, 7w. An averager stepped separately reads the weight again
and reads and writes each shadow: +w+2Ks (EMA, PostHocEMA), and BELAY also writes the
weight: +2w+2s. Fused, the weight is in registers already: +2Ks. fp32: AdamW 28 B, EMA 40
vs 36, BELAY 44 vs 36, two profiles 48 vs 44; bf16 weights with fp32 shadow: AdamW 14 B,
EMA 24 vs 22, BELAY 26 vs 22, two profiles 32 vs 30. HeavyBall keeps its moments in fp32
(3w + 16) and its EMA pass reads and writes weight and shadow (+2w+2s).

Timing: ``time.perf_counter`` around each ``step()`` at ``torch.set_num_threads(n)``. One
case at a time holds memory: each round builds each case afresh (in a rotating order),
runs ``warmup`` untimed steps, times ``reps`` steps and frees it; the median and p20/p80
are over all rounds' steps.
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .report import markdown_header

DEFAULT_NUMEL = 32 * 2**20
QUICK_NUMEL = 1 << 16
LAYERS = 8
LR, WEIGHT_DECAY, EPS = 1e-3, 0.01, 1e-8
DECAY = 0.999
ALPHA, BETA = 0.01, 0.001
SIGMA_RELS = (0.05, 0.10)
NEVER = 10**12  # a snapshot interval no timed run reaches
SEED = 0

SETUPS = {
    "fp32": (torch.float32, torch.float32),
    "bf16/fp32": (torch.bfloat16, torch.float32),
}
AVERAGERS = ("EMA", "Belay", "PostHocEMA x2")
ADAMW = "AdamW(fused=True) alone"
TIMM = "AdamW(foreach=True) + timm ModelEmaV3"
HEAVYBALL = "heavyball AdamW + weight_decay_to_ema"


def fused_name(averager: str) -> str:
    return f"fuse(AdamW, {averager})"


def unfused_name(averager: str) -> str:
    return f"AdamW(fused=True) + {averager}.step()"


def row_names() -> list[str]:
    """Every row of a table, in its order."""
    names = [ADAMW]
    for averager in AVERAGERS:
        names += [fused_name(averager), unfused_name(averager)]
    return [*names, TIMM, HEAVYBALL]


def _profiles(averager: str) -> int:
    return len(SIGMA_RELS) if averager.startswith("PostHocEMA") else 1


def bytes_per_param(impl: str, setup: str) -> int:
    """The bytes one step must move per parameter (see the module's docstring)."""
    weights, shadow = (torch.finfo(d).bits // 8 for d in SETUPS[setup])
    adamw = 7 * weights
    if impl == ADAMW:
        return adamw
    if impl == HEAVYBALL:
        return 3 * weights + 16 + 2 * weights + 2 * shadow
    if impl == TIMM:
        return adamw + weights + 2 * shadow
    for averager in AVERAGERS:
        shadows = 2 * _profiles(averager) * shadow
        if impl == fused_name(averager):
            return adamw + shadows
        if impl == unfused_name(averager):
            return adamw + (2 if averager == "Belay" else 1) * weights + shadows
    raise KeyError(impl)


def layer_width(numel: int) -> int:
    """The width of ``LAYERS`` square layers holding about ``numel`` elements."""
    return max(1, round(math.sqrt(numel / LAYERS)))


@dataclass
class Weights:
    """The starting weights and the fixed gradients every case copies."""

    weights: list[torch.Tensor]
    grads: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)


def make_weights(numel: int, dtype: torch.dtype) -> Weights:
    width = layer_width(numel)
    gen = torch.Generator().manual_seed(SEED)
    weights = [(torch.rand(width, width, generator=gen) - 0.5).to(dtype) for _ in range(LAYERS)]
    grads = [(torch.randn(width, width, generator=gen) * 1e-2).to(dtype) for _ in range(LAYERS)]
    return Weights(weights, grads)


def make_model(start: Weights) -> nn.Module:
    """A fresh model holding a copy of the starting weights, its .grad a copy of the
    fixed gradients (an optimizer may write a gradient in place)."""
    width = start.weights[0].shape[0]
    dtype = start.weights[0].dtype
    with torch.device("meta"):
        layers = [nn.Linear(width, width, bias=False) for _ in range(LAYERS)]
    model = nn.Sequential(*layers).to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), start.weights, start.grads):
            p.copy_(w)
            p.grad = g.clone()
    return model


def _averager(name: str, model: nn.Module, shadow_dtype: torch.dtype, folder: str):
    import belay_kernels as bk

    if name == "EMA":
        return bk.EMA(model, decay=DECAY, shadow_dtype=shadow_dtype)
    if name == "Belay":
        return bk.Belay(model, alpha=ALPHA, beta=BETA, shadow_dtype=shadow_dtype)
    return bk.PostHocEMA(
        model,
        sigma_rels=SIGMA_RELS,
        snapshot_every=NEVER,
        snapshot_dir=folder,
        shadow_dtype=shadow_dtype,
    )


def _adamw(model: nn.Module, **options) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS, **options
    )


def _averager_backend(averager) -> str:
    """The module of the averager's first planned kernel, e.g. ``belay_kernels.backend.cpp``."""
    launches = list(getattr(averager, "_launches", []))
    while launches and isinstance(launches[0], (list, tuple)):
        launches = [x for group in launches for x in group]
    if not launches:
        return ""
    module = getattr(launches[0].kernel, "__module__", None) or ""
    # the compiled ops' functions live in backend/_compiled.py; on the CPU they are cpp's
    return "cpp" if module.endswith("._compiled") else module.rpartition(".")[2]


def _heavyball_adamw(model: nn.Module):
    """HeavyBall's AdamW chain with its ``weight_decay_to_ema`` transform in front."""
    from heavyball import chainable as C

    defaults = {
        "lr": LR,
        "betas": (0.9, 0.999),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "ema_beta": DECAY,
        "weight_decay_to_ema": WEIGHT_DECAY,
        "multi_tensor": True,
        "storage_dtype": "float32",
        "caution": False,
        "mars": False,
        "warmup_steps": 0,
        "mars_gamma": 0.0025,
        "beta2_scale": 0.8,
    }
    optimizer = C.BaseOpt(
        model.parameters(),
        defaults,
        None,
        None,
        False,
        fns=(C.weight_decay_to_ema, C.update_by_adam),
    )
    # HeavyBall sets each .grad to None once it has read it; the fixed gradients stay for
    # every timed step (it does not write them)
    optimizer.consume_grad = False
    return optimizer


@dataclass
class Case:
    """One row's step, the backend that runs it, and the model it steps."""

    step: Callable[[], object]
    backend: str
    model: nn.Module


def build_case(impl: str, start: Weights, shadow_dtype: torch.dtype, folder: str) -> Case:
    """One row's case on a fresh model; raises ImportError where a peer is not installed."""
    model = make_model(start)
    step, backend = _case_step(impl, model, shadow_dtype, folder)
    return Case(step, backend, model)


def _case_step(impl: str, model: nn.Module, shadow_dtype: torch.dtype, folder: str):
    import belay_kernels as bk

    if impl == ADAMW:
        return _adamw(model, fused=True).step, "torch fused AdamW"
    if impl == TIMM:
        from timm.utils import ModelEmaV3

        optimizer = _adamw(model, foreach=True)
        ema = ModelEmaV3(model, decay=DECAY, dtype=shadow_dtype)

        def step():
            optimizer.step()
            ema.update(model)

        return step, "torch foreach AdamW, timm"
    if impl == HEAVYBALL:
        return _heavyball_adamw(model).step, "heavyball (torch.compile)"
    for name in AVERAGERS:
        if impl == fused_name(name):
            fused = bk.fuse(_adamw(model), _averager(name, model, shadow_dtype, folder))
            return fused.step, "ours: " + fused._buckets[0][0].module.__name__.rpartition(".")[2]
        if impl == unfused_name(name):
            optimizer = _adamw(model, fused=True)
            averager = _averager(name, model, shadow_dtype, folder)

            def step():
                optimizer.step()
                averager.step()

            return step, f"torch fused AdamW + ours: {_averager_backend(averager)}"
    raise KeyError(impl)


def _one_phrase(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def time_cases(
    builders: dict[str, Callable[[], Case]],
    *,
    rounds: int,
    reps: int,
    warmup: int,
) -> tuple[dict[str, list[float]], dict[str, str], dict[str, str]]:
    """Seconds per step of each case, its backend, and a note for each case that could
    not be built. One case exists at a time; the order rotates from round to round."""
    samples: dict[str, list[float]] = {name: [] for name in builders}
    backends: dict[str, str] = {}
    notes: dict[str, str] = {}
    clock = time.perf_counter
    names = list(builders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in notes:
                continue
            try:
                case = builders[name]()
            except ImportError as exc:
                notes[name] = f"not installed ({_one_phrase(exc)})"
                continue
            except Exception as exc:  # a peer refused this setup
                notes[name] = f"failed: {_one_phrase(exc)}"
                continue
            backends[name], step = case.backend, case.step
            for _ in range(warmup):
                step()
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                for _ in range(reps):
                    t0 = clock()
                    step()
                    samples[name].append(clock() - t0)
            finally:
                if gc_was_enabled:
                    gc.enable()
            del case, step
            gc.collect()  # the case's cycles (a fused optimizer and its averager) and memory
    return samples, backends, notes


def run_fused(
    *,
    numel: int = DEFAULT_NUMEL,
    setups=tuple(SETUPS),
    threads=(1, 2),
    rounds: int = 3,
    reps: int = 3,
    warmup: int = 2,
    log=lambda _: None,
) -> list[dict]:
    """One row per (setup, threads, implementation)."""
    before = torch.get_num_threads()
    rows = []
    # the objects alive now (torch's modules) stay out of every collection: each case's
    # collection then walks only what the cases made
    gc.collect()
    gc.freeze()
    try:
        with tempfile.TemporaryDirectory() as folder:
            for setup in setups:
                weights_dtype, shadow_dtype = SETUPS[setup]
                start = make_weights(numel, weights_dtype)
                builders = {
                    name: (
                        lambda name=name, start=start: build_case(name, start, shadow_dtype, folder)
                    )
                    for name in row_names()
                }
                for n in threads:
                    torch.set_num_threads(n)
                    log(f"  {setup}, {n} thread(s), {start.numel:,} elements ...")
                    samples, backends, notes = time_cases(
                        builders, rounds=rounds, reps=reps, warmup=warmup
                    )
                    table = []
                    for name in row_names():
                        row = {
                            "mode": "fused",
                            "setup": setup,
                            "threads": n,
                            "numel": start.numel,
                            "tensors": LAYERS,
                            "impl": name,
                            "backend": backends.get(name, ""),
                            "bytes_per_param": bytes_per_param(name, setup),
                            "note": notes.get(name, ""),
                        }
                        if samples[name]:
                            p20, median, p80 = np.percentile(
                                np.asarray(samples[name]) * 1e3, [20, 50, 80]
                            )
                            row.update(
                                median_ms=float(median),
                                p20_ms=float(p20),
                                p80_ms=float(p80),
                                samples=len(samples[name]),
                                gbps=row["bytes_per_param"] * start.numel / median / 1e6,
                            )
                            log(f"    {name}: {median:.2f} ms")
                        else:
                            log(f"    {name}: -- {row['note']}")
                        table.append(row)
                    add_speedups(table)
                    rows += table
                del start, builders
                gc.collect()
            if any(Path(folder).iterdir()):
                raise RuntimeError(f"PostHocEMA wrote a snapshot while timing: {folder}")
    finally:
        gc.unfreeze()
        torch.set_num_threads(before)
    return rows


def add_speedups(table: list[dict]) -> None:
    """On each fused row: the unfused row's median over its own (``speedup``), and the
    same ratio of the bytes (``bound``: what the saved traffic alone would give)."""
    by_impl = {r["impl"]: r for r in table}
    for averager in AVERAGERS:
        fused, unfused = by_impl[fused_name(averager)], by_impl[unfused_name(averager)]
        fused["bound"] = unfused["bytes_per_param"] / fused["bytes_per_param"]
        if "median_ms" in fused and "median_ms" in unfused:
            fused["speedup"] = unfused["median_ms"] / fused["median_ms"]


HEAD = [
    "implementation",
    "backend",
    "ms/step median",
    "p20",
    "p80",
    "B/param",
    "GB/s",
    "speed-up vs unfused",
    "bytes bound",
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bound = f"{r['bound']:.2f}x" if "bound" in r else ""
        if "median_ms" not in r:
            lines.append(
                f"| {r['impl']} | — ({r['note']}) | | | | {r['bytes_per_param']} | | | {bound} |"
            )
            continue
        speedup = f"**{r['speedup']:.2f}x**" if "speedup" in r else ""
        lines.append(
            f"| {r['impl']} | {r['backend']} | {r['median_ms']:.2f} | {r['p20_ms']:.2f} | "
            f"{r['p80_ms']:.2f} | {r['bytes_per_param']} | {r['gbps']:.1f} | {speedup} | {bound} |"
        )
    return "\n".join(lines)


def format_tables(rows: list[dict]) -> str:
    """One Markdown table per (setup, threads), each under a line naming them."""
    parts = []
    keys = list(dict.fromkeys((r["setup"], r["threads"]) for r in rows))
    for setup, threads in keys:
        table = [r for r in rows if (r["setup"], r["threads"]) == (setup, threads)]
        weights, shadow = SETUPS[setup]
        parts += [
            f"#### {setup}: {str(weights).removeprefix('torch.')} weights, "
            f"{str(shadow).removeprefix('torch.')} shadow; {threads} thread(s); "
            f"{table[0]['numel']:,} elements in {table[0]['tensors']} tensors",
            "",
            markdown_table(table),
            "",
        ]
    return "\n".join(parts)


def description(numel: int, rounds: int, reps: int, warmup: int) -> str:
    return (
        f"one optimizer step (lr {LR}, weight_decay {WEIGHT_DECAY}) on {LAYERS} bias-free "
        f"square Linear layers of about {numel:.2e} elements in all, gradients fixed; EMA "
        f"decay {DECAY}, Belay alpha {ALPHA} beta {BETA}, PostHocEMA sigma_rels {SIGMA_RELS}. "
        f"Per case and round: built afresh, {warmup} warm-up steps, {reps} steps timed one by "
        f"one with time.perf_counter; {rounds} rounds, the cases in a rotating order; median "
        "and p20/p80 in ms. 'speed-up vs unfused' is the median of AdamW(fused=True) + "
        "X.step() over fuse(AdamW, X)'s; 'bytes bound' is the same ratio of the bytes each "
        "must move per parameter (B/param); GB/s counts those bytes."
    )


def main_fused(args, raw_argv, log) -> int:
    from .machine import machine_info
    from .report import header

    numel = args.fused_size
    threads = [args.threads] if args.threads else [1, 2]
    rounds, reps, warmup = (1, 2, 1) if args.quick else (3, 3, 2)
    machine = machine_info(torch.device("cpu"))
    machine["torch_threads"] = ", ".join(map(str, threads))  # each table says its own
    log(header(machine))
    if args.device.type != "cpu":
        log("--mode fused times the CPU only; running on the CPU")
    rows = run_fused(numel=numel, threads=threads, rounds=rounds, reps=reps, warmup=warmup, log=log)
    text = description(numel, rounds, reps, warmup)
    command = "belay-kernels bench " + " ".join(raw_argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "numel": numel,
        "threads": threads,
        "rounds": rounds,
        "reps": reps,
        "warmup": warmup,
        "description": text,
    }
    (args.out / "fused.json").write_text(
        json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=1)
    )
    tables = format_tables(rows)
    md = [*markdown_header(command, machine, device="cpu"), f"Timing: {text}", "", tables]
    (args.out / "fused.md").write_text("\n".join(md))
    print(header(machine))
    print(f"fused step: {text}\n")
    print(tables)
    log(f"wrote fused.json, fused.md to {args.out}/")
    return 0

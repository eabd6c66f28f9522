"""``belay-kernels bench``: parse the options, run the sweep and the model-level mode,
print the table and write JSON, CSV and the plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .._outputs import output_dir
from .._progress import progress
from .architectures import ARCHITECTURES
from .compiled import COMPILED_PEERS
from .peers import PEERS
from .report import add_stream_fraction, format_table, header, write_csv, write_json, write_markdown
from .sweep import DEFAULT_DTYPE_PAIRS, DTYPE_PAIRS
from .traffic import METHODS

# Largest working set per element across methods and peers: a peer's deep copy plus
# our operands, fp32 (about 6 tensors of 4 bytes), with headroom for the allocator.
BYTES_PER_ELEMENT_BUDGET = 32
QUICK_SIZES = (100_000, 1_000_000)
ALL_PEERS = (*PEERS, *COMPILED_PEERS)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def default_sizes(device: torch.device) -> list[int]:
    """1e5, 3e5, 1e6, ... up to the largest whose working set fits in an eighth of the
    free memory (the machine is shared)."""
    limit = _available_memory(device) // 8 // BYTES_PER_ELEMENT_BUDGET
    sizes, size = [], 100_000
    while size <= limit and size <= 1_000_000_000:
        sizes.append(size)
        size = size * 3 if str(size)[0] == "1" else size * 10 // 3
    return sizes or [100_000]


def _csv(kind, choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; choose from {list(choices)}")
        return values

    return parse


def _sizes(text):
    try:
        return [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sizes are numbers like 1e5,1e6: {exc}") from exc


def _layouts(text):
    from .overhead import parse_layouts

    try:
        return parse_layouts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="belay-kernels bench",
        description="Time EMA, SWA, BELAY, the two-point average and the swap on every "
        "backend that runs here, against the libraries people use today (timm, ema-pytorch, "
        "torch_ema, AveragedModel, plain lerp_ loops) and each op's formula compiled by "
        "torch.compile (its compile time reported apart): first a sweep over flat buffers of "
        "growing size, then one step on real model shapes (ResNet-50, ViT-B/16, a GPT-2-like "
        "stack). Prints one table per mode and writes results.json, results.csv, results.md "
        "and sweep.png. A full run times every size and then the models, with a progress bar "
        "and an ETA; --quick is a short smoke run.",
        epilog="where the files go: ./belay-results/bench/ by default, DIR with --out DIR; a "
        "--quick run writes to a quick/ folder below it, so that it never replaces a full "
        "run's files. The committed bench/results/ is regenerated only by naming it: "
        "--out bench/results.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: sizes {', '.join(f'{n:.0e}' for n in QUICK_SIZES)}, "
        "short timing, the sweep only (with --mode overhead: 20 calls per implementation)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when a GPU is present, else cpu)",
    )
    p.add_argument(
        "--mode",
        choices=("sweep", "models", "multi", "all", "distributed", "overhead", "fused", "snapshot"),
        default=None,
        help="sweep (flat buffers), models (real model shapes), multi (K post-hoc "
        "EMA profiles in one pass against K passes, torch.compile and ema-pytorch's "
        "PostHocEMA), all, distributed (an FSDP2-sharded GPT-2-like model on gloo "
        "ranks), or overhead (the host time of one step() of each averager on 16x16 "
        "tensors, against torch._foreach_lerp_ and timm's ModelEmaV3, at one thread; "
        "writes overhead.json and overhead.md), or fused (one AdamW step with EMA, BELAY or "
        "two post-hoc EMA profiles, fused by belay_kernels.fuse() against torch's fused "
        "AdamW followed by the averager's step(), timm's ModelEmaV3 and HeavyBall's "
        "weight_decay_to_ema, fp32 and bf16 weights, at 1 and 2 threads or --threads; "
        "writes fused.json and fused.md), or snapshot (the training step that takes a "
        "PostHocEMA snapshot against a normal one, at --threads or 1; writes snapshot.json "
        "and snapshot.md) (default: all; sweep with --quick)",
    )
    p.add_argument(
        "--layouts",
        type=_layouts,
        default=None,
        help="layouts for --mode overhead, flat:N (a flat buffer over N tensors) or list:N "
        "(flatten=False, N tensors) (default: flat:2,flat:148,list:148,list:1000)",
    )
    p.add_argument(
        "--profiles",
        type=_sizes,
        default=None,
        help="profile counts K for --mode multi (default: 2,4)",
    )
    p.add_argument(
        "--multi-size",
        type=float,
        default=None,
        help="elements of --mode multi's flat buffer (default: 64M, 1M with --quick)",
    )
    p.add_argument(
        "--fused-size",
        type=float,
        default=None,
        help="parameters of --mode fused's model, in 8 square layers (default: 32M, "
        "64K with --quick)",
    )
    p.add_argument(
        "--snapshot-size",
        type=float,
        default=None,
        help="parameters of --mode snapshot's model, in 4 square layers (default: 100M, "
        "2M with --quick)",
    )
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=None,
        help="--mode snapshot's snapshot_every (default: 8)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        default=2,
        help="processes for --mode distributed (threads per rank: --threads, default 1)",
    )
    p.add_argument(
        "--tiny-widths",
        action="store_true",
        help="--mode distributed on GPT-2 small's 148 tensors at width 16, so that the "
        "arithmetic is nothing and the host time per step is what is timed",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="the sweep's buffer sizes in elements, e.g. 1e5,1e6,1e7 (default: "
        "1e5 upward, as far as an eighth of the free memory allows)",
    )
    p.add_argument(
        "--methods",
        type=_csv("method", METHODS),
        default=list(METHODS),
        help=f"comma list of methods (default: all of {','.join(METHODS)})",
    )
    p.add_argument(
        "--dtypes",
        type=_csv("dtype pair", DTYPE_PAIRS),
        default=list(DEFAULT_DTYPE_PAIRS),
        help=f"comma list of weights/shadow dtype pairs for --mode sweep, models and multi, "
        f"of {','.join(DTYPE_PAIRS)} (default: {','.join(DEFAULT_DTYPE_PAIRS)})",
    )
    p.add_argument(
        "--peers",
        type=_csv("peer", ALL_PEERS),
        default=list(ALL_PEERS),
        help="comma list of peer libraries to compare with, '' for none "
        f"(default: all of {','.join(ALL_PEERS)}; the torch.compile peers, "
        "the formula compiled by Inductor, run in the sweep only)",
    )
    p.add_argument(
        "--backends",
        type=_csv("backend", None),
        default=None,
        help="comma list of our backends to time (default: every one that runs on the device)",
    )
    p.add_argument(
        "--models",
        type=_csv("model", ARCHITECTURES),
        default=list(ARCHITECTURES),
        help="comma list of model shapes for the model-level mode (default: all of "
        f"{','.join(ARCHITECTURES)})",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per point (default 0.3, 0.05 with --quick; with --mode "
        "overhead the least time per implementation, spread over its rounds)",
    )
    p.add_argument(
        "--stream-size",
        type=float,
        default=None,
        help="elements of the streaming copy that %%stream is relative to "
        "(default: 64M, 16M with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice; 1 for --mode overhead and, "
        "per rank, for --mode distributed)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the result files (default: ./belay-results/bench)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write sweep.png")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.mode = args.mode or ("sweep" if args.quick else "all")
    args.out = output_dir("bench", args.out, args.quick)
    args.sizes = args.sizes or (list(QUICK_SIZES) if args.quick else default_sizes(args.device))
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    args.stream_size = int(args.stream_size or (1 << 24 if args.quick else 1 << 26))
    from .multi_profile import DEFAULT_NUMEL, DEFAULT_PROFILES, QUICK_NUMEL

    args.profiles = args.profiles or list(DEFAULT_PROFILES)
    args.multi_size = int(args.multi_size or (QUICK_NUMEL if args.quick else DEFAULT_NUMEL))
    from . import fused

    args.fused_size = int(
        args.fused_size or (fused.QUICK_NUMEL if args.quick else fused.DEFAULT_NUMEL)
    )
    from . import snapshot_step

    args.snapshot_size = int(
        args.snapshot_size
        or (snapshot_step.QUICK_NUMEL if args.quick else snapshot_step.DEFAULT_NUMEL)
    )
    args.snapshot_every = args.snapshot_every or snapshot_step.DEFAULT_EVERY
    return args


def main(argv=None) -> int:
    from .machine import machine_info
    from .timing import streaming_bandwidth

    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.mode == "distributed":
        from .distributed import main_distributed

        return main_distributed(args, log)
    if args.mode == "overhead":
        from .overhead import main_overhead

        return main_overhead(args, raw_argv, log)
    if args.mode == "fused":
        from .fused import main_fused

        return main_fused(args, raw_argv, log)
    if args.mode == "snapshot":
        from .snapshot_step import main_snapshot

        return main_snapshot(args, raw_argv, log)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    log(header(machine))

    def stream():
        gbps, timing = streaming_bandwidth(
            args.device, numel=args.stream_size, min_run_time=args.min_run_time
        )
        log(f"streaming copy of {args.stream_size:.1e} fp32: {gbps:.1f} GB/s")
        return gbps

    stream_runs = [stream()]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        best = max(stream_runs)
        add_stream_fraction(rows, best)
        info = {
            "gbps": best,
            "runs_gbps": stream_runs,
            "numel": args.stream_size,
            "dtype": "float32",
            "bytes_counted": "read + write",
        }
        write_json(args.out / "results.json", machine, info, rows)
        write_csv(args.out / "results.csv", machine, info, rows)
        write_markdown(
            args.out / "results.md",
            machine,
            info,
            rows,
            "belay-kernels bench " + " ".join(raw_argv),
        )
        return best

    from .sweep import points_per_case

    def per_case(mode):
        return points_per_case(
            device=args.device,
            methods=args.methods,
            peers=args.peers,
            backends=args.backends,
            mode=mode,
        )

    points = {
        "sweep": len(args.dtypes) * len(args.sizes) * per_case("sweep"),
        "models": len(args.dtypes) * len(args.models) * per_case("models"),
    }
    total = sum(n for mode, n in points.items() if args.mode in (mode, "all"))
    with progress(total, "bench", enabled=not args.quick) as bar:

        def point(text):
            bar.write(text)
            bar.set_postfix_str(text.strip()[:60])
            bar.update(1)

        if args.mode in ("sweep", "all"):
            from .sweep import run_sweep

            rows += run_sweep(
                device=args.device,
                sizes=args.sizes,
                methods=args.methods,
                pairs=args.dtypes,
                peers=args.peers,
                backends=args.backends,
                min_run_time=args.min_run_time,
                log=point,
            )
            save()
        if args.mode in ("models", "all"):
            from .model_level import run_models

            rows += run_models(
                device=args.device,
                models=args.models,
                methods=args.methods,
                pairs=args.dtypes,
                peers=args.peers,
                backends=args.backends,
                min_run_time=max(args.min_run_time, 0.5),
                log=point,
            )
        if args.mode in ("multi", "all"):
            from .multi_profile import run_multi

            rows += run_multi(
                device=args.device,
                numel=args.multi_size,
                profiles=args.profiles,
                pairs=args.dtypes,
                backends=args.backends,
                peers=args.peers,
                models=[m for m in args.models if m == "gpt2_small_like"],
                min_run_time=args.min_run_time,
                log=bar.write,
            )
            save()
    stream_runs.append(stream())  # the machine may be busier now than at the start
    best = save()
    print(header(machine))
    print(
        f"streaming copy: {best:.1f} GB/s (best of {len(stream_runs)} runs); %stream is "
        "each point's GB/s as a share of it"
    )
    for mode in ("sweep", "model"):
        part = [r for r in rows if r["mode"] == mode]
        if part:
            print(format_table(part))
    if any(r["mode"] == "multi" for r in rows):
        from .multi_profile import format_table as format_multi

        print(format_multi([r for r in rows if r["mode"] == "multi"]))
    plotted = False
    if not args.no_plot and any(r["mode"] == "sweep" for r in rows):
        try:
            from .plot import plot_sweep
        except ImportError as exc:  # matplotlib is the optional [plots] extra
            log(f"no plot: {exc}; pip install matplotlib")
        else:
            plotted = True
            plot_sweep(
                rows,
                best,
                args.out / "sweep.png",
                f"{machine['cpu']} x{machine['cores']}"
                f"{', ' + machine['gpu'] if machine['gpu'] else ''}, "
                f"torch {machine['versions']['torch']}, {machine['date']}",
            )
    log(
        f"wrote results.json, results.csv, results.md{', sweep.png' if plotted else ''} "
        f"to {args.out}/"
    )
    return 0

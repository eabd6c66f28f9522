"""``belay-kernels bench --mode distributed``: the averaging step on an FSDP2-sharded
GPT-2-small-like model, on gloo ranks started here (one process per rank).

Per rank, in one run, it times:
- our EMA ``step()`` (the local shards, one multi-tensor launch);
- ``torch._foreach_lerp_`` over the DTensor parameters into DTensor shadows (what
  torchtitan's EMA does), and over the local shards into plain shadows;
- our BELAY ``step()`` on the best backend and on the torch reference.
Each number is the median of repeated calls; each rank reports its own, and the table
shows the slowest rank (the step is as slow as its slowest rank).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import timedelta

import torch

DECAY = 0.999
# GPT-2 small's 148 parameter tensors at width 16: the same step with no arithmetic to speak of
TINY = "gpt2_small_like, width 16"


def _median_seconds(fn, min_run_time: float, warmup: int = 2) -> tuple[float, int]:
    import torch.distributed as dist

    dist.barrier()  # the ranks time the same thing at the same time (they share memory)
    for _ in range(warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - start < min_run_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2], len(samples)


def _rank_main(rank, world, store_path, threads, min_run_time, model_name, results):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import belay_kernels as bk

    from .architectures import GPT2SmallLike, build

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    try:
        if model_name == TINY:
            torch.manual_seed(0)
            model = GPT2SmallLike(vocab=64, context=8, width=16, heads=2)
        else:
            model = build(model_name, torch.float32, torch.device("cpu"))
        for block in model.blocks.layers:
            fully_shard(block)
        fully_shard(model)
        params = [p for p in model.parameters()]
        local = [p._local_tensor for p in params]
        elements = sum(t.numel() for t in local)
        rows = {}

        ema = bk.EMA(model, decay=DECAY)
        rows["ours EMA step()"] = _median_seconds(ema.step, min_run_time)
        # the same op without the averager around it: the rest of step() is its checks
        shadow_views = [s.to_local() for s in ema.shadow_params()[: len(local)]]
        rows["ours ops.ema_update_ on the local lists"] = _median_seconds(
            lambda: bk.ops.ema_update_(shadow_views, local, decay=DECAY),
            min_run_time,
        )
        del ema, shadow_views
        with torch.no_grad():
            dt_shadows = [p.detach().clone() for p in params]
            rows["torch._foreach_lerp_ over DTensors"] = _median_seconds(
                lambda: torch._foreach_lerp_(dt_shadows, params, 1 - DECAY),
                min_run_time,
            )
            del dt_shadows
            shadows = [t.clone() for t in local]
            rows["torch._foreach_lerp_ over local shards"] = _median_seconds(
                lambda: torch._foreach_lerp_(shadows, local, 1 - DECAY),
                min_run_time,
            )
            del shadows
        for backend in ("auto", "torch"):
            belay = bk.Belay(model, alpha=1e-3, beta=1e-4, backend=backend)
            rows[f"ours BELAY step(), backend={backend}"] = _median_seconds(
                belay.step, min_run_time, warmup=1
            )
            del belay
        results.put((rank, {"elements": elements, "rows": rows}))
    finally:
        dist.destroy_process_group()


def run_distributed(*, ranks: int, threads: int, min_run_time: float, model: str, log) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="belay-bench-ranks-")
    store = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(
            target=_rank_main, args=(r, ranks, store, threads, min_run_time, model, results)
        )
        for r in range(ranks)
    ]
    for p in procs:
        p.start()
    per_rank = {}
    try:
        while len(per_rank) < ranks:
            if all(p.exitcode is not None for p in procs) and results.empty():
                raise RuntimeError(
                    f"a benchmark rank exited early (exit codes {[p.exitcode for p in procs]})"
                )
            try:
                rank, value = results.get(timeout=5)
            except Exception:
                continue
            per_rank[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    names = list(per_rank[0]["rows"])
    slowest = {n: max(per_rank[r]["rows"][n][0] for r in per_rank) for n in names}
    report = {
        "model": model,
        "ranks": ranks,
        "threads_per_rank": threads,
        "local_elements": [per_rank[r]["elements"] for r in sorted(per_rank)],
        "per_rank_median_s": {
            r: {n: v[0] for n, v in per_rank[r]["rows"].items()} for r in sorted(per_rank)
        },
        "slowest_rank_median_s": slowest,
        "ratios": {
            "EMA vs _foreach_lerp_ over DTensors": slowest["torch._foreach_lerp_ over DTensors"]
            / slowest["ours EMA step()"],
            "EMA vs _foreach_lerp_ over local shards": slowest[
                "torch._foreach_lerp_ over local shards"
            ]
            / slowest["ours EMA step()"],
            "BELAY auto vs torch reference": slowest["ours BELAY step(), backend=torch"]
            / slowest["ours BELAY step(), backend=auto"],
        },
        # Both EMAs read the shadow and the weights and write the shadow: 12 bytes per fp32
        # element. Where both stream at the memory's rate, neither can be much faster.
        "gb_per_s_per_rank": {
            name: 12 * max(per_rank[r]["elements"] for r in per_rank) / slowest[name] / 1e9
            for name in ("ours EMA step()", "torch._foreach_lerp_ over local shards")
        },
    }
    return report


def format_report(report: dict) -> str:
    lines = [
        f"{report['model']} under FSDP2 on {report['ranks']} gloo ranks, {report['threads_per_rank']} "
        f"thread(s) each; local elements per rank: {report['local_elements']}",
        "| step | slowest rank, median ms | per rank, ms |",
        "|---|---:|---|",
    ]
    # three significant digits down to microseconds (--tiny-widths times host cost)
    ms = lambda s: f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.4f}"  # noqa: E731
    for name, seconds in report["slowest_rank_median_s"].items():
        per = ", ".join(
            ms(report["per_rank_median_s"][r][name]) for r in report["per_rank_median_s"]
        )
        lines.append(f"| {name} | {ms(seconds)} | {per} |")
    for name, ratio in report["ratios"].items():
        lines.append(f"{name}: {ratio:.2f}x")
    for name, rate in report["gb_per_s_per_rank"].items():
        lines.append(f"{name}: {rate:.1f} GB/s per rank (12 bytes per element)")
    return "\n".join(lines)


def main_distributed(args, log) -> int:
    report = run_distributed(
        ranks=args.ranks,
        threads=args.threads or 1,
        min_run_time=args.min_run_time,
        model=TINY if args.tiny_widths else "gpt2_small_like",
        log=log,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    log(f"wrote {args.out}/distributed.json")
    return 0

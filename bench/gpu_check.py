"""The checks only a GPU can make (bench/gpu_check.sh runs this after building and testing):

- nan_swap         the packed bf16/fp32 swap on the GPU's own NaNs and every special word,
                   through the cuda and triton backends, flat and list;
- swap_and_lerp    swap and EMA/BELAY results on the device against the CPU reference,
                   bit for bit (the lerp's rounding: fma on the device, torch.lerp on CPU);
- graph_replay     an averager step (tensor-list path) captured in a CUDA graph, then 40
                   other list signatures, then replays, against the reference;
- device_guard     tensors on cuda:1 while cuda:0 is current (needs 2 GPUs), both backends;
- list_bandwidth   the list kernels' GB/s next to a device-to-device copy.

Each check records what it measured; the JSON goes to ``--out``/checks.json. ``--dry-run``
lists the checks without running them (this is what CI runs, without a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

CHECKS = ("nan_swap", "swap_and_lerp", "graph_replay", "device_guard", "list_bandwidth")
BACKENDS = ("cuda", "triton")


def _available(backend: str) -> bool:
    from belay_kernels import backends

    return backends()[backend].startswith("available")


def nan_swap() -> dict:
    from belay_kernels import ops
    from belay_kernels.testing import check_packed_swap, packed_swap_case

    result = {}
    for backend in filter(_available, BACKENDS):
        for layout in ("flat", "list"):
            weights, shadow = packed_swap_case("cuda")
            if layout == "flat":
                swap = lambda w, s, inv: ops.swap_(w, s, inverse=inv, backend=backend)  # noqa: E731
            else:

                def swap(w, s, inv, cuts=(0, 5, 6, 3000, weights.numel())):  # noqa: B008 (bound per case)
                    pieces = [(w[a:b], s[a:b]) for a, b in zip(cuts, cuts[1:])]
                    ops.swap_(
                        [p[0] for p in pieces], [p[1] for p in pieces], inverse=inv, backend=backend
                    )

            check_packed_swap(weights, shadow, swap)
            result[f"{backend} {layout}"] = "NaN kept, finite rounded, restored bit for bit"
    # The GPU's own NaN, made by arithmetic on the device, seen through averaged().
    import belay_kernels as bk

    model = torch.nn.Linear(16, 4).to(device="cuda", dtype=torch.bfloat16)
    ema = bk.EMA(model)
    shadow = ema.shadow_params()[0]
    with torch.no_grad():
        shadow[0] = torch.zeros_like(shadow[0]) / 0  # 0/0 on the device
    made = shadow[0].view(torch.int32).cpu().unique()
    with ema.averaged():
        assert bool(model.weight[0].isnan().all()), "the device's NaN became a number"
    result["device NaN bits, NaN inside averaged()"] = [
        f"0x{int(b) & 0xFFFFFFFF:08X}" for b in made
    ]
    return result


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    x, y = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    return int((x - y).abs().max()) if a.numel() else 0


def _two_point_into_weights(weights, snapshot, backend):
    """(weights + snapshot) / 2, written over the weights, so the check compares it."""
    from belay_kernels import ops

    weights.copy_(ops.two_point_average(weights, snapshot, backend=backend))


def swap_and_lerp() -> dict:
    from belay_kernels import ops
    from belay_kernels.testing import random_like_model

    gen = torch.Generator().manual_seed(5)
    n = 1_000_003
    result = {}
    pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32))
    for backend in filter(_available, BACKENDS):
        for wd, sd in pairs:
            w = random_like_model(n, wd, generator=gen)
            s = random_like_model(n, sd, generator=gen)
            label = f"{backend} {str(wd)[6:]}/{str(sd)[6:]}"
            for name, run in (
                ("ema", lambda w_, s_, b: ops.ema_update_(s_, w_, decay=0.999, backend=b)),
                ("ema fast rate", lambda w_, s_, b: ops.ema_update_(s_, w_, decay=0.3, backend=b)),
                (
                    "belay",
                    lambda w_, s_, b: ops.belay_step_(w_, s_, alpha=0.05, beta=0.6, backend=b),
                ),
                ("swa", lambda w_, s_, b: ops.swa_update_(s_, w_, count=6, backend=b)),
                ("two-point", _two_point_into_weights),
                ("swap", lambda w_, s_, b: ops.swap_(w_, s_, backend=b)),
            ):
                cpu = (w.clone(), s.clone())
                dev = (w.cuda(), s.cuda())
                run(*cpu, "torch")
                run(*dev, backend)
                ulps = [_ulps(d.cpu(), c) for d, c in zip(dev, cpu)]
                result[f"{label} {name}"] = {"max_ulp_weights": ulps[0], "max_ulp_shadow": ulps[1]}
                if name == "swap":
                    assert ulps == [0, 0], f"{label} swap differs from the CPU reference"
                else:
                    assert max(ulps) <= 1, f"{label} {name}: {ulps} ulp from the CPU reference"
    return result


def graph_replay() -> dict:
    import belay_kernels as bk
    from belay_kernels import ops

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 5)).cuda()
    twin = [p.detach().clone() for p in model.parameters()]
    ema = bk.EMA(model, decay=0.9, flatten=False)  # the tensor-list path
    expected = [s.detach().clone() for s in ema.shadow_params()]

    def step():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        ema.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # outside the capture: compiles, builds the pointer table
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    others = []
    for i in range(40):  # more list signatures than the old 32-entry cache
        pair = (
            [torch.randn(7 + i, device="cuda") for _ in range(2)],
            [torch.randn(7 + i, device="cuda") for _ in range(2)],
        )
        ops.ema_update_(*pair, decay=0.5)
        others.append(pair)
    replays = 5
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    # the reference: the warm-up step, then one per replay (the capture itself runs nothing)
    for _ in range(1 + replays):
        for t in twin:
            t.mul_(1.01)
        for s, t in zip(expected, twin):
            ops.ema_update_(s, t, decay=0.9, backend="torch")
    error = max(float((a - b).abs().max()) for a, b in zip(ema.shadow_params(), expected))
    assert error < 1e-6, f"replayed shadow differs from the reference by {error}"
    return {"replays": replays, "other_signatures": len(others), "max_abs_error": error}


def device_guard() -> dict:
    from belay_kernels import ops

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): needs 2"}
    result = {}
    for backend in filter(_available, BACKENDS):
        torch.cuda.set_device(0)
        shadow = torch.randn(1_000_003, device="cuda:1")
        weights = torch.randn(1_000_003, device="cuda:1")
        expected = shadow.clone()
        ops.ema_update_(expected, weights, decay=0.9, backend="torch")
        ops.ema_update_(shadow, weights, decay=0.9, backend=backend)
        lists = ([shadow[:500], shadow[500:]], [weights[:500], weights[500:]])
        ops.ema_update_(*lists, decay=0.9, backend=backend)
        ops.ema_update_([expected[:500], expected[500:]], lists[1], decay=0.9, backend="torch")
        torch.cuda.synchronize(1)
        error = float((shadow - expected).abs().max())
        assert error < 1e-6 and torch.cuda.current_device() == 0, (backend, error)
        result[backend] = {"max_abs_error": error}
    return result


def list_bandwidth() -> dict:
    from belay_kernels import ops
    from belay_kernels.backend.triton import measure

    copy = measure.copy_bandwidth("cuda", 1 << 27, runs=20, warmup=3)
    result = {"copy_gbps": copy["gbps"]}
    sizes = [1 << 20] * 48 + [12_345, 999, 1]  # 48M elements, plus odd ones
    shadows = [torch.randn(n, device="cuda") for n in sizes]
    weights = [torch.randn(n, device="cuda") for n in sizes]
    moved = 12 * sum(sizes)  # read shadow + weights, write shadow (fp32)
    for backend in filter(_available, BACKENDS):
        timing = measure.time_cuda(
            lambda: ops.ema_update_(shadows, weights, decay=0.999, backend=backend), 20, 3
        )
        gbps = moved / timing["median_ms"] / 1e6
        result[f"{backend} ema list"] = {**timing, "gbps": gbps, "of_copy": gbps / copy["gbps"]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        for name in CHECKS:
            print(f"would run {name}: {globals()[name].__doc__ or ''}".rstrip())
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    failed = 0
    for name in CHECKS:
        start = time.perf_counter()
        try:
            outcome = {"ok": True, "result": globals()[name]()}
        except Exception as exc:  # one failing check must not hide the others
            failed += 1
            outcome = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        outcome["seconds"] = round(time.perf_counter() - start, 2)
        report["checks"][name] = outcome
        print(f"{name}: {'ok' if outcome['ok'] else 'FAILED ' + outcome['error']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checks.json").write_text(json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The multi-profile cases of ``belay-kernels bench --mode multi`` (post-hoc EMA): K EMA
profiles of the same weights, for each weights/shadow dtype pair, updated

- by one :func:`~belay_kernels.ops.multi_ema_update_` pass, which must move ``w + 2Ks``
  bytes per element (``w`` and ``s`` the weights' and a shadow's element sizes: the weights
  read once, each shadow read and written);
- by K separate :func:`~belay_kernels.ops.ema_update_` passes, ``K(w + 2s)`` bytes;
- by ``torch.compile`` of the K-profile formula (Inductor fuses it into one loop), charged
  the fused pass's bytes. It does our work: the math in the reference's dtype, and the
  non-finite weights kept out and counted, once per profile. Its ``(uncounted)`` variant
  (peer ``torch.compile (uncounted)``) keeps them out but counts nothing;

on one flat buffer, for every backend whose ``multi_ema_update_`` runs here (a backend that
refuses it gets a row saying why). Then, on the GPT-2-small-like model (fp32), one step of
:class:`~belay_kernels.PostHocEMA` against one ``update()`` of ema-pytorch's
``PostHocEMA`` with the same profiles.
"""

from __future__ import annotations

import copy
import gc
import tempfile

import torch

from .. import ops, power, reference
from .._checks import BelayInputError
from . import architectures
from .compiled import COUNTED, UNCOUNTED, first_call, fresh_compile
from .flat_cases import available_backends
from .peers import Unsupported, one_phrase
from .sweep import DTYPE_PAIRS
from .timing import time_step

DEFAULT_NUMEL = 1 << 26
QUICK_NUMEL = 1 << 20
DEFAULT_PROFILES = (2, 4)
# the first K of these are the K profiles (EDM2 tracks 0.05 and 0.10)
SIGMA_RELS = (0.05, 0.10, 0.075, 0.15, 0.03, 0.20)
COMPILED = "torch.compile (K-profile formula)"
COMPILED_UNCOUNTED = "torch.compile (K-profile formula, uncounted)"
EMA_PYTORCH = "ema-pytorch PostHocEMA"
NEVER = 10**12  # a snapshot interval no timed run reaches


def fused_bytes(numel: int, k: int, weights_size: int = 4, shadow_size: int = 4) -> int:
    return numel * (weights_size + 2 * k * shadow_size)


def separate_bytes(numel: int, k: int, weights_size: int = 4, shadow_size: int = 4) -> int:
    return numel * k * (weights_size + 2 * shadow_size)


def decays_for(k: int, n: int = 1000) -> list[float]:
    """The decays of the n-th update of the first k profiles."""
    return [power.decay(n, power.sigma_rel_to_gamma(s)) for s in SIGMA_RELS[:k]]


def _k_profile_formula(shadows, weights, rates, skipped, math, counted):
    # the formula a user would write, doing our op's work: the math in ``math``, and the
    # non-finite weights kept out of every profile and (``counted``) counted once per profile
    w = weights.to(math)
    keep = ~torch.isfinite(w)
    for shadow, rate in zip(shadows, rates):
        s = shadow.to(math)
        shadow.copy_(torch.where(keep, s, torch.lerp(s, w, rate)))
    if counted:
        skipped.add_(keep.sum() * len(shadows))


def multi_backend_reason(backend: str, device: torch.device) -> str:
    """Empty when ``multi_ema_update_`` runs on ``backend`` here, else why not."""
    w = torch.rand(5, device=device)
    try:
        ops.multi_ema_update_([w.clone(), w.clone()], w, decays=[0.9, 0.99], backend=backend)
    except BelayInputError as exc:
        return f"not available: {one_phrase(exc)}"
    return ""


def flat_steps(backend: str, shadows, weights, decays):
    """{impl kind: step} of our two ways on ``backend``."""

    def fused():
        ops.multi_ema_update_(shadows, weights, decays=decays, backend=backend)

    def separate():
        for shadow, decay in zip(shadows, decays):
            ops.ema_update_(shadow, weights, decay=decay, backend=backend)

    return {"fused": fused, "separate": separate}


def _row(**fields) -> dict:
    return {"mode": "multi", "dtypes": "fp32/fp32", "note": "", **fields}


def _timed(row, step, device, min_run_time, rotate=True):
    timing = time_step(
        lambda: step,
        device=device,
        state_bytes=row["bytes"],
        min_run_time=min_run_time,
        rotate=rotate,
    )
    row.update(
        median_ms=timing.median_s * 1e3,
        p20_ms=timing.p20_s * 1e3,
        p80_ms=timing.p80_s * 1e3,
        samples=timing.samples,
        gbps=row["bytes"] / timing.median_s / 1e9,
    )
    return row


def run_flat(
    *, device, numel, profiles, pairs, backends, compiled, min_run_time, log
) -> list[dict]:
    rows = []
    backends = backends or available_backends(device)
    for pair in pairs:
        weights_dtype, shadow_dtype = DTYPE_PAIRS[pair]
        sizes = (weights_dtype.itemsize, shadow_dtype.itemsize)
        for k in profiles:
            weights = torch.empty(numel, device=device).uniform_(-1, 1).to(weights_dtype)
            shadows = [
                torch.empty(numel, device=device).uniform_(-1, 1).to(shadow_dtype) for _ in range(k)
            ]
            rows += _flat_case(
                pair, k, weights, shadows, backends, compiled, sizes, min_run_time, log
            )
            del weights, shadows
            gc.collect()
    add_ratios(rows)
    return rows


def _flat_case(pair, k, weights, shadows, backends, compiled, sizes, min_run_time, log):
    """The rows of K profiles of one dtype pair: each backend's two ways, then each
    torch.compile variant of ``compiled``, (row name, whether it counts)."""
    rows = []
    device, numel = weights.device, weights.numel()
    decays = decays_for(k)
    method = f"multi_ema K={k}"
    label = f"{method} {pair}"

    def case_row(**fields):
        return _row(method=method, dtypes=pair, numel=numel, **fields)

    for backend in backends:
        reason = multi_backend_reason(backend, device)
        for kind, step in flat_steps(backend, shadows, weights, decays).items():
            name = (
                f"belay_kernels[{backend}] multi_ema_update_"
                if kind == "fused"
                else f"belay_kernels[{backend}] {k} x ema_update_"
            )
            nbytes = (fused_bytes if kind == "fused" else separate_bytes)(numel, k, *sizes)
            row = case_row(
                impl=name,
                kind="ours",
                backend=backend,
                pass_kind=kind,
                bytes=nbytes,
            )
            if reason and kind == "fused":
                row["note"] = reason
                rows.append(row)
                log(f"  {label} {name}: -- ({reason})")
                continue
            try:
                step()
            except Exception as exc:  # ema_update_ itself refused this backend
                row["note"] = f"failed: {one_phrase(exc)}"
                rows.append(row)
                log(f"  {label} {name}: -- ({row['note']})")
                continue
            rows.append(_timed(row, step, device, min_run_time))
            log(f"  {label} {name}: {row['median_ms']:.2f} ms, {row['gbps']:.1f} GB/s")
    for impl, counted in compiled:
        row = case_row(
            impl=impl,
            kind="peer",
            pass_kind="compiled",
            bytes=fused_bytes(numel, k, *sizes),
        )
        fresh_compile()  # dynamo keeps only a few dtype and K variants of one function
        fn = torch.compile(_k_profile_formula, fullgraph=True, dynamic=False)
        rates = [1 - d for d in decays]
        math = reference.opmath_dtype(weights, *shadows)
        skipped = torch.zeros((), dtype=torch.int64, device=device)

        def step(fn=fn, counted=counted):
            fn(shadows, weights, rates, skipped, math, counted)

        try:
            row["compile_s"] = first_call(step, device)
        except Unsupported as exc:
            row["note"] = str(exc)
            rows.append(row)
            log(f"  {label} {impl}: -- ({exc})")
        else:
            rows.append(_timed(row, step, device, min_run_time))
            log(
                f"  {label} {impl}: {row['median_ms']:.2f} ms "
                f"(compiled in {row['compile_s']:.1f} s)"
            )
    return rows


def _ours_posthoc(model, k, folder):
    from ..posthoc import PostHocEMA

    return PostHocEMA(
        model, sigma_rels=SIGMA_RELS[:k], snapshot_every=NEVER, snapshot_dir=folder
    ).step


def _ema_pytorch_posthoc(model, k, folder):
    try:
        from ema_pytorch import PostHocEMA
    except ImportError as exc:
        raise Unsupported(f"not installed ({one_phrase(exc)})") from exc
    peer = PostHocEMA(
        model,
        sigma_rels=SIGMA_RELS[:k],
        update_every=1,
        checkpoint_every_num_steps=NEVER,
        checkpoint_folder=folder,
    )
    peer.update()  # the first update only copies the model into each profile
    return peer.update


def run_model(*, device, model_name, profiles, min_run_time, log, peers=True) -> list[dict]:
    rows = []
    model = architectures.build(model_name, torch.float32, device)
    numel = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    builders = [("belay_kernels PostHocEMA.step", "ours", _ours_posthoc)]
    if peers:
        builders.append((EMA_PYTORCH + ".update", "peer", _ema_pytorch_posthoc))
    for k in profiles:
        for impl, kind, build in builders:
            row = _row(
                method=f"multi_ema K={k}",
                model=model_name,
                numel=numel,
                impl=impl,
                kind=kind,
                pass_kind="model",
                bytes=fused_bytes(numel, k),
            )
            with tempfile.TemporaryDirectory() as folder:
                try:
                    step = build(copy.deepcopy(model), k, folder)
                    step()
                except Unsupported as exc:
                    row["note"] = str(exc)
                except Exception as exc:  # the library refused this model or K
                    row["note"] = f"failed: {one_phrase(exc)}"
                if row["note"]:
                    rows.append(row)
                    log(f"  {model_name} K={k} {impl}: -- ({row['note']})")
                    continue
                rows.append(_timed(row, step, device, min_run_time, rotate=False))
                log(f"  {model_name} K={k} {impl}: {row['median_ms']:.1f} ms")
                del step
                gc.collect()
    add_ratios(rows)
    return rows


def add_ratios(rows) -> None:
    """``vs_separate``: K separate passes' time / the fused pass's, same backend and K;
    ``vs_compile``: torch.compile's time / ours (``vs_uncounted``: its uncounted variant's);
    ``vs_ema_pytorch``: the peer's / ours."""
    timed = [r for r in rows if "median_ms" in r]
    for r in timed:
        same = [
            o
            for o in timed
            if (o["method"], o["dtypes"], o.get("model"))
            == (r["method"], r["dtypes"], r.get("model"))
        ]
        if r.get("pass_kind") == "fused":
            sep = [
                o
                for o in same
                if o.get("pass_kind") == "separate" and o.get("backend") == r["backend"]
            ]
            if sep:
                r["vs_separate"] = sep[0]["median_ms"] / r["median_ms"]
        if r["kind"] == "ours":
            for o in same:
                if o["impl"] == COMPILED:
                    r["vs_compile"] = o["median_ms"] / r["median_ms"]
                if o["impl"] == COMPILED_UNCOUNTED:
                    r["vs_uncounted"] = o["median_ms"] / r["median_ms"]
                if o["impl"].startswith(EMA_PYTORCH):
                    r["vs_ema_pytorch"] = o["median_ms"] / r["median_ms"]


def format_table(rows) -> str:
    head = [
        "case",
        "size",
        "impl",
        "median_ms",
        "p20",
        "p80",
        "bytes/elem",
        "GB/s",
        "vs_separate",
        "vs_compile",
        "vs_uncounted",
        "vs_ema_pytorch",
    ]
    fmt = lambda v, d=2: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = []
    for r in rows:
        case = f"{r['method']} {r['dtypes']}" + (f" {r['model']}" if r.get("model") else "")
        cells = [case, f"{r['numel']:.2e}", r["impl"]]
        if "median_ms" not in r:
            lines.append(cells + ["-- " + r["note"]])
            continue
        cells += [
            fmt(r["median_ms"]),
            fmt(r["p20_ms"]),
            fmt(r["p80_ms"]),
            str(r["bytes"] // r["numel"]),
            fmt(r["gbps"], 1),
            fmt(r.get("vs_separate")),
            fmt(r.get("vs_compile")),
            fmt(r.get("vs_uncounted")),
            fmt(r.get("vs_ema_pytorch")),
        ]
        lines.append(cells)
    widths = [
        max(len(c[i]) for c in [head] + [x for x in lines if len(x) == len(head)])
        for i in range(len(head))
    ]
    out = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(line.rstrip() for line in out)


def run_multi(*, device, numel, profiles, pairs, backends, peers, models, min_run_time, log):
    """The flat cases at ``numel`` elements of each dtype pair, then the model cases on
    ``models``."""
    rows = run_flat(
        device=device,
        numel=numel,
        profiles=profiles,
        pairs=pairs,
        backends=backends,
        compiled=[
            (impl, counted)
            for impl, counted, peer in (
                (COMPILED, True, COUNTED),
                (COMPILED_UNCOUNTED, False, UNCOUNTED),
            )
            if peer in peers
        ],
        min_run_time=min_run_time,
        log=log,
    )
    for name in models:
        rows += run_model(
            device=device,
            model_name=name,
            profiles=profiles,
            min_run_time=max(min_run_time, 0.5),
            log=log,
            peers=any(p.startswith("ema-pytorch") for p in peers),
        )
    return rows
